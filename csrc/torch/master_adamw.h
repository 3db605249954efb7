// master_adamw_(params, grads, masters, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps,
// weight_decay): advances every step count by one, then one AdamW step on the fp32 masters and
// the copy back into the (low-precision) parameters (csrc/cuda/master_adamw.h has the formula).
#pragma once
#include <ATen/ATen.h>

namespace vpit {

// Raises unless the six lists have one length, every tensor is on one device, and entry i is a (param, grad) pair of one float
// dtype, device and shape with fp32 contiguous (master, exp_avg, exp_avg_sq) of its numel and a
// one-element fp32 step, all on the param's device.
void check_master_adamw_args(at::TensorList params, at::TensorList grads, at::TensorList masters,
                             at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps);

// The update of entry i in ATen ops (no host sync): the CPU implementation, and CUDA's for
// entries the kernel does not take (non-contiguous parameters or gradients).
void master_adamw_aten(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& master,
                       const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq, const at::Tensor& step,
                       double lr, double beta1, double beta2, double eps, double weight_decay);

void master_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList masters,
                      at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps, double lr,
                      double beta1, double beta2, double eps, double weight_decay);
#ifdef VPIT_FAST_WITH_CUDA
void master_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList masters,
                       at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps, double lr,
                       double beta1, double beta2, double eps, double weight_decay);
#endif

}  // namespace vpit
