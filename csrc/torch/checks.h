// Argument checks at the torch boundary. Messages name the op and the argument, because they
// surface as Python exceptions in the user's code.
#pragma once
#include <ATen/ATen.h>

#define VPIT_CHECK(cond, ...) TORCH_CHECK(cond, __VA_ARGS__)
#define VPIT_CHECK_ARG(op, cond, ...) TORCH_CHECK(cond, "vpit_fast." op ": ", __VA_ARGS__)

namespace vpit {

inline bool is_float_kind(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kBFloat16 || s == at::kHalf;
}

}  // namespace vpit
