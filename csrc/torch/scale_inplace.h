// scale_(t, factor): t *= factor (a one-element float32 tensor), skipped when factor is 1.
#pragma once
#include <ATen/ATen.h>

namespace vpit {

// Raises unless t is a contiguous floating tensor and factor a one-element float32 on its device.
void check_scale_args(const at::Tensor& t, const at::Tensor& factor);

void scale_inplace_cpu(at::Tensor& t, const at::Tensor& factor);
#ifdef VPIT_FAST_WITH_CUDA
void scale_inplace_cuda(at::Tensor& t, const at::Tensor& factor);
#endif

}  // namespace vpit
