#include "interpolate_tokens.h"

#include <ATen/Parallel.h>

#include "../cpu/interpolate_tokens_cpu.h"
#include "checks.h"

namespace vpit {

TokenGrid check_interpolate_tokens(const at::Tensor& x, int64_t in_h, int64_t in_w, int64_t out_h,
                                   int64_t out_w) {
  VPIT_CHECK_ARG("interpolate_tokens", x.dim() == 3,
                 "x must be [batch, tokens, channels], got a tensor of rank ", x.dim());
  VPIT_CHECK_ARG("interpolate_tokens", is_float_kind(x),
                 "x must be float32, bfloat16 or float16, got ", x.scalar_type());
  VPIT_CHECK_ARG("interpolate_tokens", in_h > 0 && in_w > 0 && out_h > 0 && out_w > 0,
                 "grid sizes must be positive, got in_size (", in_h, ", ", in_w, ") and out_size (",
                 out_h, ", ", out_w, ")");
  VPIT_CHECK_ARG("interpolate_tokens", in_h * in_w <= INT32_MAX && out_h * out_w <= INT32_MAX,
                 "grids of more than 2^31 tokens are not supported");
  VPIT_CHECK_ARG("interpolate_tokens", x.size(1) == in_h * in_w, "x has ", x.size(1),
                 " tokens but in_size (", in_h, ", ", in_w, ") needs ", in_h * in_w);
  VPIT_CHECK_ARG("interpolate_tokens", x.size(2) > 0, "x has no channels (shape ", x.sizes(), ")");
  return TokenGrid{int(in_h), int(in_w), int(out_h), int(out_w)};
}

void check_interpolate_tokens_grad(const at::Tensor& grad_out, const at::Tensor& x,
                                   const TokenGrid& g) {
  VPIT_CHECK_ARG("interpolate_tokens_backward", grad_out.device() == x.device(),
                 "grad_out is on ", grad_out.device(), " but x is on ", x.device());
  VPIT_CHECK_ARG("interpolate_tokens_backward", grad_out.scalar_type() == x.scalar_type(),
                 "grad_out is ", grad_out.scalar_type(), " but x is ", x.scalar_type());
  const std::vector<int64_t> expected = {x.size(0), int64_t(g.out_h) * g.out_w, x.size(2)};
  VPIT_CHECK_ARG("interpolate_tokens_backward", grad_out.sizes() == at::IntArrayRef(expected),
                 "grad_out must be ", at::IntArrayRef(expected), ", got ", grad_out.sizes());
}

// The CPU kernels work in fp32; one upcast in and one cast out give the same rounding as fp32
// math followed by a cast, which is the op's contract.
at::Tensor interpolate_tokens_cpu(const at::Tensor& x, int64_t in_h, int64_t in_w, int64_t out_h,
                                  int64_t out_w, bool normalize) {
  const TokenGrid g = check_interpolate_tokens(x, in_h, in_w, out_h, out_w);
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const int64_t batch = x.size(0), channels = x.size(2);
  at::Tensor out = at::empty({batch, out_h * out_w, channels}, x32.options());
  const float* src = x32.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    cpu::interpolate_tokens_forward(src, dst, begin, end, channels, g, normalize);
  });
  return out.to(x.scalar_type());
}

at::Tensor interpolate_tokens_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                           int64_t in_h, int64_t in_w, int64_t out_h,
                                           int64_t out_w, bool normalize) {
  const TokenGrid g = check_interpolate_tokens(x, in_h, in_w, out_h, out_w);
  check_interpolate_tokens_grad(grad_out, x, g);
  const at::Tensor g32 = grad_out.to(at::kFloat).contiguous();
  const at::Tensor x32 = normalize ? x.to(at::kFloat).contiguous() : g32;  // x read only then
  const int64_t batch = x.size(0), channels = x.size(2);
  at::Tensor grad_in = at::empty({batch, in_h * in_w, channels}, g32.options());
  const float* gsrc = g32.data_ptr<float>();
  const float* xsrc = x32.data_ptr<float>();
  float* dst = grad_in.data_ptr<float>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    cpu::interpolate_tokens_backward(gsrc, xsrc, dst, begin, end, channels, g, normalize);
  });
  return grad_in.to(x.scalar_type());
}

}  // namespace vpit
