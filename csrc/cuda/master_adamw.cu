// Multi-tensor fused AdamW on fp32 masters (see master_adamw.h).
//
// One launch takes up to kMasterAdamWTensorsPerLaunch tensors, their descriptors passed by value.
// Every block walks all of them and, within each, a grid-stride share of its packs of 4 elements
// (16-byte fp32 accesses; 8-byte bf16/fp16 ones), then the scalar tail; a tensor whose addresses
// are not aligned for packs runs scalar. The op is bandwidth-bound: all the work is the 28 bytes
// per element it moves, so the kernel does nothing clever beyond wide accesses.
#include "master_adamw.h"

#include <algorithm>
#include <cmath>

#include "dtypes.cuh"

namespace vpit::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kPack = 4;

struct TensorBatch {
  MasterAdamWTensor t[kMasterAdamWTensorsPerLaunch];
  bool packed[kMasterAdamWTensorsPerLaunch];  // every address aligned for packs (tested on the host)
  int count;
};

// The step's scalars of one tensor, from its device step count.
struct StepScalars {
  float decay;      // 1 - lr * weight_decay
  float step_size;  // lr / (1 - beta1^step)
  float inv_bias2_sqrt;  // 1 / sqrt(1 - beta2^step)
};

__device__ __forceinline__ StepScalars step_scalars(const AdamWHyper& h, float step) {
  const double bias1 = 1.0 - pow(double(h.beta1), double(step));
  const double bias2 = 1.0 - pow(double(h.beta2), double(step));
  return {1.f - h.lr * h.weight_decay, float(double(h.lr) / bias1), float(1.0 / sqrt(bias2))};
}

__device__ __forceinline__ void update(float g, float& master, float& m, float& v, const AdamWHyper& h,
                                       const StepScalars& s) {
  master *= s.decay;
  m += (1.f - h.beta1) * (g - m);
  v = h.beta2 * v + (1.f - h.beta2) * g * g;
  const float denom = sqrtf(v) * s.inv_bias2_sqrt + h.eps;
  master -= s.step_size * m / denom;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) master_adamw_kernel(TensorBatch batch, AdamWHyper h) {
  const int64_t first = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  for (int i = 0; i < batch.count; ++i) {
    const MasterAdamWTensor& t = batch.t[i];
    const StepScalars s = step_scalars(h, *t.step);
    T* param = static_cast<T*>(t.param);
    const T* grad = static_cast<const T*>(t.grad);
    const int64_t packs = batch.packed[i] ? t.numel / kPack : 0;
    for (int64_t p = first; p < packs; p += stride) {
      const int64_t e = p * kPack;
      float g[kPack];
      load_floats<T, kPack>(grad + e, g);
      float4 w = *reinterpret_cast<const float4*>(t.master + e);
      float4 m = *reinterpret_cast<const float4*>(t.exp_avg + e);
      float4 v = *reinterpret_cast<const float4*>(t.exp_avg_sq + e);
      update(g[0], w.x, m.x, v.x, h, s);
      update(g[1], w.y, m.y, v.y, h, s);
      update(g[2], w.z, m.z, v.z, h, s);
      update(g[3], w.w, m.w, v.w, h, s);
      *reinterpret_cast<float4*>(t.master + e) = w;
      *reinterpret_cast<float4*>(t.exp_avg + e) = m;
      *reinterpret_cast<float4*>(t.exp_avg_sq + e) = v;
      const float out[kPack] = {w.x, w.y, w.z, w.w};
      store_floats<T, kPack>(param + e, out);
    }
    for (int64_t e = packs * kPack + first; e < t.numel; e += stride) {  // the tail, or all unpacked
      float w = t.master[e], m = t.exp_avg[e], v = t.exp_avg_sq[e];
      update(Float<T>::load(grad[e]), w, m, v, h, s);
      t.master[e] = w;
      t.exp_avg[e] = m;
      t.exp_avg_sq[e] = v;
      param[e] = Float<T>::store(w);
    }
  }
}

template <typename T>
cudaError_t launch_all(const MasterAdamWTensor* tensors, int64_t count, const AdamWHyper& hyper, int num_sms,
                       cudaStream_t stream) {
  int64_t next = 0;
  while (next < count) {
    TensorBatch batch{};
    int64_t largest = 0;
    for (; next < count && batch.count < kMasterAdamWTensorsPerLaunch; ++next) {
      const MasterAdamWTensor& t = tensors[next];
      if (t.numel == 0) continue;
      batch.packed[batch.count] = is_aligned(t.param, kPack * sizeof(T)) && is_aligned(t.grad, kPack * sizeof(T)) &&
                                  is_aligned(t.master, 16) && is_aligned(t.exp_avg, 16) && is_aligned(t.exp_avg_sq, 16);
      batch.t[batch.count++] = t;
      largest = std::max(largest, t.numel);
    }
    if (batch.count == 0) break;
    // Enough blocks for the largest tensor's packs, at most a few waves of the GPU.
    const int64_t wanted = (largest / kPack + kThreads - 1) / kThreads;
    const int64_t cap = int64_t(std::max(num_sms, 1)) * 8;
    const unsigned blocks = unsigned(std::max<int64_t>(1, std::min(wanted, cap)));
    master_adamw_kernel<T><<<blocks, kThreads, 0, stream>>>(batch, hyper);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t master_adamw_step(const MasterAdamWTensor* tensors, int64_t count, DType dtype,
                              const AdamWHyper& hyper, int num_sms, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_all<float>(tensors, count, hyper, num_sms, stream);
    case DType::kBFloat16: return launch_all<__nv_bfloat16>(tensors, count, hyper, num_sms, stream);
    case DType::kFloat16: return launch_all<__half>(tensors, count, hyper, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace vpit::cuda
