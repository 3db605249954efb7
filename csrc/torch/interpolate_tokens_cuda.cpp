#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../cuda/interpolate_tokens.h"
#include "checks.h"
#include "cuda_dtype.h"
#include "interpolate_tokens.h"

namespace vpit {

at::Tensor interpolate_tokens_cuda(const at::Tensor& x, int64_t in_h, int64_t in_w, int64_t out_h,
                                   int64_t out_w, bool normalize) {
  const TokenGrid g = check_interpolate_tokens(x, in_h, in_w, out_h, out_w);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({x.size(0), out_h * out_w, x.size(2)}, x.options());
  const cudaError_t err = cuda::interpolate_tokens_forward(
      xc.data_ptr(), out.data_ptr(), cuda_dtype(x), x.size(0), x.size(2), g, normalize,
      at::cuda::getCurrentCUDAStream());
  VPIT_CHECK(err == cudaSuccess, "vpit_fast.interpolate_tokens: CUDA error: ",
             cudaGetErrorString(err));
  return out;
}

at::Tensor interpolate_tokens_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                            int64_t in_h, int64_t in_w, int64_t out_h,
                                            int64_t out_w, bool normalize) {
  const TokenGrid g = check_interpolate_tokens(x, in_h, in_w, out_h, out_w);
  check_interpolate_tokens_grad(grad_out, x, g);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor gc = grad_out.contiguous();
  const at::Tensor xc = normalize ? x.contiguous() : x;
  const int64_t ws_bytes =
      cuda::interpolate_tokens_backward_workspace(x.size(0), x.size(2), g, normalize);
  const at::Tensor workspace = at::empty({ws_bytes}, x.options().dtype(at::kByte));
  at::Tensor grad_in = at::empty({x.size(0), in_h * in_w, x.size(2)}, x.options());
  const cudaError_t err = cuda::interpolate_tokens_backward(
      gc.data_ptr(), xc.data_ptr(), grad_in.data_ptr(), workspace.data_ptr(), cuda_dtype(x),
      x.size(0), x.size(2), g, normalize, at::cuda::getCurrentCUDAStream());
  VPIT_CHECK(err == cudaSuccess, "vpit_fast.interpolate_tokens_backward: CUDA error: ",
             cudaGetErrorString(err));
  return grad_in;
}

}  // namespace vpit
