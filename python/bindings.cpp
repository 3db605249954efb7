// vpit_fast._C: the compiled kernels and what was built. Importing it also loads the
// torch.library registrations of csrc/torch/registration.cpp.
#include <torch/extension.h>

#include "../csrc/torch/interpolate_tokens.h"

#ifndef VPIT_FAST_VERSION
#define VPIT_FAST_VERSION "unknown"
#endif
#ifndef VPIT_FAST_TORCH_VERSION
#define VPIT_FAST_TORCH_VERSION "unknown"
#endif
#ifndef VPIT_FAST_CUDA_ARCHS
#define VPIT_FAST_CUDA_ARCHS ""
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = VPIT_FAST_VERSION;
#ifdef VPIT_FAST_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = VPIT_FAST_CUDA_ARCHS;
  info["torch_version"] = VPIT_FAST_TORCH_VERSION;  // the torch it was compiled against
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vpit_fast compiled kernels (CPU and, when built with CUDA, CUDA)";
  m.def("build_info", &build_info, "What this extension was built with.");
  m.def("interpolate_tokens_cpu", &vpit::interpolate_tokens_cpu,
        "Token interpolation on CPU tensors (see vpit_fast.interpolate_tokens).");
#ifdef VPIT_FAST_WITH_CUDA
  m.def("interpolate_tokens_cuda", &vpit::interpolate_tokens_cuda,
        "Token interpolation on CUDA tensors (see vpit_fast.interpolate_tokens).");
#endif
}
