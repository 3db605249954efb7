// Argument checks at the torch boundary. Messages name the op and the argument, because they
// surface as Python exceptions in the user's code.
//
// Messages are assembled with std::string and std::to_string, never by streaming numbers into an
// std::ostream: on the GPU machine's toolchain (g++ from /opt/gcc, linked -Bsymbolic-functions)
// the ostream number formatting our .so instantiates crashed in the locale code (seen there with
// cuda-gdb), while string concatenation is header-only and safe.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <type_traits>

namespace vpit {
namespace detail {

inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
std::string piece(T v) {
  return std::to_string(v);
}
inline std::string piece(double v) { return std::to_string(v); }
inline std::string piece(c10::ScalarType t) { return c10::toString(t); }
inline std::string piece(const c10::Device& d) { return d.str(); }
inline std::string piece(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}

template <typename... Args>
std::string cat(const Args&... args) {
  std::string out;
  (out += ... += piece(args));
  return out;
}

}  // namespace detail

inline bool is_float_kind(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kFloat || s == at::kBFloat16 || s == at::kHalf;
}

}  // namespace vpit

#define VPIT_CHECK(cond, ...) TORCH_CHECK(cond, ::vpit::detail::cat(__VA_ARGS__))
#define VPIT_CHECK_ARG(op, cond, ...) \
  TORCH_CHECK(cond, ::vpit::detail::cat("vpit_fast." op ": ", __VA_ARGS__))
