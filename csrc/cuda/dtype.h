// The element types the CUDA launchers accept. Host-includable, framework-free.
#pragma once
#include <cstdint>

namespace vpit::cuda {

enum class DType { kFloat32, kBFloat16, kFloat16 };

// p can be read in words of `bytes` (the launchers' test for vectorised paths).
inline bool is_aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

}  // namespace vpit::cuda
