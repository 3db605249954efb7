// rms_norm_backward(grad_out, grad_direct?, h, rstd, weight) -> (grad_input, grad_weight):
// the backward of y = weight * round(h * rstd) with the residual stream's gradient added.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace vpit {

// Raises unless the arguments are shaped as the op's docstring (vpit_fast/ops/rms_norm.py) says.
void check_rms_norm_backward_args(const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_direct,
                                  const at::Tensor& h, const at::Tensor& rstd, const at::Tensor& weight);

// ATen composite: the CPU implementation, and the CUDA one for what the kernel does not take.
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_aten(const at::Tensor& grad_out,
                                                          const c10::optional<at::Tensor>& grad_direct,
                                                          const at::Tensor& h, const at::Tensor& rstd,
                                                          const at::Tensor& weight);
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_out,
                                                         const c10::optional<at::Tensor>& grad_direct,
                                                         const at::Tensor& h, const at::Tensor& rstd,
                                                         const at::Tensor& weight);
#ifdef VPIT_FAST_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_out,
                                                          const c10::optional<at::Tensor>& grad_direct,
                                                          const at::Tensor& h, const at::Tensor& rstd,
                                                          const at::Tensor& weight);
#endif

}  // namespace vpit
