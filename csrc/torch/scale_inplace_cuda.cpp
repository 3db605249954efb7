#include <ATen/cuda/CUDAContext.h>

#include "../cuda/scale_inplace.h"
#include "checks.h"
#include "cuda_dtype.h"
#include "scale_inplace.h"

namespace vpit {

void scale_inplace_cuda(at::Tensor& t, const at::Tensor& factor) {
  check_scale_args(t, factor);
  const cudaError_t err = cuda::scale_inplace(t.data_ptr(), cuda_dtype(t), t.numel(),
                                              factor.data_ptr<float>(),
                                              at::cuda::getCurrentCUDAStream());
  VPIT_CHECK(err == cudaSuccess, "vpit_fast.scale_: CUDA error: ", cudaGetErrorString(err));
}

}  // namespace vpit
