#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../cuda/rms_norm.h"
#include "checks.h"
#include "cuda_dtype.h"
#include "rms_norm.h"

namespace vpit {

namespace {
// Widest row the kernel's shared-memory dw accumulators are sized for (4 warps x cols floats).
constexpr int64_t kMaxKernelCols = 8192;
}  // namespace

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cuda(const at::Tensor& grad_out,
                                                          const c10::optional<at::Tensor>& grad_direct,
                                                          const at::Tensor& h, const at::Tensor& rstd,
                                                          const at::Tensor& weight) {
  check_rms_norm_backward_args(grad_out, grad_direct, h, rstd, weight);
  const int64_t cols = h.size(-1);
  if (!is_float_kind(h) || cols > kMaxKernelCols) {
    return rms_norm_backward_aten(grad_out, grad_direct, h, rstd, weight);
  }
  const c10::cuda::CUDAGuard guard(h.device());
  const int64_t rows = cols == 0 ? 0 : h.numel() / cols;
  const at::Tensor dy = grad_out.contiguous(), x = h.contiguous(), w = weight.contiguous();
  const at::Tensor r = rstd.contiguous();
  const at::Tensor direct = grad_direct.has_value() ? grad_direct->contiguous() : at::Tensor();
  at::Tensor dx = at::empty_like(x);
  at::Tensor dw = at::empty_like(w);
  const int64_t blocks = cuda::rms_norm_backward_blocks(rows);
  at::Tensor partial = at::empty({blocks, cols}, x.options().dtype(at::kFloat));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  cudaError_t err = cuda::rms_norm_backward(dy.data_ptr(), direct.defined() ? direct.data_ptr() : nullptr,
                                            x.data_ptr(), r.data_ptr<float>(), w.data_ptr(), dx.data_ptr(),
                                            partial.data_ptr<float>(), rows, cols, cuda_dtype(x), stream);
  if (err == cudaSuccess) {
    err = cuda::sum_partials(partial.data_ptr<float>(), blocks, cols, dw.data_ptr(), cuda_dtype(w), stream);
  }
  VPIT_CHECK(err == cudaSuccess, "vpit_fast.rms_norm_backward: CUDA error: ", cudaGetErrorString(err));
  return {dx, dw};
}

}  // namespace vpit
