// Fused decode-step projections: matrix-vector products for a few rows that read each weight row
// once, with the neighbouring elementwise work (RMSNorm before, RoPE / SiLU / residual add after)
// folded in, so a decoder layer's decode step is four launches plus attention instead of about
// fifteen. A decode step is bound by reading the weights, and reading at full bandwidth takes
// many bytes in flight (a few MiB over the GPU): more than registers can hold.
//
// Layout of every kernel: blocks of 8 warps; a warp owns one output unit at a time (one or two
// weight rows) and streams its units' weights through a ring of kStages groups in shared memory
// with cp.async, kStages - 1 groups in flight, the next unit's first groups loading while the
// current unit ends. A group is kPairPacks (two-row units) or kSinglePacks (one-row units)
// 16-byte packs per lane per row; each lane reads back only the packs it copied, so no
// synchronisation between lanes is needed. Every input row is
// accumulated against the same weights. Each kernel starts its weight copies before waiting for
// the kernel before it (programmatic dependent launch on Hopper), so weight reads overlap the
// previous kernel's tail. The RMSNorm kernels stage the normalised input rows in shared memory
// (each block recomputes them: a few KiB, far less than the weights the block reads).
#include "decode_layer.h"

#include <cmath>

#include "dtypes.cuh"
#include "pdl.cuh"

namespace vpit::cuda {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxRows = static_cast<int>(kDecodeLayerMaxRows);
constexpr int kStages = 4;  // ring slots per warp; kStages - 1 groups in flight
// 16-byte packs per lane per weight row in one group: a group is 2 KiB per warp either way.
constexpr int kPairPacks = 2;    // two-row units (q/k/v rotary pairs, gate and up)
constexpr int kSinglePacks = 4;  // one-row units (proj_add)
// Blocks per SM (at most 2 fit: each holds a 64 KiB ring): 16 warps an SM keep ~96 KiB in flight.
constexpr int kBlocksPerSm = 2;
constexpr int64_t kRingBytes = kDecodeLayerRingBytes;
static_assert(kRingBytes == int64_t(kWarps) * kStages * 2 * 1024, "a ring slot holds one 2 KiB group per warp");

// v rounded to T, back in fp32: where transformers' modules round an intermediate.
template <typename T>
__device__ __forceinline__ float rounded(float v) {
  return Float<T>::load(Float<T>::store(v));
}

__device__ __forceinline__ void copy_16_async(void* shared, const void* global) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(shared));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(address), "l"(global) : "memory");
}
__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wait_copies() {  // until at most N committed groups are pending
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// One warp's weight stream: the groups of its units (unit first, first + stride, ...; in each,
// the lanes' packs from k = 0 up in steps of kSpan) through a ring of kStages slots in shared
// memory. RowsOf(unit, w) sets the unit's NW weight row pointers ([K] each, contiguous, 16-byte
// aligned).
template <typename T, int NW, int P, typename RowsOf>
struct WeightStream {
  static constexpr int VEC = 16 / sizeof(T);
  static constexpr int64_t kSpan = int64_t(32) * VEC * P;  // elements a warp covers per group
  using PackT = Pack<T, VEC>;

  PackT* ring;  // this warp's [kStages][NW][P][32] packs
  RowsOf rows_of;
  int64_t K, units, stride, groups;  // groups per unit
  int64_t next_unit, next_group;     // the next group to copy
  int lane, copy_slot = 0, read_slot = 0;

  __device__ WeightStream(PackT* ring_, RowsOf rows_of_, int64_t K_, int64_t first, int64_t units_,
                          int64_t stride_)
      : ring(ring_), rows_of(rows_of_), K(K_), units(units_), stride(stride_),
        groups((K_ + kSpan - 1) / kSpan), next_unit(first), next_group(0), lane(threadIdx.x % 32) {}

  __device__ __forceinline__ PackT* slot(int s, int n, int p) const { return ring + ((s * NW + n) * P + p) * 32 + lane; }

  // Copies the next group (if the warp has one left) into the next slot; commits a copy group
  // either way, so every wait counts the same number of groups.
  __device__ __forceinline__ void copy_next() {
    if (next_unit < units && groups > 0) {
      const T* w[NW];
      rows_of(next_unit, w);
      const int64_t k0 = int64_t(lane) * VEC + next_group * kSpan;
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const int64_t k = k0 + int64_t(p) * 32 * VEC;
        if (k < K) {
#pragma unroll
          for (int n = 0; n < NW; ++n) copy_16_async(slot(copy_slot, n, p), w[n] + k);
        }
      }
      if (++next_group == groups) {
        next_group = 0;
        next_unit += stride;
      }
    }
    commit_copies();
    copy_slot = copy_slot + 1 == kStages ? 0 : copy_slot + 1;
  }

  // Fills the ring's kStages - 1 leading slots (call once, before the first unit).
  __device__ __forceinline__ void start() {
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) copy_next();
  }

  // acc[n][r] = <w[n], x[r]> of the current unit, summed over the warp (every lane holds it).
  template <int R>
  __device__ __forceinline__ void dots(const T* x, int64_t x_stride, int rows, float (&acc)[NW][R]) {
#pragma unroll
    for (int n = 0; n < NW; ++n)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[n][r] = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      wait_copies<kStages - 2>();  // this lane's oldest group has landed
      copy_next();
      const int64_t k0 = int64_t(lane) * VEC + g * kSpan;
#pragma unroll
      for (int p = 0; p < P; ++p) {
        const int64_t k = k0 + int64_t(p) * 32 * VEC;
        if (k >= K) break;
        float w[NW][VEC];
#pragma unroll
        for (int n = 0; n < NW; ++n) load_floats<T, VEC>(slot(read_slot, n, p)->v, w[n]);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (r >= rows) break;
          float xv[VEC];
          load_floats<T, VEC>(x + r * x_stride + k, xv);
#pragma unroll
          for (int n = 0; n < NW; ++n)
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[n][r] += w[n][i] * xv[i];
        }
      }
      read_slot = read_slot + 1 == kStages ? 0 : read_slot + 1;
    }
#pragma unroll
    for (int n = 0; n < NW; ++n)
#pragma unroll
      for (int r = 0; r < R; ++r) acc[n][r] = warp_sum(acc[n][r]);
  }

  __device__ __forceinline__ void finish() { wait_copies<0>(); }
};

template <typename T, int NW, int P, typename RowsOf>
__device__ __forceinline__ WeightStream<T, NW, P, RowsOf> weight_stream(void* ring, RowsOf rows_of, int64_t K,
                                                                        int64_t first, int64_t units,
                                                                        int64_t stride) {
  auto* packs = reinterpret_cast<Pack<T, 16 / sizeof(T)>*>(ring) + int64_t(threadIdx.x / 32) * kStages * NW * P * 32;
  return WeightStream<T, NW, P, RowsOf>(packs, rows_of, K, first, units, stride);
}

// Stages weight * RMSNorm(x) of every row into shared memory `out` ([rows, hidden], T), rounded
// as transformers' LlamaRMSNorm rounds: the normalised row to T, then the product to T. Every
// thread sums a strided share of every row; the warps' partial sums meet in shared memory.
template <typename T, int R>
__device__ void stage_rms_norm(const T* x, int64_t x_stride, const T* weight, int64_t hidden,
                               int rows, float eps, T* out) {
  __shared__ float partial[kWarps][kMaxRows];
  __shared__ float inv_rms[kMaxRows];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float sums[R];
#pragma unroll
  for (int r = 0; r < R; ++r) sums[r] = 0.f;
  for (int64_t k = threadIdx.x; k < hidden; k += kThreads) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r >= rows) break;
      const float v = Float<T>::load(x[r * x_stride + k]);
      sums[r] += v * v;
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float total = warp_sum(sums[r]);
    if (lane == 0) partial[warp][r] = total;
  }
  __syncthreads();
  if (threadIdx.x < rows) {
    float total = 0.f;
    for (int w = 0; w < kWarps; ++w) total += partial[w][threadIdx.x];
    inv_rms[threadIdx.x] = rsqrtf(total / static_cast<float>(hidden) + eps);
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < rows * hidden; i += kThreads) {
    const int64_t r = i / hidden, k = i % hidden;
    const float normed = rounded<T>(Float<T>::load(x[r * x_stride + k]) * inv_rms[r]);
    out[i] = Float<T>::store(Float<T>::load(weight[k]) * normed);
  }
  __syncthreads();
}

template <typename T>
__device__ __forceinline__ float bias_at(const T* bias, int64_t i) {
  return bias == nullptr ? 0.f : Float<T>::load(bias[i]);
}

// Dynamic shared memory of a kernel: the weight ring, then (RMSNorm kernels) the staged rows.
__device__ __forceinline__ char* dynamic_shared() {
  extern __shared__ float4 shared4[];  // float4: 16-byte aligned
  return reinterpret_cast<char*>(shared4);
}

// The weight rows of q / k / v unit `unit`: the rotary partners i and i + head_dim / 2 of one head.
struct QkvUnit {
  int part;     // 0: q, 1: k, 2: v
  int64_t head; // within its projection
  int64_t i;    // 0 <= i < head_dim / 2
  int64_t row_a, row_b;
  __device__ QkvUnit(int64_t unit, const QkvRopeShape& s) {
    const int64_t half = s.head_dim / 2, all_head = unit / half;
    i = unit % half;
    part = all_head < s.heads ? 0 : (all_head < s.heads + s.kv_heads ? 1 : 2);
    head = part == 0 ? all_head : (part == 1 ? all_head - s.heads : all_head - s.heads - s.kv_heads);
    row_a = head * s.head_dim + i;
    row_b = row_a + half;
  }
};

template <typename T, int R>
__global__ void __launch_bounds__(kThreads, 2)
qkv_rope_kernel(const T* __restrict__ x, const T* __restrict__ norm_weight, const T* __restrict__ wq,
                const T* __restrict__ wk, const T* __restrict__ wv, const T* __restrict__ bq,
                const T* __restrict__ bk, const T* __restrict__ bv, const float* __restrict__ inv_freq,
                const int64_t* __restrict__ positions, const int64_t* __restrict__ cursor,
                T* __restrict__ query_out, T* __restrict__ key_cache, T* __restrict__ value_cache,
                QkvRopeShape s) {
  allow_next_kernel();
  const int rows = static_cast<int>(s.rows);
  const int lane = threadIdx.x % 32;
  const int64_t half = s.head_dim / 2, D = s.head_dim;
  const int64_t units = (s.heads + 2 * s.kv_heads) * half;
  const int64_t first = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32, stride = int64_t(gridDim.x) * kWarps;
  // The rows of a unit, chosen without indexing a local array (which would live in local memory).
  auto rows_of = [&](int64_t unit, const T* (&w)[2]) {
    const QkvUnit u(unit, s);
    const T* weight = u.part == 0 ? wq : (u.part == 1 ? wk : wv);
    w[0] = weight + u.row_a * s.hidden;
    w[1] = weight + u.row_b * s.hidden;
  };
  char* shared = dynamic_shared();
  auto stream = weight_stream<T, 2, kPairPacks>(shared, rows_of, s.hidden, first, units, stride);
  stream.start();  // weights in flight while the previous kernel ends and the rows are staged
  wait_for_previous_kernel();
  T* xn = reinterpret_cast<T*>(shared + kRingBytes);
  stage_rms_norm<T, R>(x, s.x_stride, norm_weight, s.hidden, rows, s.eps, xn);
  const int64_t slot = *cursor;

  for (int64_t unit = first; unit < units; unit += stride) {
    const QkvUnit u(unit, s);
    float acc[2][R];
    stream.dots(xn, s.hidden, rows, acc);
    // Lane r finishes row r (R <= 32), reading its sums from registers every lane holds.
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r >= rows || lane != r) continue;
      const T* bias = u.part == 0 ? bq : (u.part == 1 ? bk : bv);
      float a = rounded<T>(acc[0][r] + bias_at(bias, u.row_a));
      float b = rounded<T>(acc[1][r] + bias_at(bias, u.row_b));
      if (u.part < 2) {
        // transformers: freqs = position * inv_freq in fp32, cos / sin times the scaling rounded
        // to T, then q * cos + rotate_half(q) * sin with every product and the sum in T. The
        // cosine in double so it stays exact for large angles whatever the math flags.
        const float angle = static_cast<float>(positions[r]) * inv_freq[u.i];
        double sin_d, cos_d;
        sincos(static_cast<double>(angle), &sin_d, &cos_d);
        const float c = rounded<T>(static_cast<float>(cos_d) * s.rope_scale);
        const float sn = rounded<T>(static_cast<float>(sin_d) * s.rope_scale);
        const float ra = rounded<T>(rounded<T>(a * c) + rounded<T>(-b * sn));
        const float rb = rounded<T>(rounded<T>(b * c) + rounded<T>(a * sn));
        a = ra;
        b = rb;
      }
      T* dst;
      if (u.part == 0) {
        dst = query_out + (int64_t(r) * s.heads + u.head) * D;
      } else {
        dst = (u.part == 1 ? key_cache : value_cache) + r * s.cache_stride_r + u.head * s.cache_stride_h +
              slot * s.cache_stride_l;
      }
      dst[u.i] = Float<T>::store(a);
      dst[u.i + half] = Float<T>::store(b);
    }
  }
  stream.finish();
}

template <typename T, int R>
__global__ void __launch_bounds__(kThreads, 2)
gate_up_kernel(const T* __restrict__ x, const T* __restrict__ norm_weight, const T* __restrict__ w_gate,
               const T* __restrict__ w_up, const T* __restrict__ b_gate, const T* __restrict__ b_up,
               T* __restrict__ out, GateUpShape s) {
  allow_next_kernel();
  const int rows = static_cast<int>(s.rows);
  const int lane = threadIdx.x % 32;
  const int64_t first = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32, stride = int64_t(gridDim.x) * kWarps;
  auto rows_of = [&](int64_t n, const T* (&w)[2]) {
    w[0] = w_gate + n * s.hidden;
    w[1] = w_up + n * s.hidden;
  };
  char* shared = dynamic_shared();
  auto stream = weight_stream<T, 2, kPairPacks>(shared, rows_of, s.hidden, first, s.intermediate, stride);
  stream.start();
  wait_for_previous_kernel();
  T* xn = reinterpret_cast<T*>(shared + kRingBytes);
  stage_rms_norm<T, R>(x, s.x_stride, norm_weight, s.hidden, rows, s.eps, xn);

  for (int64_t n = first; n < s.intermediate; n += stride) {
    float acc[2][R];
    stream.dots(xn, s.hidden, rows, acc);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r >= rows || lane != r) continue;
      // transformers: gate and up rounded to T, SiLU in fp32 rounded to T, the product in T.
      const float gate = rounded<T>(acc[0][r] + bias_at(b_gate, n));
      const float up = rounded<T>(acc[1][r] + bias_at(b_up, n));
      const float silu = rounded<T>(gate / (1.f + expf(-gate)));
      out[int64_t(r) * s.intermediate + n] = Float<T>::store(silu * up);
    }
  }
  stream.finish();
}

template <typename T, int R>
__global__ void __launch_bounds__(kThreads, 2)
proj_add_kernel(T* __restrict__ residual, const T* __restrict__ x, const T* __restrict__ weight,
                const T* __restrict__ bias, ProjAddShape s) {
  allow_next_kernel();
  const int rows = static_cast<int>(s.rows);
  const int lane = threadIdx.x % 32;
  const int64_t first = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32, stride = int64_t(gridDim.x) * kWarps;
  auto rows_of = [&](int64_t n, const T* (&w)[1]) { w[0] = weight + n * s.in_features; };
  auto stream = weight_stream<T, 1, kSinglePacks>(dynamic_shared(), rows_of, s.in_features, first,
                                                  s.out_features, stride);
  stream.start();
  wait_for_previous_kernel();
  for (int64_t n = first; n < s.out_features; n += stride) {
    float acc[1][R];
    stream.dots(x, s.x_stride, rows, acc);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r >= rows || lane != r) continue;
      // transformers: the projection (with its bias) rounded to T, then the add in T.
      T* out = residual + r * s.residual_stride + n;
      const float projected = rounded<T>(acc[0][r] + bias_at(bias, n));
      *out = Float<T>::store(Float<T>::load(*out) + projected);
    }
  }
  stream.finish();
}

int grid_for(int64_t units, int num_sms, int blocks_per_sm) {
  const int64_t wanted = (units + kWarps - 1) / kWarps;
  const int64_t most = int64_t(num_sms > 0 ? num_sms : 1) * blocks_per_sm;
  return static_cast<int>(wanted < most ? wanted : most);
}

// Runs Launch<T, R>::run(args...) with the element type of `dtype` and the smallest row count R in
// {1, 2, 4, 8} that holds `rows` (the kernels skip the rows past `rows`).
template <template <typename, int> class Launch, typename T, typename... Args>
cudaError_t with_rows(int64_t rows, Args... args) {
  if (rows <= 1) return Launch<T, 1>::run(args...);
  if (rows <= 2) return Launch<T, 2>::run(args...);
  if (rows <= 4) return Launch<T, 4>::run(args...);
  return Launch<T, 8>::run(args...);
}

template <template <typename, int> class Launch, typename... Args>
cudaError_t dispatch(DType dtype, int64_t rows, Args... args) {
  switch (dtype) {
    case DType::kBFloat16: return with_rows<Launch, __nv_bfloat16>(rows, args...);
    case DType::kFloat16: return with_rows<Launch, __half>(rows, args...);
    default: return with_rows<Launch, float>(rows, args...);
  }
}

template <typename Kernel>
cudaError_t allow_stage(Kernel kernel, int64_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

int64_t element_bytes(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

struct Launch {
  int grid;
  int64_t stage;  // dynamic shared memory, bytes (the weight ring and the staged rows)
  cudaStream_t stream;
  bool programmatic;  // programmatic dependent launch (see wait_for_previous_kernel)
};

template <typename... KernelArgs, typename... Args>
cudaError_t launch(const Launch& l, void (*kernel)(KernelArgs...), Args... args) {
  return launch_kernel(dim3(static_cast<unsigned>(l.grid)), dim3(kThreads), static_cast<size_t>(l.stage), l.stream,
                       l.programmatic, kernel, args...);
}

template <typename T, int R>
struct QkvRope {
  static cudaError_t run(Launch l, const void* x, const void* norm_weight, const void* wq,
                         const void* wk, const void* wv, const void* bq, const void* bk,
                         const void* bv, const float* inv_freq, const int64_t* positions,
                         const int64_t* cursor, void* query_out, void* key_cache,
                         void* value_cache, QkvRopeShape s) {
    const cudaError_t err = allow_stage(qkv_rope_kernel<T, R>, l.stage);
    if (err != cudaSuccess) return err;
    return launch(l, qkv_rope_kernel<T, R>, static_cast<const T*>(x), static_cast<const T*>(norm_weight),
                  static_cast<const T*>(wq), static_cast<const T*>(wk), static_cast<const T*>(wv),
                  static_cast<const T*>(bq), static_cast<const T*>(bk), static_cast<const T*>(bv), inv_freq,
                  positions, cursor, static_cast<T*>(query_out), static_cast<T*>(key_cache),
                  static_cast<T*>(value_cache), s);
  }
};

template <typename T, int R>
struct GateUp {
  static cudaError_t run(Launch l, const void* x, const void* norm_weight, const void* w_gate,
                         const void* w_up, const void* b_gate, const void* b_up, void* out,
                         GateUpShape s) {
    const cudaError_t err = allow_stage(gate_up_kernel<T, R>, l.stage);
    if (err != cudaSuccess) return err;
    return launch(l, gate_up_kernel<T, R>, static_cast<const T*>(x), static_cast<const T*>(norm_weight),
                  static_cast<const T*>(w_gate), static_cast<const T*>(w_up), static_cast<const T*>(b_gate),
                  static_cast<const T*>(b_up), static_cast<T*>(out), s);
  }
};

template <typename T, int R>
struct ProjAdd {
  static cudaError_t run(Launch l, void* residual, const void* x, const void* weight,
                         const void* bias, ProjAddShape s) {
    const cudaError_t err = allow_stage(proj_add_kernel<T, R>, l.stage);
    if (err != cudaSuccess) return err;
    return launch(l, proj_add_kernel<T, R>, static_cast<T*>(residual), static_cast<const T*>(x),
                  static_cast<const T*>(weight), static_cast<const T*>(bias), s);
  }
};

}  // namespace

cudaError_t decode_qkv_rope(const void* x, const void* norm_weight, const void* wq, const void* wk,
                            const void* wv, const void* bq, const void* bk, const void* bv,
                            const float* inv_freq, const int64_t* positions, const int64_t* cursor,
                            void* query_out, void* key_cache, void* value_cache, DType dtype,
                            const QkvRopeShape& s, int num_sms, bool programmatic, cudaStream_t stream) {
  const int64_t units = (s.heads + 2 * s.kv_heads) * (s.head_dim / 2);
  if (s.rows <= 0 || units <= 0) return cudaSuccess;
  if (s.rows > kDecodeLayerMaxRows) return cudaErrorInvalidValue;
  const int64_t stage = s.rows * s.hidden * element_bytes(dtype);
  const Launch l{grid_for(units, num_sms, kBlocksPerSm), kRingBytes + stage, stream, programmatic};
  return dispatch<QkvRope>(dtype, s.rows, l, x, norm_weight, wq, wk, wv, bq, bk, bv, inv_freq,
                           positions, cursor, query_out, key_cache, value_cache, s);
}

cudaError_t decode_gate_up(const void* x, const void* norm_weight, const void* w_gate,
                           const void* w_up, const void* b_gate, const void* b_up, void* out,
                           DType dtype, const GateUpShape& s, int num_sms, bool programmatic,
                           cudaStream_t stream) {
  if (s.rows <= 0 || s.intermediate <= 0) return cudaSuccess;
  if (s.rows > kDecodeLayerMaxRows) return cudaErrorInvalidValue;
  const int64_t stage = s.rows * s.hidden * element_bytes(dtype);
  const Launch l{grid_for(s.intermediate, num_sms, kBlocksPerSm), kRingBytes + stage, stream, programmatic};
  return dispatch<GateUp>(dtype, s.rows, l, x, norm_weight, w_gate, w_up, b_gate, b_up, out, s);
}

cudaError_t decode_proj_add(void* residual, const void* x, const void* weight, const void* bias,
                            DType dtype, const ProjAddShape& s, int num_sms, bool programmatic,
                            cudaStream_t stream) {
  if (s.rows <= 0 || s.out_features <= 0) return cudaSuccess;
  if (s.rows > kDecodeLayerMaxRows) return cudaErrorInvalidValue;
  const Launch l{grid_for(s.out_features, num_sms, kBlocksPerSm), kRingBytes, stream, programmatic};
  return dispatch<ProjAdd>(dtype, s.rows, l, residual, x, weight, bias, s);
}

}  // namespace vpit::cuda
