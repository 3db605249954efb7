// Bilinear token interpolation (align_corners=False) on channels-last tokens, fp32 math.
//
// Forward: one thread per 16-byte pack of an output token (four independent loads, one store, no
// loop), so the source tokens are read once each and the output written once (the byte floor).
// With normalisation one warp owns an output token, to reduce its norm.
// Backward: one warp per *input* token gathers the few output tokens that touched it, so the
// input-sized gradient is written exactly once, zeros included, with no atomics and no memset.
#include "interpolate_tokens.h"

#include <type_traits>

#include "dtypes.cuh"

namespace vpit::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Outputs per axis that can touch one input token on the fast backward path. Downsampling
// touches at most 2; only upsampling beyond ~2x needs the general loop.
constexpr int kMaxTouching = 4;
// Two resident blocks per SM at least: lets ptxas use up to 128 registers without spilling in
// the normalising kernels and the backward gather.
constexpr int kMinBlocks = 2;

// Element offsets (within one image) and weights of the four source tokens of an output token.
struct Corners {
  int64_t offset[4];
  float weight[4];
};

__device__ __forceinline__ Corners corners_of(int out_token, const TokenGrid& g, int64_t channels) {
  const int oy = out_token / g.out_w, ox = out_token % g.out_w;
  const Taps ty = source_taps(oy, g.in_h, g.out_h, axis_scale(g.in_h, g.out_h));
  const Taps tx = source_taps(ox, g.in_w, g.out_w, axis_scale(g.in_w, g.out_w));
  Corners k;
  k.offset[0] = (int64_t(ty.i0) * g.in_w + tx.i0) * channels;  k.weight[0] = ty.w0 * tx.w0;
  k.offset[1] = (int64_t(ty.i0) * g.in_w + tx.i1) * channels;  k.weight[1] = ty.w0 * tx.w1;
  k.offset[2] = (int64_t(ty.i1) * g.in_w + tx.i0) * channels;  k.weight[2] = ty.w1 * tx.w0;
  k.offset[3] = (int64_t(ty.i1) * g.in_w + tx.i1) * channels;  k.weight[3] = ty.w1 * tx.w1;
  return k;
}

template <typename T, int VEC>
__device__ __forceinline__ void interpolate_pack(const T* image, const Corners& k, int64_t c,
                                                 float (&v)[VEC]) {
  float x[4][VEC];
#pragma unroll
  for (int j = 0; j < 4; ++j) load_floats<T, VEC>(image + k.offset[j] + c, x[j]);
#pragma unroll
  for (int i = 0; i < VEC; ++i) {
    v[i] = k.weight[0] * x[0][i] + k.weight[1] * x[1][i] + k.weight[2] * x[2][i] +
           k.weight[3] * x[3][i];
  }
}

// Squared L2 norm of one interpolated output token, reduced over the warp (every lane gets it).
template <typename T, int VEC>
__device__ __forceinline__ float row_sum_squares(const T* image, const Corners& k,
                                                 int64_t channels, int lane) {
  float sum_sq = 0.f;
  for (int64_t c = int64_t(lane) * VEC; c < channels; c += 32 * VEC) {
    float v[VEC];
    interpolate_pack<T, VEC>(image, k, c, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) sum_sq += v[i] * v[i];
  }
  return warp_sum(sum_sq);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t packs, int64_t row_packs,
               int64_t channels, TokenGrid g) {
  const int64_t pack = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (pack >= packs) return;
  const int64_t row = pack / row_packs;
  const int64_t c = (pack - row * row_packs) * VEC;
  const int out_tokens = g.out_h * g.out_w;
  const int64_t in_tokens = int64_t(g.in_h) * g.in_w;
  const T* image = x + (row / out_tokens) * in_tokens * channels;
  const Corners k = corners_of(int(row % out_tokens), g, channels);
  float v[VEC];
  interpolate_pack<T, VEC>(image, k, c, v);
  store_floats<T, VEC>(out + row * channels + c, v);
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
forward_normalize_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t rows, int64_t channels,
               TokenGrid g) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;  // uniform per warp
  const int lane = threadIdx.x % 32;
  const int out_tokens = g.out_h * g.out_w;
  const int64_t in_tokens = int64_t(g.in_h) * g.in_w;
  const T* image = x + (row / out_tokens) * in_tokens * channels;
  const Corners k = corners_of(int(row % out_tokens), g, channels);

  const float sum_sq = row_sum_squares<T, VEC>(image, k, channels, lane);
  const float denom = fmaxf(sqrtf(sum_sq), kNormEps);
  // Second pass re-reads the four source rows, now from L2.
  T* dst = out + row * channels;
  for (int64_t c = int64_t(lane) * VEC; c < channels; c += 32 * VEC) {
    float v[VEC];
    interpolate_pack<T, VEC>(image, k, c, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] /= denom;
    store_floats<T, VEC>(dst + c, v);
  }
}

// Gradient of n / max(||n||, eps) for each output token, into an fp32 buffer:
// (g - y (y.g)) / ||n|| when ||n|| >= eps, g / eps otherwise (as autograd through F.normalize).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
normalize_backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ x,
                          float* __restrict__ grad_values, int64_t rows, int64_t channels,
                          TokenGrid g) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const int out_tokens = g.out_h * g.out_w;
  const int64_t in_tokens = int64_t(g.in_h) * g.in_w;
  const T* image = x + (row / out_tokens) * in_tokens * channels;
  const Corners k = corners_of(int(row % out_tokens), g, channels);
  const T* grad_row = grad_out + row * channels;

  const float sum_sq = row_sum_squares<T, VEC>(image, k, channels, lane);
  const float norm = sqrtf(sum_sq);
  const bool above_eps = norm >= kNormEps;
  const float denom = above_eps ? norm : kNormEps;
  // y.g from y = n / denom itself (not n.g / denom): then a single channel, where y = +-1
  // exactly, gives exactly the zero gradient, as in PyTorch.
  float y_dot_g = 0.f;
  if (above_eps) {
    for (int64_t c = int64_t(lane) * VEC; c < channels; c += 32 * VEC) {
      float v[VEC], gr[VEC];
      interpolate_pack<T, VEC>(image, k, c, v);
      load_floats<T, VEC>(grad_row + c, gr);
#pragma unroll
      for (int i = 0; i < VEC; ++i) y_dot_g += (v[i] / denom) * gr[i];
    }
    y_dot_g = warp_sum(y_dot_g);
  }
  float* dst = grad_values + row * channels;
  for (int64_t c = int64_t(lane) * VEC; c < channels; c += 32 * VEC) {
    float v[VEC], gr[VEC], d[VEC];
    interpolate_pack<T, VEC>(image, k, c, v);
    load_floats<T, VEC>(grad_row + c, gr);
#pragma unroll
    for (int i = 0; i < VEC; ++i) d[i] = (gr[i] - (v[i] / denom) * y_dot_g) / denom;
    store_floats<float, VEC>(dst + c, d);
  }
}

__device__ __forceinline__ float tap_weight(const Taps& t, int i) {
  return (t.i0 == i ? t.w0 : 0.f) + (t.i1 == i ? t.w1 : 0.f);
}

// The outputs along one axis that read input index i, with their weights. `count` may exceed
// kMaxTouching; then only the general path can be used.
struct Touching {
  int count;
  int index[kMaxTouching];
  float weight[kMaxTouching];
};

__device__ __forceinline__ Touching touching_of(int i, int in_size, int out_size) {
  Touching t;
  t.count = 0;
  int first, last;
  touching_outputs(i, in_size, out_size, &first, &last);
  const float scale = axis_scale(in_size, out_size);
  for (int o = first; o <= last; ++o) {
    const float w = tap_weight(source_taps(o, in_size, out_size, scale), i);
    if (w == 0.f) continue;
#pragma unroll
    for (int j = 0; j < kMaxTouching; ++j) {  // constant indices keep the arrays in registers
      if (j == t.count) {
        t.index[j] = o;
        t.weight[j] = w;
      }
    }
    ++t.count;
  }
  return t;
}

// v[i] for a run-time i without indexing the array at run time (which would put it in local memory).
template <typename V, int N>
__device__ __forceinline__ V select(const V (&v)[N], int i) {
  V r = v[0];
#pragma unroll
  for (int k = 1; k < N; ++k) r = i == k ? v[k] : r;
  return r;
}

// G is the type of the incoming gradient: T, or float after the normalisation backward.
template <typename T, typename G, int VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
backward_kernel(const G* __restrict__ grad, T* __restrict__ grad_in, int64_t rows,
                int64_t channels, TokenGrid g) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;
  const int in_tokens = g.in_h * g.in_w;
  const int out_tokens = g.out_h * g.out_w;
  const int token = int(row % in_tokens);
  const int iy = token / g.in_w, ix = token % g.in_w;
  const G* grad_image = grad + (row / in_tokens) * out_tokens * channels;
  T* dst = grad_in + row * channels;
  const Touching ty = touching_of(iy, g.in_h, g.out_h);
  const Touching tx = touching_of(ix, g.in_w, g.out_w);

  if (ty.count <= kMaxTouching && tx.count <= kMaxTouching) {
    for (int64_t c = int64_t(lane) * VEC; c < channels; c += 32 * VEC) {
      float acc[VEC] = {};
#pragma unroll 1  // one output row at a time: up to 4 packs in flight, no spills
      for (int a = 0; a < ty.count; ++a) {
        const int64_t out_row = int64_t(select(ty.index, a)) * g.out_w;
        const float wy = select(ty.weight, a);
#pragma unroll
        for (int b = 0; b < kMaxTouching; ++b) {
          if (b >= tx.count) continue;
          float v[VEC];
          load_floats<G, VEC>(grad_image + (out_row + tx.index[b]) * channels + c, v);
          const float w = wy * tx.weight[b];
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] += w * v[i];
        }
      }
      store_floats<T, VEC>(dst + c, acc);
    }
    return;
  }
  // General path for strong upsampling: walk the touching ranges directly.
  int y_first, y_last, x_first, x_last;
  touching_outputs(iy, g.in_h, g.out_h, &y_first, &y_last);
  touching_outputs(ix, g.in_w, g.out_w, &x_first, &x_last);
  const float scale_h = axis_scale(g.in_h, g.out_h), scale_w = axis_scale(g.in_w, g.out_w);
  for (int64_t c = int64_t(lane) * VEC; c < channels; c += 32 * VEC) {
    float acc[VEC] = {};
    for (int oy = y_first; oy <= y_last; ++oy) {
      const float wy = tap_weight(source_taps(oy, g.in_h, g.out_h, scale_h), iy);
      if (wy == 0.f) continue;
      for (int ox = x_first; ox <= x_last; ++ox) {
        const float wx = tap_weight(source_taps(ox, g.in_w, g.out_w, scale_w), ix);
        if (wx == 0.f) continue;
        float v[VEC];
        load_floats<G, VEC>(grad_image + (int64_t(oy) * g.out_w + ox) * channels + c, v);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] += wy * wx * v[i];
      }
    }
    store_floats<T, VEC>(dst + c, acc);
  }
}


// Widest pack (at most 16 bytes of T) that divides the channels and suits every pointer.
// The fp32 workspace is read with the same VEC, so it must be aligned to VEC floats.
template <typename T>
int pick_vec(int64_t channels, const void* a, const void* b, const void* workspace) {
  for (int vec = 16 / int(sizeof(T)); vec > 1; vec /= 2) {
    if (channels % vec == 0 && is_aligned(a, vec * sizeof(T)) && is_aligned(b, vec * sizeof(T)) &&
        is_aligned(workspace, vec * sizeof(float))) {
      return vec;
    }
  }
  return 1;
}

dim3 grid_for(int64_t rows) { return dim3(static_cast<unsigned>((rows + kWarps - 1) / kWarps)); }

// Calls launch(std::integral_constant<int, VEC>) for the picked pack width; widths above
// MaxVec are never instantiated (fp32 packs of 8 would need 32-byte accesses and spill).
template <int MaxVec, typename Launch>
void dispatch_vec(int vec, Launch&& launch) {
  if constexpr (MaxVec >= 8) {
    if (vec == 8) return launch(std::integral_constant<int, 8>{});
  }
  if (vec >= 4) return launch(std::integral_constant<int, 4>{});
  if (vec == 2) return launch(std::integral_constant<int, 2>{});
  launch(std::integral_constant<int, 1>{});
}

template <typename T>
cudaError_t forward_typed(const T* x, T* out, int64_t batch, int64_t channels, TokenGrid g,
                          bool normalize, cudaStream_t stream) {
  const int64_t rows = batch * g.out_h * g.out_w;
  if (rows == 0 || channels == 0) return cudaSuccess;
  dispatch_vec<16 / sizeof(T)>(pick_vec<T>(channels, x, out, nullptr), [&](auto vec) {
    if (normalize) {
      forward_normalize_kernel<T, vec()><<<grid_for(rows), kThreads, 0, stream>>>(
          x, out, rows, channels, g);
    } else {
      const int64_t row_packs = channels / vec(), packs = rows * row_packs;
      const dim3 blocks(static_cast<unsigned>((packs + kThreads - 1) / kThreads));
      forward_kernel<T, vec()><<<blocks, kThreads, 0, stream>>>(x, out, packs, row_packs,
                                                                 channels, g);
    }
  });
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const T* grad_out, const T* x, T* grad_in, float* workspace,
                           int64_t batch, int64_t channels, TokenGrid g, bool normalize,
                           cudaStream_t stream) {
  const int64_t out_rows = batch * g.out_h * g.out_w;
  const int64_t in_rows = batch * g.in_h * g.in_w;
  if (in_rows == 0 || channels == 0) return cudaSuccess;
  if (!normalize) {
    dispatch_vec<16 / sizeof(T)>(pick_vec<T>(channels, grad_out, grad_in, nullptr), [&](auto vec) {
      backward_kernel<T, T, vec()><<<grid_for(in_rows), kThreads, 0, stream>>>(
          grad_out, grad_in, in_rows, channels, g);
    });
    return cudaGetLastError();
  }
  dispatch_vec<16 / sizeof(T)>(pick_vec<T>(channels, grad_out, x, workspace), [&](auto vec) {
    normalize_backward_kernel<T, vec()><<<grid_for(out_rows), kThreads, 0, stream>>>(
        grad_out, x, workspace, out_rows, channels, g);
  });
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // The gather now reads the fp32 workspace: packs of at most 4 floats.
  dispatch_vec<4>(pick_vec<float>(channels, grad_in, nullptr, workspace), [&](auto vec) {
    backward_kernel<T, float, vec()><<<grid_for(in_rows), kThreads, 0, stream>>>(
        workspace, grad_in, in_rows, channels, g);
  });
  return cudaGetLastError();
}

}  // namespace

cudaError_t interpolate_tokens_forward(const void* x, void* out, DType dtype, int64_t batch,
                                       int64_t channels, TokenGrid grid, bool normalize,
                                       cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return forward_typed(static_cast<const float*>(x), static_cast<float*>(out), batch,
                           channels, grid, normalize, stream);
    case DType::kBFloat16:
      return forward_typed(static_cast<const __nv_bfloat16*>(x), static_cast<__nv_bfloat16*>(out),
                           batch, channels, grid, normalize, stream);
    case DType::kFloat16:
      return forward_typed(static_cast<const __half*>(x), static_cast<__half*>(out), batch,
                           channels, grid, normalize, stream);
  }
  return cudaErrorInvalidValue;
}

int64_t interpolate_tokens_backward_workspace(int64_t batch, int64_t channels, TokenGrid grid,
                                              bool normalize) {
  return normalize ? batch * grid.out_h * grid.out_w * channels * int64_t(sizeof(float)) : 0;
}

cudaError_t interpolate_tokens_backward(const void* grad_out, const void* x, void* grad_in,
                                        void* workspace, DType dtype, int64_t batch,
                                        int64_t channels, TokenGrid grid, bool normalize,
                                        cudaStream_t stream) {
  float* ws = static_cast<float*>(workspace);
  switch (dtype) {
    case DType::kFloat32:
      return backward_typed(static_cast<const float*>(grad_out), static_cast<const float*>(x),
                            static_cast<float*>(grad_in), ws, batch, channels, grid, normalize,
                            stream);
    case DType::kBFloat16:
      return backward_typed(static_cast<const __nv_bfloat16*>(grad_out),
                            static_cast<const __nv_bfloat16*>(x),
                            static_cast<__nv_bfloat16*>(grad_in), ws, batch, channels, grid,
                            normalize, stream);
    case DType::kFloat16:
      return backward_typed(static_cast<const __half*>(grad_out), static_cast<const __half*>(x),
                            static_cast<__half*>(grad_in), ws, batch, channels, grid, normalize,
                            stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace vpit::cuda
