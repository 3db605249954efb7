// Maps a torch dtype to the framework-free kernels' DType (callers have checked it is floating).
#pragma once
#include <ATen/ATen.h>

#include "../cuda/dtype.h"

namespace vpit {

inline cuda::DType cuda_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kFloat16;
    default: return cuda::DType::kFloat32;
  }
}

}  // namespace vpit
