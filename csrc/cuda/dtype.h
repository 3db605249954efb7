// The element types the CUDA launchers accept. Host-includable, framework-free.
#pragma once

namespace vpit::cuda {

enum class DType { kFloat32, kBFloat16, kFloat16 };

}  // namespace vpit::cuda
