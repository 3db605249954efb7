// The vpit_fast operator library: schemas, and the CPU and CUDA implementation of each.
// Fake (meta) implementations and autograd are registered from Python (vpit_fast/ops/).
#include <torch/library.h>

#include "interpolate_tokens.h"

TORCH_LIBRARY(vpit_fast, m) {
  m.def("interpolate_tokens(Tensor x, int in_h, int in_w, int out_h, int out_w, bool normalize) -> Tensor");
  m.def("interpolate_tokens_backward(Tensor grad_out, Tensor x, int in_h, int in_w, int out_h, "
        "int out_w, bool normalize) -> Tensor");
}

TORCH_LIBRARY_IMPL(vpit_fast, CPU, m) {
  m.impl("interpolate_tokens", &vpit::interpolate_tokens_cpu);
  m.impl("interpolate_tokens_backward", &vpit::interpolate_tokens_backward_cpu);
}

#ifdef VPIT_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(vpit_fast, CUDA, m) {
  m.impl("interpolate_tokens", &vpit::interpolate_tokens_cuda);
  m.impl("interpolate_tokens_backward", &vpit::interpolate_tokens_backward_cuda);
}
#endif
