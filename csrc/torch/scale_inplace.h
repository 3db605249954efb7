// scale_(t, factor): t *= factor (a one-element float32 tensor), skipped when factor is 1.
#pragma once
#include <ATen/ATen.h>

namespace vpit {

void scale_inplace_cpu(at::Tensor& t, const at::Tensor& factor);
#ifdef VPIT_FAST_WITH_CUDA
void scale_inplace_cuda(at::Tensor& t, const at::Tensor& factor);
#endif

}  // namespace vpit
