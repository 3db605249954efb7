// In-place scaling by a factor that lives on the device. Framework-free, host-includable.
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>

#include "dtype.h"

namespace vpit::cuda {

// data[i] *= *factor for i < n; when *factor == 1 every thread returns at once, so a backward
// pass whose incoming gradient is 1 skips the pass over the gradients without a host sync.
cudaError_t scale_inplace(void* data, DType dtype, int64_t n, const float* factor,
                          cudaStream_t stream);

}  // namespace vpit::cuda
