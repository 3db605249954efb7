#include "rms_norm.h"

#include "checks.h"

namespace vpit {

void check_rms_norm_backward_args(const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_direct,
                                  const at::Tensor& h, const at::Tensor& rstd, const at::Tensor& weight) {
  const auto dtype = h.scalar_type();
  VPIT_CHECK_ARG("rms_norm_backward", h.dim() >= 1 && (is_float_kind(h) || dtype == at::kDouble),
                 "h must be a floating tensor [..., hidden], got ", h.scalar_type(), " of shape ", h.sizes());
  const int64_t cols = h.size(-1);
  VPIT_CHECK_ARG("rms_norm_backward", grad_out.sizes() == h.sizes() && grad_out.scalar_type() == dtype,
                 "grad_out must match h (", h.sizes(), ", ", dtype, "), got ", grad_out.sizes(), ", ",
                 grad_out.scalar_type());
  if (grad_direct.has_value()) {
    VPIT_CHECK_ARG("rms_norm_backward",
                   grad_direct->sizes() == h.sizes() && grad_direct->scalar_type() == dtype,
                   "grad_direct must match h (", h.sizes(), ", ", dtype, "), got ", grad_direct->sizes(), ", ",
                   grad_direct->scalar_type());
  }
  VPIT_CHECK_ARG("rms_norm_backward", weight.dim() == 1 && weight.size(0) == cols && weight.scalar_type() == dtype,
                 "weight must be [", cols, "] of h's dtype ", dtype, ", got ", weight.sizes(), ", ",
                 weight.scalar_type());
  VPIT_CHECK_ARG("rms_norm_backward", rstd.numel() * cols == h.numel() && rstd.scalar_type() == at::kFloat,
                 "rstd must hold one float32 per row of h (", h.numel() / std::max<int64_t>(cols, 1),
                 " rows), got ", rstd.sizes(), ", ", rstd.scalar_type());
  for (const at::Tensor* t : {&grad_out, &rstd, &weight}) {
    VPIT_CHECK_ARG("rms_norm_backward", t->device() == h.device(), "every tensor must be on h's device (",
                   h.device(), "), got one on ", t->device());
  }
  if (grad_direct.has_value()) {
    VPIT_CHECK_ARG("rms_norm_backward", grad_direct->device() == h.device(),
                   "grad_direct must be on h's device (", h.device(), "), got ", grad_direct->device());
  }
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_aten(const at::Tensor& grad_out,
                                                          const c10::optional<at::Tensor>& grad_direct,
                                                          const at::Tensor& h, const at::Tensor& rstd,
                                                          const at::Tensor& weight) {
  const int64_t cols = h.size(-1);
  const int64_t rows = cols == 0 ? 0 : h.numel() / cols;
  // fp32 math for every dtype, float64 included, as transformers' LLaMA norm computes its forward
  const at::ScalarType math = at::kFloat;
  const at::Tensor dy = grad_out.reshape({rows, cols}).to(math);
  const at::Tensor x = h.reshape({rows, cols}).to(math);
  const at::Tensor r = rstd.reshape({rows, 1}).to(math);
  const at::Tensor g = dy * weight.to(math);
  const at::Tensor c = r * r * (g * x).sum(1, true) / double(std::max<int64_t>(cols, 1));
  // the residual gradient is added in h's dtype, as autograd adds it after the norm's backward
  at::Tensor dx = (r * (g - x * c)).to(h.scalar_type());
  if (grad_direct.has_value()) dx = dx + grad_direct->reshape({rows, cols});
  // the forward rounded h * r to h's dtype before the weight
  const at::Tensor normed = (x * r).to(h.scalar_type()).to(math);
  const at::Tensor dw = (dy * normed).sum(0);
  return {dx.reshape(h.sizes()), dw.to(weight.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward_cpu(const at::Tensor& grad_out,
                                                         const c10::optional<at::Tensor>& grad_direct,
                                                         const at::Tensor& h, const at::Tensor& rstd,
                                                         const at::Tensor& weight) {
  check_rms_norm_backward_args(grad_out, grad_direct, h, rstd, weight);
  return rms_norm_backward_aten(grad_out, grad_direct, h, rstd, weight);
}

}  // namespace vpit
