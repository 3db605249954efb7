// RMSNorm backward in one pass over the rows (see rms_norm.h).
//
// Each warp owns whole rows (a grid-stride set of them, fixed per launch): a first sweep of the
// row sums g * h, a second one writes dx and adds the row's dy * round(h * r) to the warp's own
// dw accumulators in shared memory. The second sweep re-reads the row the first one just read,
// from L1/L2, so DRAM sees dy, h and dh_direct once and dx once. Compiled separately, transformers'
// norm backward reads dy and h a second time for the weight gradient's column sum.
#include "rms_norm.h"

#include <algorithm>

#include "dtypes.cuh"

namespace vpit::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlocksPerSm = 4;
constexpr int kSumWarps = 16;  // row groups of the partial-sum kernel, 32 columns per block

int sm_count() {
  int device = 0, count = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    return 132;
  }
  return count;
}

template <typename T>
__device__ __forceinline__ float rounded(float v) {
  return Float<T>::load(Float<T>::store(v));
}

// Shared memory: kWarps accumulators of `cols` floats, element j of a row stored at
// [(j % VEC) * packs + j / VEC] so the 32 lanes of a warp (consecutive packs) hit 32 banks.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
rms_norm_backward_kernel(const T* __restrict__ dy, const T* __restrict__ dh_direct, const T* __restrict__ h,
                         const float* __restrict__ rstd, const T* __restrict__ w, T* __restrict__ dx,
                         float* __restrict__ dw_partial, int64_t rows, int64_t cols) {
  extern __shared__ float accumulators[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t packs = cols / VEC;
  float* acc = accumulators + warp * cols;
  for (int64_t j = threadIdx.x; j < kWarps * cols; j += kThreads) accumulators[j] = 0.f;
  __syncthreads();

  const float inv_cols = 1.f / float(cols);
  for (int64_t row = int64_t(blockIdx.x) * kWarps + warp; row < rows; row += int64_t(gridDim.x) * kWarps) {
    const int64_t base = row * cols;
    float dot = 0.f;
#pragma unroll 2
    for (int64_t p = lane; p < packs; p += 32) {
      float g[VEC], x[VEC], wv[VEC];
      load_floats<T, VEC>(dy + base + p * VEC, g);
      load_floats<T, VEC>(h + base + p * VEC, x);
      load_floats<T, VEC>(w + p * VEC, wv);
#pragma unroll
      for (int i = 0; i < VEC; ++i) dot += g[i] * wv[i] * x[i];
    }
    dot = warp_sum(dot);
    const float r = rstd[row];
    const float c = r * r * dot * inv_cols;
#pragma unroll 2
    for (int64_t p = lane; p < packs; p += 32) {
      float g[VEC], x[VEC], wv[VEC], out[VEC];
      load_floats<T, VEC>(dy + base + p * VEC, g);
      load_floats<T, VEC>(h + base + p * VEC, x);
      load_floats<T, VEC>(w + p * VEC, wv);
      if (dh_direct != nullptr) {
        load_floats<T, VEC>(dh_direct + base + p * VEC, out);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) out[i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        out[i] += r * (g[i] * wv[i] - x[i] * c);
        acc[i * packs + p] += g[i] * rounded<T>(x[i] * r);
      }
      store_floats<T, VEC>(dx + base + p * VEC, out);
    }
  }
  __syncthreads();
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    const int64_t slot = (j % VEC) * packs + j / VEC;
    float total = 0.f;
#pragma unroll
    for (int k = 0; k < kWarps; ++k) total += accumulators[k * cols + slot];
    dw_partial[int64_t(blockIdx.x) * cols + j] = total;
  }
}

// Block: 32 columns x kSumWarps row groups; group k sums partial rows k, k + kSumWarps, ...,
// then the groups are added in order.
template <typename T>
__global__ void __launch_bounds__(kSumWarps * 32)
sum_partials_kernel(const float* __restrict__ partial, int64_t blocks, int64_t cols, T* __restrict__ out) {
  __shared__ float sums[kSumWarps][32];
  const int lane = threadIdx.x % 32, group = threadIdx.x / 32;
  const int64_t col = int64_t(blockIdx.x) * 32 + lane;
  float s = 0.f;
  if (col < cols) {
#pragma unroll 4
    for (int64_t b = group; b < blocks; b += kSumWarps) s += partial[b * cols + col];
  }
  sums[group][lane] = s;
  __syncthreads();
  if (group == 0 && col < cols) {
    float total = 0.f;
#pragma unroll
    for (int k = 0; k < kSumWarps; ++k) total += sums[k][lane];
    out[col] = Float<T>::store(total);
  }
}

template <typename T>
cudaError_t backward_typed(const T* dy, const T* dh_direct, const T* h, const float* rstd, const T* w, T* dx,
                           float* dw_partial, int64_t rows, int64_t cols, cudaStream_t stream) {
  const int64_t blocks = rms_norm_backward_blocks(rows);
  if (blocks == 0 || cols == 0) return cudaSuccess;
  const size_t smem = size_t(kWarps) * size_t(cols) * sizeof(float);
  constexpr int kVec = 16 / sizeof(T);
  const bool packed = cols % kVec == 0 && is_aligned(dy, 16) && is_aligned(h, 16) && is_aligned(w, 16) &&
                      is_aligned(dx, 16) && (dh_direct == nullptr || is_aligned(dh_direct, 16));
  auto launch = [&](auto kernel) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
    kernel<<<unsigned(blocks), kThreads, smem, stream>>>(dy, dh_direct, h, rstd, w, dx, dw_partial, rows, cols);
    return cudaGetLastError();
  };
  return packed ? launch(rms_norm_backward_kernel<T, kVec>) : launch(rms_norm_backward_kernel<T, 1>);
}

template <typename T>
cudaError_t sum_typed(const float* partial, int64_t blocks, int64_t cols, T* out, cudaStream_t stream) {
  if (cols == 0) return cudaSuccess;
  sum_partials_kernel<T><<<unsigned((cols + 31) / 32), kSumWarps * 32, 0, stream>>>(partial, blocks, cols, out);
  return cudaGetLastError();
}

}  // namespace

int64_t rms_norm_backward_blocks(int64_t rows) {
  return std::min<int64_t>((rows + kWarps - 1) / kWarps, int64_t(sm_count()) * kBlocksPerSm);
}

cudaError_t rms_norm_backward(const void* dy, const void* dh_direct, const void* h, const float* rstd,
                              const void* w, void* dx, float* dw_partial, int64_t rows, int64_t cols,
                              DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return backward_typed(static_cast<const float*>(dy), static_cast<const float*>(dh_direct),
                            static_cast<const float*>(h), rstd, static_cast<const float*>(w),
                            static_cast<float*>(dx), dw_partial, rows, cols, stream);
    case DType::kBFloat16:
      return backward_typed(static_cast<const __nv_bfloat16*>(dy), static_cast<const __nv_bfloat16*>(dh_direct),
                            static_cast<const __nv_bfloat16*>(h), rstd, static_cast<const __nv_bfloat16*>(w),
                            static_cast<__nv_bfloat16*>(dx), dw_partial, rows, cols, stream);
    case DType::kFloat16:
      return backward_typed(static_cast<const __half*>(dy), static_cast<const __half*>(dh_direct),
                            static_cast<const __half*>(h), rstd, static_cast<const __half*>(w),
                            static_cast<__half*>(dx), dw_partial, rows, cols, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t sum_partials(const float* partial, int64_t blocks, int64_t cols, void* out, DType dtype,
                         cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return sum_typed(partial, blocks, cols, static_cast<float*>(out), stream);
    case DType::kBFloat16: return sum_typed(partial, blocks, cols, static_cast<__nv_bfloat16*>(out), stream);
    case DType::kFloat16: return sum_typed(partial, blocks, cols, static_cast<__half*>(out), stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace vpit::cuda
