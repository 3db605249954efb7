#include "scale_inplace.h"

#include "checks.h"

namespace vpit {

void check_scale_args(const at::Tensor& t, const at::Tensor& factor) {
  VPIT_CHECK_ARG("scale_", t.is_contiguous() && is_float_kind(t),
                 "t must be a contiguous float32, bfloat16 or float16 tensor");
  VPIT_CHECK_ARG("scale_", factor.numel() == 1 && factor.scalar_type() == at::kFloat &&
                               factor.device() == t.device(),
                 "factor must be a one-element float32 tensor on t's device");
}

void scale_inplace_cpu(at::Tensor& t, const at::Tensor& factor) {
  check_scale_args(t, factor);
  const float f = factor.item<float>();  // free on the CPU
  if (f != 1.f) t.mul_(f);
}

}  // namespace vpit
