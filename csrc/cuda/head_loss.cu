// Row passes of the fused head loss. The GEMMs around them run through cuBLAS (ATen); these
// kernels are the only full passes over the logits: one read for the online log-sum-exp, one
// read + in-place write of the softmax gradient.
#include "head_loss.h"

#include <cfloat>

#include "dtypes.cuh"

namespace vpit::cuda {
namespace {

constexpr int kRowThreads = 512;
constexpr float kCosineEps = 1e-8f;

// Merge two (max, sum of exp(z - max)) pairs.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float mx = fmaxf(m, m2);
  s = (m == -FLT_MAX ? 0.f : s * expf(m - mx)) + (m2 == -FLT_MAX ? 0.f : s2 * expf(m2 - mx));
  m = mx;
}

// Add one logit to a running (max, sum of exp(z - max)): one exp per element.
__device__ __forceinline__ void accumulate(float& m, float& s, float v) {
  if (v > m) {
    s = s * expf(m - v) + 1.f;
    m = v;
  } else {
    s += expf(v - m);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kRowThreads)
cross_entropy_kernel(T* __restrict__ logits, int64_t ld, int64_t vocab,
                     const int64_t* __restrict__ targets, float grad_scale,
                     float* __restrict__ row_loss) {
  __shared__ float shared_m[kRowThreads / 32], shared_s[kRowThreads / 32];
  __shared__ float shared_max, shared_log_sum;
  T* z = logits + int64_t(blockIdx.x) * ld;
  const int64_t target = targets[blockIdx.x];
  const int64_t packs = vocab / VEC;

  float m = -FLT_MAX, s = 0.f;
  for (int64_t p = threadIdx.x; p < packs; p += kRowThreads) {
    float v[VEC];
    load_floats<T, VEC>(z + p * VEC, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) accumulate(m, s, v[i]);
  }
  for (int64_t j = packs * VEC + threadIdx.x; j < vocab; j += kRowThreads) {
    accumulate(m, s, Float<T>::load(z[j]));
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    merge(m, s, __shfl_xor_sync(0xffffffffu, m, offset), __shfl_xor_sync(0xffffffffu, s, offset));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    shared_m[warp] = m;
    shared_s[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < kRowThreads / 32 ? shared_m[lane] : -FLT_MAX;
    s = lane < kRowThreads / 32 ? shared_s[lane] : 0.f;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      merge(m, s, __shfl_xor_sync(0xffffffffu, m, offset), __shfl_xor_sync(0xffffffffu, s, offset));
    }
    if (lane == 0) {
      // (max - z_t) + log(sum) keeps the digits that lse - z_t would cancel for large logits.
      shared_max = m;
      shared_log_sum = logf(s);
      row_loss[blockIdx.x] = (m - Float<T>::load(z[target])) + shared_log_sum;
    }
  }
  __syncthreads();  // every thread has read its logits; z[target] was read above
  const float max = shared_max, log_sum = shared_log_sum;
  for (int64_t p = threadIdx.x; p < packs; p += kRowThreads) {
    float v[VEC];
    load_floats<T, VEC>(z + p * VEC, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      v[i] = grad_scale * (expf((v[i] - max) - log_sum) - (p * VEC + i == target ? 1.f : 0.f));
    }
    store_floats<T, VEC>(z + p * VEC, v);
  }
  for (int64_t j = packs * VEC + threadIdx.x; j < vocab; j += kRowThreads) {
    const float v = Float<T>::load(z[j]);
    z[j] = Float<T>::store(grad_scale * (expf((v - max) - log_sum) - (j == target ? 1.f : 0.f)));
  }
}

template <typename T>
__global__ void __launch_bounds__(256)
cosine_kernel(const T* __restrict__ pred, const T* __restrict__ target, T* __restrict__ grad_pred,
              int64_t rows, int64_t dim, float grad_scale, float* __restrict__ row_loss) {
  const int64_t row = int64_t(blockIdx.x) * 8 + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const T* p = pred + row * dim;
  const T* t = target + row * dim;
  float pt = 0.f, pp = 0.f, tt = 0.f;
  for (int64_t c = lane; c < dim; c += 32) {
    const float a = Float<T>::load(p[c]), b = Float<T>::load(t[c]);
    pt += a * b;
    pp += a * a;
    tt += b * b;
  }
  pt = warp_sum(pt);
  pp = warp_sum(pp);
  tt = warp_sum(tt);
  const float np = fmaxf(sqrtf(pp), kCosineEps), nt = fmaxf(sqrtf(tt), kCosineEps);
  const float cos = pt / (np * nt);
  if (lane == 0) row_loss[row] = 1.f - cos;
  // d(1 - cos)/dp = -(t / (np nt) - cos p / np^2)
  const float a = -grad_scale / (np * nt), b = grad_scale * cos / (np * np);
  T* g = grad_pred + row * dim;
  for (int64_t c = lane; c < dim; c += 32) {
    g[c] = Float<T>::store(a * Float<T>::load(t[c]) + b * Float<T>::load(p[c]));
  }
}

template <typename T>
cudaError_t cross_entropy_typed(T* logits, int64_t rows, int64_t ld, int64_t vocab,
                                const int64_t* targets, float grad_scale, float* row_loss,
                                cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(T);
  const bool packed = ld % kVec == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0;
  if (packed) {
    cross_entropy_kernel<T, kVec><<<unsigned(rows), kRowThreads, 0, stream>>>(
        logits, ld, vocab, targets, grad_scale, row_loss);
  } else {
    cross_entropy_kernel<T, 1><<<unsigned(rows), kRowThreads, 0, stream>>>(
        logits, ld, vocab, targets, grad_scale, row_loss);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t cosine_typed(const T* pred, const T* target, T* grad_pred, int64_t rows, int64_t dim,
                         float grad_scale, float* row_loss, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  cosine_kernel<T><<<unsigned((rows + 7) / 8), 256, 0, stream>>>(pred, target, grad_pred, rows,
                                                                  dim, grad_scale, row_loss);
  return cudaGetLastError();
}

}  // namespace

cudaError_t cross_entropy_rows(void* logits, DType dtype, int64_t rows, int64_t ld, int64_t vocab,
                               const int64_t* targets, float grad_scale, float* row_loss,
                               cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return cross_entropy_typed(static_cast<float*>(logits), rows, ld, vocab, targets,
                                 grad_scale, row_loss, stream);
    case DType::kBFloat16:
      return cross_entropy_typed(static_cast<__nv_bfloat16*>(logits), rows, ld, vocab, targets,
                                 grad_scale, row_loss, stream);
    case DType::kFloat16:
      return cross_entropy_typed(static_cast<__half*>(logits), rows, ld, vocab, targets,
                                 grad_scale, row_loss, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t cosine_rows(const void* pred, const void* target, void* grad_pred, DType dtype,
                        int64_t rows, int64_t dim, float grad_scale, float* row_loss,
                        cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return cosine_typed(static_cast<const float*>(pred), static_cast<const float*>(target),
                          static_cast<float*>(grad_pred), rows, dim, grad_scale, row_loss, stream);
    case DType::kBFloat16:
      return cosine_typed(static_cast<const __nv_bfloat16*>(pred),
                          static_cast<const __nv_bfloat16*>(target),
                          static_cast<__nv_bfloat16*>(grad_pred), rows, dim, grad_scale, row_loss,
                          stream);
    case DType::kFloat16:
      return cosine_typed(static_cast<const __half*>(pred), static_cast<const __half*>(target),
                          static_cast<__half*>(grad_pred), rows, dim, grad_scale, row_loss, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace vpit::cuda
