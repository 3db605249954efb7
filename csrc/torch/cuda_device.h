// What the CUDA launchers need to know about the current device. Host-only.
#pragma once
#include <ATen/cuda/CUDAContext.h>

namespace vpit {

inline int current_num_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Programmatic dependent launch (csrc/cuda/pdl.cuh) needs compute capability 9.0 or later.
inline bool current_supports_programmatic_launch() { return at::cuda::getCurrentDeviceProperties()->major >= 9; }

}  // namespace vpit
