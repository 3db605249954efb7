#include "master_adamw.h"

#include "checks.h"

namespace vpit {

void check_master_adamw_args(at::TensorList params, at::TensorList grads, at::TensorList masters,
                             at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps) {
  const size_t n = params.size();
  VPIT_CHECK_ARG("master_adamw_", grads.size() == n && masters.size() == n && exp_avgs.size() == n &&
                                      exp_avg_sqs.size() == n && steps.size() == n,
                 "params, grads, masters, exp_avgs, exp_avg_sqs and steps must have one length, got ", n, ", ",
                 grads.size(), ", ", masters.size(), ", ", exp_avgs.size(), ", ", exp_avg_sqs.size(), ", ",
                 steps.size());
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    const std::string at = "[" + std::to_string(i) + "]";
    VPIT_CHECK_ARG("master_adamw_", is_float_kind(p), "params", at, " must be float32, bfloat16 or float16, got ",
                   p.scalar_type());
    VPIT_CHECK_ARG("master_adamw_", p.device() == params[0].device(), "params", at, " is on ", p.device(),
                   ", params[0] on ", params[0].device(), ": every tensor must be on one device");
    VPIT_CHECK_ARG("master_adamw_", grads[i].scalar_type() == p.scalar_type() && grads[i].device() == p.device() &&
                                        grads[i].sizes() == p.sizes(),
                   "grads", at, " must match params", at, " (", p.scalar_type(), ", ", p.device(), ", ", p.sizes(),
                   "), got ", grads[i].scalar_type(), ", ", grads[i].device(), ", ", grads[i].sizes());
    for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"masters", masters[i]},
                                  {"exp_avgs", exp_avgs[i]}, {"exp_avg_sqs", exp_avg_sqs[i]}}) {
      VPIT_CHECK_ARG("master_adamw_", t.scalar_type() == at::kFloat && t.is_contiguous() &&
                                          t.numel() == p.numel() && t.device() == p.device(),
                     name, at, " must be a contiguous float32 tensor of ", p.numel(), " elements on ", p.device(),
                     ", got ", t.scalar_type(), " of ", t.numel(), " on ", t.device());
    }
    VPIT_CHECK_ARG("master_adamw_", steps[i].scalar_type() == at::kFloat && steps[i].numel() == 1 &&
                                        steps[i].device() == p.device(),
                   "steps", at, " must be a one-element float32 tensor on ", p.device());
  }
}

void master_adamw_aten(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& master,
                       const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const at::Tensor& step,
                       double lr, double beta1, double beta2, double eps, double weight_decay) {
  const at::Tensor g = grad.reshape(master.sizes()).to(at::kFloat);
  const at::Tensor count = step.reshape({}).to(at::kDouble);
  // Tensors, not host numbers: reading the step on the host would sync a GPU.
  const at::Tensor step_size = (lr / (1.0 - at::pow(beta1, count))).to(at::kFloat);
  const at::Tensor inv_bias2_sqrt = at::rsqrt(1.0 - at::pow(beta2, count)).to(at::kFloat);
  master.mul_(1.0 - lr * weight_decay);
  exp_avg.lerp_(g, 1.0 - beta1);
  exp_avg_sq.mul_(beta2).addcmul_(g, g, 1.0 - beta2);
  const at::Tensor denom = (exp_avg_sq.sqrt() * inv_bias2_sqrt).add_(eps);
  master.sub_(exp_avg / denom * step_size);
  param.copy_(master.view(param.sizes()));
}

void master_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList masters,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps, double lr,
                      double beta1, double beta2, double eps, double weight_decay) {
  check_master_adamw_args(params, grads, masters, exp_avgs, exp_avg_sqs, steps);
  for (size_t i = 0; i < params.size(); ++i) {
    steps[i].add_(1);
    master_adamw_aten(params[i], grads[i], masters[i], exp_avgs[i], exp_avg_sqs[i], steps[i], lr, beta1, beta2,
                      eps, weight_decay);
  }
}

}  // namespace vpit
