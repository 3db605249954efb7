// AdamW on fp32 master weights with low-precision parameters, fused into one pass per launch.
// Framework-free, host-includable.
//
// Per element, with g the gradient (the parameter's dtype, read as fp32):
//   master  *= 1 - lr * weight_decay
//   exp_avg += (1 - beta1) * (g - exp_avg)          (torch's lerp)
//   exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * g * g
//   master  -= lr / (1 - beta1^step) * exp_avg / (sqrt(exp_avg_sq) / sqrt(1 - beta2^step) + eps)
//   param    = master rounded to the parameter's dtype
// which is torch's AdamW (fused or foreach) on the masters followed by the copy back, in one read
// of (grad, master, exp_avg, exp_avg_sq) and one write of (master, exp_avg, exp_avg_sq, param):
// 28 bytes per bf16 parameter instead of the 40 that cast-in, fused AdamW and cast-out move.
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>

#include "dtype.h"

namespace vpit::cuda {

// One tensor of the update: `numel` elements at each address. `step` points at the tensor's step
// count (a float32 on the device, already advanced to this step's number).
struct MasterAdamWTensor {
  void* param;
  const void* grad;
  float* master;
  float* exp_avg;
  float* exp_avg_sq;
  const float* step;
  int64_t numel;
};

struct AdamWHyper {
  float lr, beta1, beta2, eps, weight_decay;
};

// Tensors per launch: their descriptors travel as a kernel argument (under 4 KiB: 57 bytes each).
constexpr int kMasterAdamWTensorsPerLaunch = 48;

// Updates `count` tensors (any number; launched in groups of kMasterAdamWTensorsPerLaunch), all
// of whose params and grads have `dtype`. Elements of distinct tensors must not overlap.
cudaError_t master_adamw_step(const MasterAdamWTensor* tensors, int64_t count, DType dtype,
                              const AdamWHyper& hyper, int num_sms, cudaStream_t stream);

}  // namespace vpit::cuda
