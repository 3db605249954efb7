#include "scale_inplace.h"

#include "dtypes.cuh"

namespace vpit::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
scale_kernel(T* __restrict__ data, int64_t packs, const float* __restrict__ factor) {
  const float f = *factor;
  if (f == 1.f) return;
  for (int64_t p = int64_t(blockIdx.x) * kThreads + threadIdx.x; p < packs;
       p += int64_t(gridDim.x) * kThreads) {
    float v[VEC];
    load_floats<T, VEC>(data + p * VEC, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] *= f;
    store_floats<T, VEC>(data + p * VEC, v);
  }
}

template <typename T>
cudaError_t scale_typed(T* data, int64_t n, const float* factor, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  constexpr int kVec = 16 / sizeof(T);
  const bool packed = n % kVec == 0 && reinterpret_cast<uintptr_t>(data) % 16 == 0;
  const int64_t packs = packed ? n / kVec : n;
  const unsigned blocks = unsigned(std::min<int64_t>((packs + kThreads - 1) / kThreads, 132 * 16));
  if (packed) {
    scale_kernel<T, kVec><<<blocks, kThreads, 0, stream>>>(data, packs, factor);
  } else {
    scale_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(data, packs, factor);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t scale_inplace(void* data, DType dtype, int64_t n, const float* factor,
                          cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return scale_typed(static_cast<float*>(data), n, factor, stream);
    case DType::kBFloat16: return scale_typed(static_cast<__nv_bfloat16*>(data), n, factor, stream);
    case DType::kFloat16: return scale_typed(static_cast<__half*>(data), n, factor, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace vpit::cuda
