#include "segment_attention.h"

#include <mma.h>

#include <cmath>
#include <type_traits>

#include "dtypes.cuh"

namespace vpit::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTile = 16;                 // WMMA tile edge: rows, keys and head-dim steps
constexpr int kChunk = kWarps * kTile;    // rows (forward, dQ) or keys (dK/dV) per block
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Shared-memory rows of head_dim elements are padded by 8 so that the 16 rows a WMMA load
// reads start in different banks; 16-element multiples keep every tile 32-byte aligned.
template <int D>
constexpr int kLd = D + 8;

__host__ __device__ constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }

// The 8 consecutive floats a lane pair's half row holds, as two 16-byte reads (bank-friendlier
// than 8 scalar reads at a stride of 8 floats across lanes).
__device__ __forceinline__ void load8(const float* p, float (&x)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  x[0] = a.x; x[1] = a.y; x[2] = a.z; x[3] = a.w; x[4] = b.x; x[5] = b.y; x[6] = b.z; x[7] = b.w;
}

template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, kTile, kTile, kTile, T, wmma::row_major>;
template <typename T>
using FragBRow = wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::row_major>;
template <typename T>
using FragBCol = wmma::fragment<wmma::matrix_b, kTile, kTile, kTile, T, wmma::col_major>;
using FragAcc = wmma::fragment<wmma::accumulator, kTile, kTile, kTile, float>;

struct Segment {
  int64_t start;
  int length;
};

// Segment `s` from the boundaries, clamped to [0, tokens) and to max_seqlen so that a bad
// boundary can never read or write outside the tensors or the staged shared memory.
__device__ __forceinline__ Segment load_segment(const int32_t* cu, int s, int64_t tokens,
                                                int max_seqlen) {
  int64_t start = cu[s], end = cu[s + 1];
  start = start < 0 ? 0 : (start > tokens ? tokens : start);
  end = end < start ? start : (end > tokens ? tokens : end);
  const int64_t length = end - start;
  return {start, int(length < max_seqlen ? length : max_seqlen)};
}

// Copies `rows` rows of D elements (global row stride `stride` elements) into shared memory with
// row stride kLd<D>; rows at or past `valid` are zero-filled. Called by `threads` threads.
template <typename T, int D>
__device__ __forceinline__ void stage_rows(T* dst, const T* src, int64_t stride, int rows,
                                           int valid, int thread, int threads) {
  constexpr int kPacks = D / 8;  // 16-byte packs per row
  for (int idx = thread; idx < rows * kPacks; idx += threads) {
    const int r = idx / kPacks, p = idx % kPacks;
    uint4 value = make_uint4(0, 0, 0, 0);
    if (r < valid) value = *reinterpret_cast<const uint4*>(src + r * stride + p * 8);
    *reinterpret_cast<uint4*>(dst + r * kLd<D> + p * 8) = value;
  }
}

// Writes the warp's 16 x D fp32 tile (row stride D) to `valid` global rows of stride `stride`.
template <typename T, int D>
__device__ __forceinline__ void write_tile(T* dst, const float* tile, int64_t stride, int valid,
                                           int lane) {
  constexpr int kPacks = D / 8;
  for (int idx = lane; idx < kTile * kPacks; idx += 32) {
    const int r = idx / kPacks, p = idx % kPacks;
    if (r >= valid) continue;
    float values[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) values[e] = tile[r * D + p * 8 + e];
    store_floats<T, 8>(dst + r * stride + p * 8, values);
  }
}

// acc = A[16 x D] * B^T where B is a 16 x D row-major tile (so B^T is read column-major).
template <typename T, int D>
__device__ __forceinline__ void product_transposed(FragAcc& acc, const FragA<T> (&a)[D / kTile],
                                                   const T* b, int ldb) {
  wmma::fill_fragment(acc, 0.f);
#pragma unroll
  for (int d = 0; d < D / kTile; ++d) {
    FragBCol<T> frag;
    wmma::load_matrix_sync(frag, b + d * kTile, ldb);
    wmma::mma_sync(acc, a[d], frag, acc);
  }
}

// acc[n] += A[16 x 16] * B[16 x D] for the D / 16 column tiles n of B (row-major, stride ldb).
template <typename T, int D>
__device__ __forceinline__ void accumulate_product(FragAcc (&acc)[D / kTile], const T* a_tile,
                                                   const T* b, int ldb) {
  FragA<T> a;
  wmma::load_matrix_sync(a, a_tile, kTile);
#pragma unroll
  for (int n = 0; n < D / kTile; ++n) {
    FragBRow<T> frag;
    wmma::load_matrix_sync(frag, b + n * kTile, ldb);
    wmma::mma_sync(acc[n], a, frag, acc[n]);
  }
}

// The same with A read from a 16 x D shared-memory tile (row stride kLd<D>) step by step, for
// kernels whose accumulators leave no registers to hold A.
template <typename T, int D>
__device__ __forceinline__ void product_transposed_smem(FragAcc& acc, const T* a_rows, const T* b, int ldb) {
  wmma::fill_fragment(acc, 0.f);
#pragma unroll
  for (int d = 0; d < D / kTile; ++d) {
    FragA<T> a;
    FragBCol<T> frag;
    wmma::load_matrix_sync(a, a_rows + d * kTile, kLd<D>);
    wmma::load_matrix_sync(frag, b + d * kTile, ldb);
    wmma::mma_sync(acc, a, frag, acc);
  }
}

template <typename T, int D>
__device__ __forceinline__ void load_a_rows(FragA<T> (&a)[D / kTile], const T* rows) {
#pragma unroll
  for (int d = 0; d < D / kTile; ++d) wmma::load_matrix_sync(a[d], rows + d * kTile, kLd<D>);
}

template <int D>
__device__ __forceinline__ void store_acc(float* tile, FragAcc (&acc)[D / kTile], float scale) {
#pragma unroll
  for (int n = 0; n < D / kTile; ++n) {
#pragma unroll
    for (int e = 0; e < acc[n].num_elements; ++e) acc[n].x[e] *= scale;
    wmma::store_matrix_sync(tile + n * kTile, acc[n], D, wmma::mem_row_major);
  }
}

// ---- shared-memory layouts (bytes; every region 128-byte aligned) ----------------------------

__host__ __device__ constexpr int align128(int bytes) { return round_up(bytes, 128); }

template <typename T, int D>
struct ForwardLayout {  // staged K and V, then per warp: Q tile, fp32 scores/output, P tile
  int staged_rows;
  __host__ __device__ int kv_bytes() const { return align128(staged_rows * kLd<D> * int(sizeof(T))); }
  __host__ __device__ static constexpr int warp_bytes() {
    return align128(kTile * kLd<D> * sizeof(T)) + align128(kTile * D * 4) +
           align128(kTile * kTile * sizeof(T));
  }
  __host__ __device__ int total() const { return 2 * kv_bytes() + kWarps * warp_bytes(); }
};

template <typename T, int D>
struct GradQLayout {  // staged K and V, then per warp: Q and dO tiles, fp32 S/dQ, fp32 dP, dS
  int staged_rows;
  __host__ __device__ int kv_bytes() const { return align128(staged_rows * kLd<D> * int(sizeof(T))); }
  __host__ __device__ static constexpr int warp_bytes() {
    return 2 * align128(kTile * kLd<D> * sizeof(T)) + align128(kTile * D * 4) +
           align128(kTile * kTile * 4) + align128(kTile * kTile * sizeof(T));
  }
  __host__ __device__ int total() const { return 2 * kv_bytes() + kWarps * warp_bytes(); }
};

template <typename T, int D>
struct GradKVLayout {  // staged Q, dO, lse, delta of one head, then per warp: K and V tiles,
                       // fp32 S/dK/dV, fp32 dP, P and dS tiles
  int staged_rows;
  __host__ __device__ int rows_bytes() const { return align128(staged_rows * kLd<D> * int(sizeof(T))); }
  __host__ __device__ int stats_bytes() const { return align128(staged_rows * 4); }
  __host__ __device__ static constexpr int warp_bytes() {
    return 2 * align128(kTile * kLd<D> * sizeof(T)) + align128(kTile * D * 4) +
           align128(kTile * kTile * 4) + 2 * align128(kTile * kTile * sizeof(T));
  }
  __host__ __device__ int total() const { return 2 * rows_bytes() + 2 * stats_bytes() + kWarps * warp_bytes(); }
};

struct Params {
  int64_t tokens;
  int heads, kv_heads, group, chunks, max_seqlen, staged_rows;
  float scale, scale_log2;
};

// ---- forward ---------------------------------------------------------------------------------

// Block: (segment, chunk of 64 query rows) x query head. Each warp owns 16 rows: a first pass over
// the keys finds each row's max and sum, a second accumulates softmax(S) V in fp32 fragments.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
               const int32_t* __restrict__ cu, T* __restrict__ out, float* __restrict__ lse,
               Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int seg = blockIdx.x / p.chunks, chunk = blockIdx.x % p.chunks, h = blockIdx.y;
  const int kh = h / p.group;
  const Segment s = load_segment(cu, seg, p.tokens, p.max_seqlen);
  const int row0 = chunk * kChunk;
  if (row0 >= s.length) return;
  const int rows_end = min(row0 + kChunk, s.length);
  const int staged = round_up(rows_end, kTile);  // keys 0 .. rows_end - 1 (causal)

  const ForwardLayout<T, D> layout{p.staged_rows};
  T* ks = reinterpret_cast<T*>(smem);
  T* vs = reinterpret_cast<T*>(smem + layout.kv_bytes());
  const int64_t kv_stride = int64_t(p.kv_heads) * D, q_stride = int64_t(p.heads) * D;
  stage_rows<T, D>(ks, k + s.start * kv_stride + kh * D, kv_stride, staged, rows_end, threadIdx.x, kThreads);
  stage_rows<T, D>(vs, v + s.start * kv_stride + kh * D, kv_stride, staged, rows_end, threadIdx.x, kThreads);
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tile = chunk * kWarps + warp, i0 = tile * kTile;
  if (i0 >= rows_end) return;
  unsigned char* mine = smem + 2 * layout.kv_bytes() + warp * layout.warp_bytes();
  T* q_tile = reinterpret_cast<T*>(mine);
  float* scratch = reinterpret_cast<float*>(mine + align128(kTile * kLd<D> * sizeof(T)));
  T* p_tile = reinterpret_cast<T*>(mine + align128(kTile * kLd<D> * sizeof(T)) + align128(kTile * D * 4));

  const T* q_rows = q + (s.start + i0) * q_stride + h * D;
  stage_rows<T, D>(q_tile, q_rows, q_stride, kTile, s.length - i0, lane, 32);
  __syncwarp();
  FragA<T> a_q[D / kTile];
  load_a_rows<T, D>(a_q, q_tile);

  // Lane pair (2r, 2r+1) owns row r of the tile, 8 of its 16 columns each.
  const int r = lane >> 1, c0 = (lane & 1) * 8, i = i0 + r;
  float m = -INFINITY, l = 0.f;
  for (int kt = 0; kt <= tile; ++kt) {
    FragAcc acc;
    product_transposed<T, D>(acc, a_q, ks + kt * kTile * kLd<D>, kLd<D>);
    wmma::store_matrix_sync(scratch, acc, kTile, wmma::mem_row_major);
    __syncwarp();
    float scores[8];
    load8(scratch + r * kTile + c0, scores);
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const int j = kt * kTile + c0 + c;
      if (j > i || j >= s.length) continue;
      const float x = scores[c] * p.scale_log2;
      if (x > m) {
        l *= exp2f(m - x);
        m = x;
      }
      l += exp2f(x - m);
    }
    __syncwarp();
  }
  const float m_other = __shfl_xor_sync(0xffffffffu, m, 1), l_other = __shfl_xor_sync(0xffffffffu, l, 1);
  const float row_max = fmaxf(m, m_other);  // finite: key 0 is visible to every row
  const float row_sum = (m == -INFINITY ? 0.f : l * exp2f(m - row_max)) +
                        (m_other == -INFINITY ? 0.f : l_other * exp2f(m_other - row_max));
  const float inv_sum = 1.f / row_sum;

  FragAcc acc_o[D / kTile];
#pragma unroll
  for (int n = 0; n < D / kTile; ++n) wmma::fill_fragment(acc_o[n], 0.f);
  for (int kt = 0; kt <= tile; ++kt) {
    FragAcc acc;
    product_transposed<T, D>(acc, a_q, ks + kt * kTile * kLd<D>, kLd<D>);
    wmma::store_matrix_sync(scratch, acc, kTile, wmma::mem_row_major);
    __syncwarp();
    float probs[8];
    load8(scratch + r * kTile + c0, probs);
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const int j = kt * kTile + c0 + c;
      const bool visible = j <= i && j < s.length;
      probs[c] = visible ? exp2f(probs[c] * p.scale_log2 - row_max) * inv_sum : 0.f;
    }
    store_floats<T, 8>(p_tile + r * kTile + c0, probs);
    __syncwarp();
    accumulate_product<T, D>(acc_o, p_tile, vs + kt * kTile * kLd<D>, kLd<D>);
    __syncwarp();
  }
  store_acc<D>(scratch, acc_o, 1.f);
  __syncwarp();
  write_tile<T, D>(out + (s.start + i0) * q_stride + h * D, scratch, q_stride, s.length - i0, lane);
  if ((lane & 1) == 0 && i < s.length) lse[h * p.tokens + s.start + i] = (row_max + log2f(row_sum)) * kLn2;
}

// ---- backward --------------------------------------------------------------------------------

// delta[h, t] = sum_d grad_out[t, h, d] * out[t, h, d]; D / 8 lanes per row.
template <typename T, int D>
__global__ void __launch_bounds__(256)
delta_kernel(const T* __restrict__ grad_out, const T* __restrict__ out, float* __restrict__ delta,
             int64_t tokens, int heads) {
  constexpr int kLanes = D / 8;
  const int64_t row = (int64_t(blockIdx.x) * 256 + threadIdx.x) / kLanes;
  const int part = threadIdx.x % kLanes;
  float sum = 0.f;
  if (row < tokens * heads) {
    float g[8], o[8];
    load_floats<T, 8>(grad_out + row * D + part * 8, g);
    load_floats<T, 8>(out + row * D + part * 8, o);
#pragma unroll
    for (int e = 0; e < 8; ++e) sum += g[e] * o[e];
  }
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (part == 0 && row < tokens * heads) {
    const int64_t t = row / heads;
    const int h = int(row % heads);
    delta[h * tokens + t] = sum;
  }
}

// dQ. Block: (segment, chunk of 64 query rows) x query head, keys and values staged; each warp
// owns 16 rows: dS = P * (dO V^T - delta), dQ = scale * dS K.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
grad_q_kernel(const T* __restrict__ grad_out, const T* __restrict__ q, const T* __restrict__ k,
              const T* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ delta,
              const int32_t* __restrict__ cu, T* __restrict__ grad_q, Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int seg = blockIdx.x / p.chunks, chunk = blockIdx.x % p.chunks, h = blockIdx.y;
  const int kh = h / p.group;
  const Segment s = load_segment(cu, seg, p.tokens, p.max_seqlen);
  const int row0 = chunk * kChunk;
  if (row0 >= s.length) return;
  const int rows_end = min(row0 + kChunk, s.length);
  const int staged = round_up(rows_end, kTile);

  const GradQLayout<T, D> layout{p.staged_rows};
  T* ks = reinterpret_cast<T*>(smem);
  T* vs = reinterpret_cast<T*>(smem + layout.kv_bytes());
  const int64_t kv_stride = int64_t(p.kv_heads) * D, q_stride = int64_t(p.heads) * D;
  stage_rows<T, D>(ks, k + s.start * kv_stride + kh * D, kv_stride, staged, rows_end, threadIdx.x, kThreads);
  stage_rows<T, D>(vs, v + s.start * kv_stride + kh * D, kv_stride, staged, rows_end, threadIdx.x, kThreads);
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tile = chunk * kWarps + warp, i0 = tile * kTile;
  if (i0 >= rows_end) return;
  constexpr int kRowTile = align128(kTile * kLd<D> * sizeof(T));
  unsigned char* mine = smem + 2 * layout.kv_bytes() + warp * layout.warp_bytes();
  T* q_tile = reinterpret_cast<T*>(mine);
  T* do_tile = reinterpret_cast<T*>(mine + kRowTile);
  float* scratch = reinterpret_cast<float*>(mine + 2 * kRowTile);
  float* dp_tile = reinterpret_cast<float*>(mine + 2 * kRowTile + align128(kTile * D * 4));
  T* ds_tile = reinterpret_cast<T*>(mine + 2 * kRowTile + align128(kTile * D * 4) + align128(kTile * kTile * 4));

  const int64_t row_offset = (s.start + i0) * q_stride + h * D;
  stage_rows<T, D>(q_tile, q + row_offset, q_stride, kTile, s.length - i0, lane, 32);
  stage_rows<T, D>(do_tile, grad_out + row_offset, q_stride, kTile, s.length - i0, lane, 32);
  __syncwarp();
  FragA<T> a_q[D / kTile], a_do[D / kTile];
  load_a_rows<T, D>(a_q, q_tile);
  load_a_rows<T, D>(a_do, do_tile);

  const int r = lane >> 1, c0 = (lane & 1) * 8, i = i0 + r;
  const bool row_valid = i < s.length;
  const float row_lse = row_valid ? lse[h * p.tokens + s.start + i] * kLog2e : 0.f;
  const float row_delta = row_valid ? delta[h * p.tokens + s.start + i] : 0.f;

  FragAcc acc_dq[D / kTile];
#pragma unroll
  for (int n = 0; n < D / kTile; ++n) wmma::fill_fragment(acc_dq[n], 0.f);
  for (int kt = 0; kt <= tile; ++kt) {
    FragAcc acc;
    product_transposed<T, D>(acc, a_q, ks + kt * kTile * kLd<D>, kLd<D>);
    wmma::store_matrix_sync(scratch, acc, kTile, wmma::mem_row_major);
    product_transposed<T, D>(acc, a_do, vs + kt * kTile * kLd<D>, kLd<D>);
    wmma::store_matrix_sync(dp_tile, acc, kTile, wmma::mem_row_major);
    __syncwarp();
    float scores[8], dp[8];
    load8(scratch + r * kTile + c0, scores);
    load8(dp_tile + r * kTile + c0, dp);
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const int j = kt * kTile + c0 + c;
      const bool visible = row_valid && j <= i && j < s.length;
      const float prob = visible ? exp2f(scores[c] * p.scale_log2 - row_lse) : 0.f;
      dp[c] = prob * (dp[c] - row_delta);
    }
    store_floats<T, 8>(ds_tile + r * kTile + c0, dp);
    __syncwarp();
    accumulate_product<T, D>(acc_dq, ds_tile, ks + kt * kTile * kLd<D>, kLd<D>);
    __syncwarp();
  }
  store_acc<D>(scratch, acc_dq, p.scale);
  __syncwarp();
  write_tile<T, D>(grad_q + row_offset, scratch, q_stride, s.length - i0, lane);
}

// dK and dV. Block: (segment, chunk of 64 keys) x K/V head; each warp owns 16 keys and sums over
// the group's query heads (staged one at a time) and every later row:
// dV += P^T dO, dK += scale * dS^T Q.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
grad_kv_kernel(const T* __restrict__ grad_out, const T* __restrict__ q, const T* __restrict__ k,
               const T* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ delta,
               const int32_t* __restrict__ cu, T* __restrict__ grad_k, T* __restrict__ grad_v, Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int seg = blockIdx.x / p.chunks, chunk = blockIdx.x % p.chunks, kh = blockIdx.y;
  const Segment s = load_segment(cu, seg, p.tokens, p.max_seqlen);
  const int key0 = chunk * kChunk;
  if (key0 >= s.length) return;
  const int key_end = min(key0 + kChunk, s.length);
  const int row_base = key0;  // rows before the chunk's first key see none of its keys
  const int staged = round_up(s.length - row_base, kTile);

  const GradKVLayout<T, D> layout{p.staged_rows};
  T* qs = reinterpret_cast<T*>(smem);
  T* dos = reinterpret_cast<T*>(smem + layout.rows_bytes());
  float* lse_s = reinterpret_cast<float*>(smem + 2 * layout.rows_bytes());
  float* delta_s = reinterpret_cast<float*>(smem + 2 * layout.rows_bytes() + layout.stats_bytes());

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tile = chunk * kWarps + warp, j0 = tile * kTile;
  const bool active = j0 < key_end;
  constexpr int kRowTile = align128(kTile * kLd<D> * sizeof(T));
  unsigned char* mine = smem + 2 * layout.rows_bytes() + 2 * layout.stats_bytes() + warp * layout.warp_bytes();
  T* k_tile = reinterpret_cast<T*>(mine);
  T* v_tile = reinterpret_cast<T*>(mine + kRowTile);
  float* scratch = reinterpret_cast<float*>(mine + 2 * kRowTile);
  float* dp_tile = reinterpret_cast<float*>(mine + 2 * kRowTile + align128(kTile * D * 4));
  T* p_tile = reinterpret_cast<T*>(mine + 2 * kRowTile + align128(kTile * D * 4) + align128(kTile * kTile * 4));
  T* ds_tile = p_tile + align128(kTile * kTile * sizeof(T)) / sizeof(T);

  const int64_t kv_stride = int64_t(p.kv_heads) * D, q_stride = int64_t(p.heads) * D;
  const int64_t kv_offset = (s.start + j0) * kv_stride + kh * D;
  if (active) {
    stage_rows<T, D>(k_tile, k + kv_offset, kv_stride, kTile, key_end - j0, lane, 32);
    stage_rows<T, D>(v_tile, v + kv_offset, kv_stride, kTile, key_end - j0, lane, 32);
    __syncwarp();
  }
  FragAcc acc_dk[D / kTile], acc_dv[D / kTile];
#pragma unroll
  for (int n = 0; n < D / kTile; ++n) {
    wmma::fill_fragment(acc_dk[n], 0.f);
    wmma::fill_fragment(acc_dv[n], 0.f);
  }

  const int r = lane >> 1, c0 = (lane & 1) * 8, j = j0 + r;  // lane pair (2r, 2r+1): key r
  const int valid_rows = s.length - row_base;
  for (int g = 0; g < p.group; ++g) {
    const int h = kh * p.group + g;
    __syncthreads();  // the previous head's rows are no longer read
    const int64_t row_offset = (s.start + row_base) * q_stride + h * D;
    stage_rows<T, D>(qs, q + row_offset, q_stride, staged, valid_rows, threadIdx.x, kThreads);
    stage_rows<T, D>(dos, grad_out + row_offset, q_stride, staged, valid_rows, threadIdx.x, kThreads);
    for (int idx = threadIdx.x; idx < staged; idx += kThreads) {
      const bool valid = idx < valid_rows;
      const int64_t at = h * p.tokens + s.start + row_base + idx;
      lse_s[idx] = valid ? lse[at] * kLog2e : 0.f;
      delta_s[idx] = valid ? delta[at] : 0.f;
    }
    __syncthreads();
    if (!active) continue;
    for (int i0 = j0; i0 < s.length; i0 += kTile) {
      const int local = i0 - row_base;
      FragAcc acc;
      product_transposed_smem<T, D>(acc, k_tile, qs + local * kLd<D>, kLd<D>);  // S^T: keys x rows
      wmma::store_matrix_sync(scratch, acc, kTile, wmma::mem_row_major);
      product_transposed_smem<T, D>(acc, v_tile, dos + local * kLd<D>, kLd<D>);  // dP^T
      wmma::store_matrix_sync(dp_tile, acc, kTile, wmma::mem_row_major);
      __syncwarp();
      float scores[8], dp[8], row_lse[8], row_delta[8];
      load8(scratch + r * kTile + c0, scores);
      load8(dp_tile + r * kTile + c0, dp);
      load8(lse_s + local + c0, row_lse);
      load8(delta_s + local + c0, row_delta);
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        const int i = i0 + c0 + c;
        const bool visible = j <= i && i < s.length && j < key_end;
        scores[c] = visible ? exp2f(scores[c] * p.scale_log2 - row_lse[c]) : 0.f;
        dp[c] = scores[c] * (dp[c] - row_delta[c]);
      }
      store_floats<T, 8>(p_tile + r * kTile + c0, scores);
      store_floats<T, 8>(ds_tile + r * kTile + c0, dp);
      __syncwarp();
      accumulate_product<T, D>(acc_dv, p_tile, dos + local * kLd<D>, kLd<D>);
      accumulate_product<T, D>(acc_dk, ds_tile, qs + local * kLd<D>, kLd<D>);
      __syncwarp();
    }
  }
  if (!active) return;
  store_acc<D>(scratch, acc_dk, p.scale);
  __syncwarp();
  write_tile<T, D>(grad_k + kv_offset, scratch, kv_stride, key_end - j0, lane);
  __syncwarp();
  store_acc<D>(scratch, acc_dv, 1.f);
  __syncwarp();
  write_tile<T, D>(grad_v + kv_offset, scratch, kv_stride, key_end - j0, lane);
}

// ---- launchers -------------------------------------------------------------------------------

Params make_params(const SegmentAttentionShape& shape) {
  Params p;
  p.tokens = shape.tokens;
  p.heads = shape.heads;
  p.kv_heads = shape.kv_heads;
  p.group = shape.heads / shape.kv_heads;
  p.chunks = (shape.max_seqlen + kChunk - 1) / kChunk;
  p.max_seqlen = shape.max_seqlen;
  p.staged_rows = round_up(shape.max_seqlen, kTile);
  p.scale = shape.scale;
  p.scale_log2 = shape.scale * kLog2e;
  return p;
}

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <typename T, int D>
cudaError_t forward_typed(const T* q, const T* k, const T* v, const int32_t* cu, T* out, float* lse,
                          const SegmentAttentionShape& shape, cudaStream_t stream) {
  const Params p = make_params(shape);
  const int bytes = ForwardLayout<T, D>{p.staged_rows}.total();
  cudaError_t err = allow_smem(forward_kernel<T, D>, bytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(shape.num_segments) * p.chunks, shape.heads);
  forward_kernel<T, D><<<grid, kThreads, bytes, stream>>>(q, k, v, cu, out, lse, p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t backward_typed(const T* grad_out, const T* q, const T* k, const T* v, const T* out,
                           const float* lse, const int32_t* cu, T* grad_q, T* grad_k, T* grad_v,
                           float* delta, const SegmentAttentionShape& shape, cudaStream_t stream) {
  const Params p = make_params(shape);
  const int64_t rows = shape.tokens * shape.heads;
  const int64_t delta_blocks = (rows * (D / 8) + 255) / 256;
  delta_kernel<T, D><<<unsigned(delta_blocks), 256, 0, stream>>>(grad_out, out, delta, shape.tokens, shape.heads);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const int q_bytes = GradQLayout<T, D>{p.staged_rows}.total();
  if ((err = allow_smem(grad_q_kernel<T, D>, q_bytes)) != cudaSuccess) return err;
  grad_q_kernel<T, D><<<dim3(unsigned(shape.num_segments) * p.chunks, shape.heads), kThreads, q_bytes, stream>>>(
      grad_out, q, k, v, lse, delta, cu, grad_q, p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  const int kv_bytes = GradKVLayout<T, D>{p.staged_rows}.total();
  if ((err = allow_smem(grad_kv_kernel<T, D>, kv_bytes)) != cudaSuccess) return err;
  grad_kv_kernel<T, D><<<dim3(unsigned(shape.num_segments) * p.chunks, shape.kv_heads), kThreads, kv_bytes, stream>>>(
      grad_out, q, k, v, lse, delta, cu, grad_k, grad_v, p);
  return cudaGetLastError();
}

bool shape_ok(const SegmentAttentionShape& s) {
  return segment_attention_supported(s.head_dim, s.max_seqlen) && s.tokens >= 0 && s.heads > 0 &&
         s.kv_heads > 0 && s.heads % s.kv_heads == 0 && s.num_segments >= 0;
}

// bf16 only: the training dtype (fp16 goes to FlashAttention).
template <typename Launch>
cudaError_t dispatch(DType dtype, int head_dim, Launch&& launch) {
  if (dtype != DType::kBFloat16) return cudaErrorInvalidValue;
  if (head_dim == 64) return launch(static_cast<__nv_bfloat16*>(nullptr), std::integral_constant<int, 64>());
  if (head_dim == 128) return launch(static_cast<__nv_bfloat16*>(nullptr), std::integral_constant<int, 128>());
  return cudaErrorInvalidValue;
}

}  // namespace

bool segment_attention_supported(int head_dim, int max_seqlen) {
  return (head_dim == 64 || head_dim == 128) && max_seqlen >= 1 && max_seqlen <= kSegmentMaxSeqlen;
}

cudaError_t segment_attention_forward(const void* q, const void* k, const void* v,
                                      const int32_t* cu_seqlens, void* out, float* lse,
                                      DType dtype, const SegmentAttentionShape& shape,
                                      cudaStream_t stream) {
  if (!shape_ok(shape)) return cudaErrorInvalidValue;
  if (shape.tokens == 0 || shape.num_segments == 0) return cudaSuccess;
  return dispatch(dtype, shape.head_dim, [&](auto type, auto dim) {
    using T = std::remove_pointer_t<decltype(type)>;
    return forward_typed<T, decltype(dim)::value>(
        static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), cu_seqlens,
        static_cast<T*>(out), lse, shape, stream);
  });
}

cudaError_t segment_attention_backward(const void* grad_out, const void* q, const void* k,
                                       const void* v, const void* out, const float* lse,
                                       const int32_t* cu_seqlens, void* grad_q, void* grad_k,
                                       void* grad_v, float* delta, DType dtype,
                                       const SegmentAttentionShape& shape, cudaStream_t stream) {
  if (!shape_ok(shape)) return cudaErrorInvalidValue;
  if (shape.tokens == 0 || shape.num_segments == 0) return cudaSuccess;
  return dispatch(dtype, shape.head_dim, [&](auto type, auto dim) {
    using T = std::remove_pointer_t<decltype(type)>;
    return backward_typed<T, decltype(dim)::value>(
        static_cast<const T*>(grad_out), static_cast<const T*>(q), static_cast<const T*>(k),
        static_cast<const T*>(v), static_cast<const T*>(out), lse, cu_seqlens,
        static_cast<T*>(grad_q), static_cast<T*>(grad_k), static_cast<T*>(grad_v), delta, shape, stream);
  });
}

}  // namespace vpit::cuda
