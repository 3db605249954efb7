// Torch adapters of token interpolation: check the arguments, then launch the CPU or CUDA kernel.
#pragma once
#include <ATen/ATen.h>

#include "../kernels/bilinear_taps.h"

namespace vpit {

// Validates x ([B, in_h*in_w, C], floating) and the grids; returns the grid for the kernels.
TokenGrid check_interpolate_tokens(const at::Tensor& x, int64_t in_h, int64_t in_w, int64_t out_h,
                                   int64_t out_w);
// Validates grad_out against x's shape, dtype and device.
void check_interpolate_tokens_grad(const at::Tensor& grad_out, const at::Tensor& x,
                                   const TokenGrid& grid);

at::Tensor interpolate_tokens_cpu(const at::Tensor& x, int64_t in_h, int64_t in_w, int64_t out_h,
                                  int64_t out_w, bool normalize);
at::Tensor interpolate_tokens_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                           int64_t in_h, int64_t in_w, int64_t out_h,
                                           int64_t out_w, bool normalize);
#ifdef VPIT_FAST_WITH_CUDA
at::Tensor interpolate_tokens_cuda(const at::Tensor& x, int64_t in_h, int64_t in_w, int64_t out_h,
                                   int64_t out_w, bool normalize);
at::Tensor interpolate_tokens_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                            int64_t in_h, int64_t in_w, int64_t out_h,
                                            int64_t out_w, bool normalize);
#endif

}  // namespace vpit
