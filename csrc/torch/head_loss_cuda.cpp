// CUDA row passes of the fused head loss: thin adapters over csrc/cuda/head_loss.cu.
#include <ATen/cuda/CUDAContext.h>

#include "../cuda/head_loss.h"
#include "checks.h"
#include "cuda_dtype.h"
#include "head_loss.h"

namespace vpit {

void cross_entropy_rows_cuda(at::Tensor& logits, const at::Tensor& targets, double grad_scale,
                             at::Tensor& row_loss) {
  TORCH_INTERNAL_ASSERT(logits.stride(1) == 1 && targets.is_contiguous() && row_loss.is_contiguous());
  const cudaError_t err = cuda::cross_entropy_rows(
      logits.data_ptr(), cuda_dtype(logits), logits.size(0), logits.stride(0), logits.size(1),
      targets.data_ptr<int64_t>(), float(grad_scale), row_loss.data_ptr<float>(),
      at::cuda::getCurrentCUDAStream());
  VPIT_CHECK(err == cudaSuccess, "vpit_fast.head_loss: CUDA error: ", cudaGetErrorString(err));
}

void cosine_rows_cuda(const at::Tensor& pred, const at::Tensor& target, double grad_scale,
                      at::Tensor& grad_pred, at::Tensor& row_loss) {
  TORCH_INTERNAL_ASSERT(pred.is_contiguous() && target.is_contiguous() && grad_pred.is_contiguous());
  const cudaError_t err = cuda::cosine_rows(
      pred.data_ptr(), target.data_ptr(), grad_pred.data_ptr(), cuda_dtype(pred), pred.size(0),
      pred.size(1), float(grad_scale), row_loss.data_ptr<float>(),
      at::cuda::getCurrentCUDAStream());
  VPIT_CHECK(err == cudaSuccess, "vpit_fast.head_loss: CUDA error: ", cudaGetErrorString(err));
}

}  // namespace vpit
