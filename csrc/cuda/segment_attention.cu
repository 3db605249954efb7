#include "segment_attention.h"

#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

namespace vpit::cuda {
namespace {

using bf16 = __nv_bfloat16;

// Every product is one warp's mma.m16n8k16 (bf16 in, fp32 accumulate) on a 16-row tile, with the
// scores, probabilities and gradients kept in registers: the fragment layouts (PTX ISA, "Matrix
// fragments for mma.m16n8k16") let an accumulator be reused as the next product's A operand.
// Lane = 4 g + t:
//   A 16x16 (row-major): a[0] (row g, cols 2t, 2t+1), a[1] (row g+8), a[2] (row g, cols +8), a[3] (row g+8, cols +8)
//   B 16x8 (k x n):      b[0] (k 2t, 2t+1; col g), b[1] (k + 8)
//   C 16x8 fp32:         c[0], c[1] (row g, cols 2t, 2t+1), c[2], c[3] (row g+8)
constexpr int kTile = 16;                   // rows or keys a warp owns
constexpr int kChunk = 64;                  // rows (forward, dQ) or keys (dK/dV) per block
constexpr int kTileWarps = kChunk / kTile;  // 4 warps cover a chunk
constexpr int kHeadWarps = 2;               // forward and dQ: warp groups on different query heads
constexpr int kRowThreads = kTileWarps * kHeadWarps * 32;
constexpr int kKeyThreads = kTileWarps * 32;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Shared-memory rows of D elements are padded by 8: rows start 16 bytes apart in the bank cycle,
// so the 8 rows a fragment load or an ldmatrix reads hit 32 different banks, and every row stays
// 16-byte aligned for ldmatrix and 16-byte staging copies.
template <int D>
constexpr int kLd = D + 8;

__host__ __device__ constexpr int round_up(int x, int m) { return (x + m - 1) / m * m; }

struct Segment {
  int64_t start;
  int length;
};

// Segment `s` from the boundaries, clamped to [0, tokens) and to max_seqlen so that a bad
// boundary can never read or write outside the tensors or the staged shared memory.
__device__ __forceinline__ Segment load_segment(const int32_t* cu, int s, int64_t tokens, int max_seqlen) {
  int64_t start = cu[s], end = cu[s + 1];
  start = start < 0 ? 0 : (start > tokens ? tokens : start);
  end = end < start ? start : (end > tokens ? tokens : end);
  const int64_t length = end - start;
  return {start, int(length < max_seqlen ? length : max_seqlen)};
}

// Copies `rows` rows of D elements (global row stride `stride`) into shared memory (row stride
// kLd<D>); rows at or past `valid` are zero-filled. Called by `threads` threads together.
template <int D>
__device__ __forceinline__ void stage_rows(bf16* dst, const bf16* src, int64_t stride, int rows, int valid,
                                           int thread, int threads) {
  constexpr int kPacks = D / 8;  // 16-byte packs per row
  for (int idx = thread; idx < rows * kPacks; idx += threads) {
    const int r = idx / kPacks, p = idx % kPacks;
    uint4 value = make_uint4(0, 0, 0, 0);
    if (r < valid) value = *reinterpret_cast<const uint4*>(src + r * stride + p * 8);
    *reinterpret_cast<uint4*>(dst + r * kLd<D> + p * 8) = value;
  }
}

// ---- fragments -------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t load_pair(const bf16* p) { return *reinterpret_cast<const uint32_t*>(p); }

__device__ __forceinline__ uint32_t pack_pair(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ float2 unpack_pair(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&v));
}

// c += a * b
__device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A fragments of a 16 x D tile of row-major rows (row stride `ld`, global or shared); rows at or
// past `valid` read as zero.
template <int D>
__device__ __forceinline__ void load_a_tile(uint32_t (&a)[D / 16][4], const bf16* rows, int64_t ld, int valid,
                                            int g, int t) {
  const bool lo = g < valid, hi = g + 8 < valid;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const bf16* p = rows + g * ld + ks * 16 + 2 * t;
    a[ks][0] = lo ? load_pair(p) : 0u;
    a[ks][1] = hi ? load_pair(p + 8 * ld) : 0u;
    a[ks][2] = lo ? load_pair(p + 8) : 0u;
    a[ks][3] = hi ? load_pair(p + 8 * ld + 8) : 0u;
  }
}

// A fragment of the 16 x 16 block at column k0 of shared-memory rows (row stride kLd<D>).
template <int D>
__device__ __forceinline__ void load_a_step(uint32_t (&a)[4], const bf16* rows, int k0, int g, int t) {
  const bf16* p = rows + g * kLd<D> + k0 + 2 * t;
  a[0] = load_pair(p);
  a[1] = load_pair(p + 8 * kLd<D>);
  a[2] = load_pair(p + 8);
  a[3] = load_pair(p + 8 * kLd<D> + 8);
}

// B fragment (k = columns k0.., n = rows n0..n0+7) of shared-memory rows, i.e. B = rows^T:
// for S = Q K^T the rows are keys.
template <int D>
__device__ __forceinline__ void load_b(uint32_t& b0, uint32_t& b1, const bf16* rows, int n0, int k0, int g, int t) {
  const bf16* p = rows + (n0 + g) * kLd<D> + k0 + 2 * t;
  b0 = load_pair(p);
  b1 = load_pair(p + 8);
}

// B fragments (k = rows k0..k0+15, n = columns n0..n0+15) of shared-memory rows, i.e. B = rows
// as stored: b[0], b[1] for columns n0..n0+7 and b[2], b[3] for n0+8..n0+15 (ldmatrix transposes).
template <int D>
__device__ __forceinline__ void load_b_trans(uint32_t (&b)[4], const bf16* rows, int k0, int n0, int lane) {
  const int matrix = lane >> 3, r = lane & 7;
  const bf16* p = rows + (k0 + (matrix & 1) * 8 + r) * kLd<D> + n0 + (matrix >> 1) * 8;
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
               : "r"(address)
               : "memory");
}

// The A fragment of a 16 x 16 tile held as two accumulators (columns 0-7 and 8-15), in bf16.
__device__ __forceinline__ void accumulators_to_a(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack_pair(c0[0], c0[1]);
  a[1] = pack_pair(c0[2], c0[3]);
  a[2] = pack_pair(c1[0], c1[1]);
  a[3] = pack_pair(c1[2], c1[3]);
}

// acc[n] += a * B for the D / 8 column tiles of B = rows k0..k0+15 of shared memory.
template <int D>
__device__ __forceinline__ void accumulate_times_rows(float (&acc)[D / 8][4], const uint32_t (&a)[4],
                                                      const bf16* rows, int k0, int lane) {
#pragma unroll
  for (int dn = 0; dn < D / 16; ++dn) {
    uint32_t b[4];
    load_b_trans<D>(b, rows, k0, dn * 16, lane);
    mma(acc[2 * dn], a, b[0], b[1]);
    mma(acc[2 * dn + 1], a, b[2], b[3]);
  }
}

// s[n] = a_tile * rows^T for the 16 shared-memory rows n0..n0+15 (two column tiles of 8).
template <int D>
__device__ __forceinline__ void times_rows_transposed(float (&s)[2][4], const uint32_t (&a)[D / 16][4],
                                                      const bf16* rows, int n0, int g, int t) {
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      uint32_t b0, b1;
      load_b<D>(b0, b1, rows, n0 + n * 8, ks * 16, g, t);
      mma(s[n], a[ks], b0, b1);
    }
  }
}

// Writes accumulators acc (16 x D) to global rows as bf16, rows g and g + 8 scaled by
// scale_lo / scale_hi; rows at or past `valid` are not written.
template <int D>
__device__ __forceinline__ void store_tile(bf16* rows, int64_t ld, const float (&acc)[D / 8][4], float scale_lo,
                                           float scale_hi, int valid, int g, int t) {
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    bf16* p = rows + g * ld + n * 8 + 2 * t;
    if (g < valid) *reinterpret_cast<uint32_t*>(p) = pack_pair(acc[n][0] * scale_lo, acc[n][1] * scale_lo);
    if (g + 8 < valid) *reinterpret_cast<uint32_t*>(p + 8 * ld) = pack_pair(acc[n][2] * scale_hi, acc[n][3] * scale_hi);
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

struct Params {
  int64_t tokens;
  int heads, kv_heads, group, chunks, max_seqlen, staged_rows;
  float scale, scale_log2;
};

// Shared memory of the forward and dQ kernels: the keys and values a row chunk sees.
template <int D>
__host__ __device__ constexpr int row_kernel_smem(int staged_rows) {
  return 2 * staged_rows * kLd<D> * int(sizeof(bf16));
}

// Shared memory of the dK/dV kernel: the chunk's keys and values, then one 64-row block of
// queries and output gradients with their log-sum-exp and delta.
template <int D>
__host__ __device__ constexpr int key_kernel_smem() {
  return 4 * kChunk * kLd<D> * int(sizeof(bf16)) + 2 * kChunk * int(sizeof(float));
}

// Prologue shared by the forward and dQ kernels. Block: (segment, chunk of 64 query rows) x K/V
// head; stages the keys and values the chunk's rows see (0 .. chunk end), once for the group's
// query heads. Returns false for a block or warp with no rows.
struct RowBlock {
  Segment s;
  int i0;        // first row (in the segment) of this warp's tile
  int tile;      // the tile's index: it sees key tiles 0 .. tile
  int first_head_in_group;
  int kh;
};

template <int D>
__device__ __forceinline__ bool row_block_prologue(RowBlock& b, const bf16* k, const bf16* v, const int32_t* cu,
                                                   bf16* ks, bf16* vs, const Params& p) {
  const int seg = blockIdx.x / p.chunks, chunk = blockIdx.x % p.chunks;
  b.kh = blockIdx.y;
  b.s = load_segment(cu, seg, p.tokens, p.max_seqlen);
  const int row0 = chunk * kChunk;
  if (row0 >= b.s.length) return false;
  const int rows_end = min(row0 + kChunk, b.s.length);
  const int64_t kv_stride = int64_t(p.kv_heads) * D;
  const bf16* k_rows = k + b.s.start * kv_stride + b.kh * D;
  const bf16* v_rows = v + b.s.start * kv_stride + b.kh * D;
  const int staged = round_up(rows_end, kTile);
  stage_rows<D>(ks, k_rows, kv_stride, staged, rows_end, threadIdx.x, kRowThreads);
  stage_rows<D>(vs, v_rows, kv_stride, staged, rows_end, threadIdx.x, kRowThreads);
  __syncthreads();
  const int warp = threadIdx.x / 32;
  b.tile = chunk * kTileWarps + warp % kTileWarps;
  b.i0 = b.tile * kTile;
  b.first_head_in_group = warp / kTileWarps;
  return b.i0 < rows_end;
}

// ---- forward ---------------------------------------------------------------------------------

// Each warp owns 16 rows of one query head at a time (its warp group walks the group's heads) and
// makes one pass over the visible key tiles with an online softmax (running max and sum per row).
template <int D>
__global__ void __launch_bounds__(kRowThreads)
forward_kernel(const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
               const int32_t* __restrict__ cu, bf16* __restrict__ out, float* __restrict__ lse, Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* ks = reinterpret_cast<bf16*>(smem);
  bf16* vs = ks + p.staged_rows * kLd<D>;
  RowBlock b;
  if (!row_block_prologue<D>(b, k, v, cu, ks, vs, p)) return;
  const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int valid = b.s.length - b.i0;  // rows of the tile inside the segment
  const int64_t q_stride = int64_t(p.heads) * D;

  for (int hg = b.first_head_in_group; hg < p.group; hg += kHeadWarps) {
    const int h = b.kh * p.group + hg;
    const int64_t offset = (b.s.start + b.i0) * q_stride + h * D;
    uint32_t qa[D / 16][4];
    load_a_tile<D>(qa, q + offset, q_stride, valid, g, t);
    float o[D / 8][4] = {};
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows g and g + 8, log2 units
    for (int kt = 0; kt <= b.tile; ++kt) {
      float s[2][4];
      times_rows_transposed<D>(s, qa, ks, kt * kTile, g, t);
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int n = 0; n < 2; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = kt * kTile + n * 8 + 2 * t + (e & 1), i = b.i0 + g + (e >> 1) * 8;
          s[n][e] = j <= i ? s[n][e] * p.scale_log2 : -INFINITY;  // j <= i < length for visible rows
          tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[n][e]);
        }
      }
      float alpha[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        // Key 0 is in tile 0 and visible to every row, so m is finite from the first tile on.
        const float m_new = fmaxf(m[r], quad_max(tile_max[r]));
        alpha[r] = exp2f(m[r] - m_new);
        m[r] = m_new;
        l[r] *= alpha[r];
      }
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[n][0] *= alpha[0];
        o[n][1] *= alpha[0];
        o[n][2] *= alpha[1];
        o[n][3] *= alpha[1];
      }
#pragma unroll
      for (int n = 0; n < 2; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[n][e] = exp2f(s[n][e] - m[e >> 1]);
          l[e >> 1] += s[n][e];
        }
      }
      uint32_t pa[4];
      accumulators_to_a(pa, s[0], s[1]);
      accumulate_times_rows<D>(o, pa, vs, kt * kTile, lane);
    }
    l[0] = quad_sum(l[0]);
    l[1] = quad_sum(l[1]);
    store_tile<D>(out + offset, q_stride, o, 1.f / l[0], 1.f / l[1], valid, g, t);
    if (t == 0) {
      float* row_lse = lse + int64_t(h) * p.tokens + b.s.start + b.i0 + g;
      if (g < valid) row_lse[0] = (m[0] + log2f(l[0])) * kLn2;
      if (g + 8 < valid) row_lse[8] = (m[1] + log2f(l[1])) * kLn2;
    }
  }
}

// ---- backward --------------------------------------------------------------------------------

// dQ, and delta = rowsum(dO * O) for the dK/dV kernel. Same blocks as the forward; per key tile:
// S = Q K^T, dP = dO V^T, dS = P * (dP - delta), dQ += dS K.
template <int D>
__global__ void __launch_bounds__(kRowThreads)
grad_q_kernel(const bf16* __restrict__ grad_out, const bf16* __restrict__ q, const bf16* __restrict__ k,
              const bf16* __restrict__ v, const bf16* __restrict__ out, const float* __restrict__ lse,
              const int32_t* __restrict__ cu, bf16* __restrict__ grad_q, float* __restrict__ delta, Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* ks = reinterpret_cast<bf16*>(smem);
  bf16* vs = ks + p.staged_rows * kLd<D>;
  RowBlock b;
  if (!row_block_prologue<D>(b, k, v, cu, ks, vs, p)) return;
  const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int valid = b.s.length - b.i0;
  const int64_t q_stride = int64_t(p.heads) * D;

  for (int hg = b.first_head_in_group; hg < p.group; hg += kHeadWarps) {
    const int h = b.kh * p.group + hg;
    const int64_t offset = (b.s.start + b.i0) * q_stride + h * D;
    uint32_t qa[D / 16][4], da[D / 16][4], oa[D / 16][4];
    load_a_tile<D>(qa, q + offset, q_stride, valid, g, t);
    load_a_tile<D>(da, grad_out + offset, q_stride, valid, g, t);
    load_a_tile<D>(oa, out + offset, q_stride, valid, g, t);
    float row_delta[2] = {0.f, 0.f};
#pragma unroll
    for (int ks_step = 0; ks_step < D / 16; ++ks_step) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {  // a[e] holds row g (e even) or g + 8 (e odd)
        const float2 x = unpack_pair(da[ks_step][e]), y = unpack_pair(oa[ks_step][e]);
        row_delta[e & 1] += x.x * y.x + x.y * y.y;
      }
    }
    row_delta[0] = quad_sum(row_delta[0]);
    row_delta[1] = quad_sum(row_delta[1]);
    const int64_t stat = int64_t(h) * p.tokens + b.s.start + b.i0 + g;
    if (t == 0) {
      if (g < valid) delta[stat] = row_delta[0];
      if (g + 8 < valid) delta[stat + 8] = row_delta[1];
    }
    const float row_lse[2] = {g < valid ? lse[stat] * kLog2e : 0.f, g + 8 < valid ? lse[stat + 8] * kLog2e : 0.f};

    float dq[D / 8][4] = {};
    for (int kt = 0; kt <= b.tile; ++kt) {
      float s[2][4], dp[2][4];
      times_rows_transposed<D>(s, qa, ks, kt * kTile, g, t);
      times_rows_transposed<D>(dp, da, vs, kt * kTile, g, t);
#pragma unroll
      for (int n = 0; n < 2; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = kt * kTile + n * 8 + 2 * t + (e & 1), r = e >> 1, i = b.i0 + g + r * 8;
          const float prob = j <= i ? exp2f(s[n][e] * p.scale_log2 - row_lse[r]) : 0.f;
          dp[n][e] = prob * (dp[n][e] - row_delta[r]);
        }
      }
      uint32_t dsa[4];
      accumulators_to_a(dsa, dp[0], dp[1]);
      accumulate_times_rows<D>(dq, dsa, ks, kt * kTile, lane);
    }
    store_tile<D>(grad_q + offset, q_stride, dq, p.scale, p.scale, valid, g, t);
  }
}

// dK and dV. Block: (segment, chunk of 64 keys) x K/V head; each warp owns 16 keys and sums over
// the group's query heads and every later row, 64 rows staged at a time:
// S^T = K Q^T, dP^T = V dO^T, dS^T = P^T * (dP^T - delta), dV += P^T dO, dK += scale * dS^T Q.
template <int D>
__global__ void __launch_bounds__(kKeyThreads)
grad_kv_kernel(const bf16* __restrict__ grad_out, const bf16* __restrict__ q, const bf16* __restrict__ k,
               const bf16* __restrict__ v, const float* __restrict__ lse, const float* __restrict__ delta,
               const int32_t* __restrict__ cu, bf16* __restrict__ grad_k, bf16* __restrict__ grad_v, Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* kst = reinterpret_cast<bf16*>(smem);
  bf16* vst = kst + kChunk * kLd<D>;
  bf16* qs = vst + kChunk * kLd<D>;
  bf16* dos = qs + kChunk * kLd<D>;
  float* lse_s = reinterpret_cast<float*>(dos + kChunk * kLd<D>);
  float* delta_s = lse_s + kChunk;

  const int seg = blockIdx.x / p.chunks, chunk = blockIdx.x % p.chunks, kh = blockIdx.y;
  const Segment s = load_segment(cu, seg, p.tokens, p.max_seqlen);
  const int key0 = chunk * kChunk;
  if (key0 >= s.length) return;
  const int key_end = min(key0 + kChunk, s.length);
  const int64_t kv_stride = int64_t(p.kv_heads) * D, q_stride = int64_t(p.heads) * D;
  const int64_t kv_offset = (s.start + key0) * kv_stride + kh * D;
  stage_rows<D>(kst, k + kv_offset, kv_stride, kChunk, key_end - key0, threadIdx.x, kKeyThreads);
  stage_rows<D>(vst, v + kv_offset, kv_stride, kChunk, key_end - key0, threadIdx.x, kKeyThreads);

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  const int j0 = key0 + warp * kTile;  // this warp's first key
  const bool active = j0 < key_end;
  const bf16* k_tile = kst + warp * kTile * kLd<D>;
  const bf16* v_tile = vst + warp * kTile * kLd<D>;
  float dk[D / 8][4] = {}, dv[D / 8][4] = {};

  for (int hg = 0; hg < p.group; ++hg) {
    const int h = kh * p.group + hg;
    for (int rb0 = key0; rb0 < s.length; rb0 += kChunk) {  // rows before key0 see none of the keys
      __syncthreads();  // the previous rows are no longer read (and the K/V staging is visible)
      const int rows_valid = s.length - rb0;
      const int64_t row_offset = (s.start + rb0) * q_stride + h * D;
      stage_rows<D>(qs, q + row_offset, q_stride, kChunk, rows_valid, threadIdx.x, kKeyThreads);
      stage_rows<D>(dos, grad_out + row_offset, q_stride, kChunk, rows_valid, threadIdx.x, kKeyThreads);
      for (int idx = threadIdx.x; idx < kChunk; idx += kKeyThreads) {
        const int64_t at = int64_t(h) * p.tokens + s.start + rb0 + idx;
        lse_s[idx] = idx < rows_valid ? lse[at] * kLog2e : 0.f;
        delta_s[idx] = idx < rows_valid ? delta[at] : 0.f;
      }
      __syncthreads();
      if (!active) continue;
#pragma unroll 1
      for (int local = 0; local < kChunk; local += kTile) {
        const int i0 = rb0 + local;
        if (i0 >= s.length) break;
        if (i0 < j0) continue;  // rows i0 .. i0 + 15 all precede the warp's keys
        float st[2][4] = {}, dpt[2][4] = {};
#pragma unroll
        for (int ks_step = 0; ks_step < D / 16; ++ks_step) {
          uint32_t ka[4], va[4];
          load_a_step<D>(ka, k_tile, ks_step * 16, g, t);
          load_a_step<D>(va, v_tile, ks_step * 16, g, t);
#pragma unroll
          for (int n = 0; n < 2; ++n) {
            uint32_t b0, b1;
            load_b<D>(b0, b1, qs, local + n * 8, ks_step * 16, g, t);
            mma(st[n], ka, b0, b1);
            load_b<D>(b0, b1, dos, local + n * 8, ks_step * 16, g, t);
            mma(dpt[n], va, b0, b1);
          }
        }
#pragma unroll
        for (int n = 0; n < 2; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = local + n * 8 + 2 * t + (e & 1), j = j0 + g + (e >> 1) * 8, i = rb0 + col;
            const bool visible = j <= i && i < s.length && j < key_end;
            st[n][e] = visible ? exp2f(st[n][e] * p.scale_log2 - lse_s[col]) : 0.f;
            dpt[n][e] = st[n][e] * (dpt[n][e] - delta_s[col]);
          }
        }
        uint32_t pa[4], dsa[4];
        accumulators_to_a(pa, st[0], st[1]);
        accumulators_to_a(dsa, dpt[0], dpt[1]);
        accumulate_times_rows<D>(dv, pa, dos, local, lane);
        accumulate_times_rows<D>(dk, dsa, qs, local, lane);
      }
    }
  }
  if (!active) return;
  const int64_t out_offset = (s.start + j0) * kv_stride + kh * D;
  store_tile<D>(grad_k + out_offset, kv_stride, dk, p.scale, p.scale, key_end - j0, g, t);
  store_tile<D>(grad_v + out_offset, kv_stride, dv, 1.f, 1.f, key_end - j0, g, t);
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

template <int D>
cudaError_t forward_typed(const bf16* q, const bf16* k, const bf16* v, const int32_t* cu, bf16* out, float* lse,
                          const SegmentAttentionShape& shape, cudaStream_t stream) {
  const Params p = make_params(shape);
  const int bytes = row_kernel_smem<D>(p.staged_rows);
  cudaError_t err = allow_smem(forward_kernel<D>, bytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(unsigned(shape.num_segments) * p.chunks, shape.kv_heads);
  forward_kernel<D><<<grid, kRowThreads, bytes, stream>>>(q, k, v, cu, out, lse, p);
  return cudaGetLastError();
}

template <int D>
cudaError_t backward_typed(const bf16* grad_out, const bf16* q, const bf16* k, const bf16* v, const bf16* out,
                           const float* lse, const int32_t* cu, bf16* grad_q, bf16* grad_k, bf16* grad_v,
                           float* delta, const SegmentAttentionShape& shape, cudaStream_t stream) {
  const Params p = make_params(shape);
  const dim3 grid(unsigned(shape.num_segments) * p.chunks, shape.kv_heads);
  const int q_bytes = row_kernel_smem<D>(p.staged_rows);
  cudaError_t err = allow_smem(grad_q_kernel<D>, q_bytes);
  if (err != cudaSuccess) return err;
  grad_q_kernel<D><<<grid, kRowThreads, q_bytes, stream>>>(grad_out, q, k, v, out, lse, cu, grad_q, delta, p);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  // After grad_q_kernel on the same stream: it writes the delta this kernel reads.
  const int kv_bytes = key_kernel_smem<D>();
  if ((err = allow_smem(grad_kv_kernel<D>, kv_bytes)) != cudaSuccess) return err;
  grad_kv_kernel<D><<<grid, kKeyThreads, kv_bytes, stream>>>(grad_out, q, k, v, lse, delta, cu, grad_k, grad_v, p);
  return cudaGetLastError();
}

bool shape_ok(const SegmentAttentionShape& s) {
  return segment_attention_supported(s.head_dim, s.max_seqlen) && s.tokens >= 0 && s.heads > 0 &&
         s.kv_heads > 0 && s.heads % s.kv_heads == 0 && s.num_segments >= 0;
}

}  // namespace

bool segment_attention_supported(int head_dim, int max_seqlen) {
  return (head_dim == 64 || head_dim == 128) && max_seqlen >= 1 && max_seqlen <= kSegmentMaxSeqlen;
}

// bf16 only: the training dtype (fp16 goes to FlashAttention).
cudaError_t segment_attention_forward(const void* q, const void* k, const void* v, const int32_t* cu_seqlens,
                                      void* out, float* lse, DType dtype, const SegmentAttentionShape& shape,
                                      cudaStream_t stream) {
  if (!shape_ok(shape) || dtype != DType::kBFloat16) return cudaErrorInvalidValue;
  if (shape.tokens == 0 || shape.num_segments == 0) return cudaSuccess;
  const auto* qb = static_cast<const bf16*>(q);
  const auto* kb = static_cast<const bf16*>(k);
  const auto* vb = static_cast<const bf16*>(v);
  auto* ob = static_cast<bf16*>(out);
  return shape.head_dim == 64 ? forward_typed<64>(qb, kb, vb, cu_seqlens, ob, lse, shape, stream)
                              : forward_typed<128>(qb, kb, vb, cu_seqlens, ob, lse, shape, stream);
}

cudaError_t segment_attention_backward(const void* grad_out, const void* q, const void* k, const void* v,
                                       const void* out, const float* lse, const int32_t* cu_seqlens,
                                       void* grad_q, void* grad_k, void* grad_v, float* delta, DType dtype,
                                       const SegmentAttentionShape& shape, cudaStream_t stream) {
  if (!shape_ok(shape) || dtype != DType::kBFloat16) return cudaErrorInvalidValue;
  if (shape.tokens == 0 || shape.num_segments == 0) return cudaSuccess;
  const auto* gb = static_cast<const bf16*>(grad_out);
  const auto* qb = static_cast<const bf16*>(q);
  const auto* kb = static_cast<const bf16*>(k);
  const auto* vb = static_cast<const bf16*>(v);
  const auto* ob = static_cast<const bf16*>(out);
  auto* dq = static_cast<bf16*>(grad_q);
  auto* dk = static_cast<bf16*>(grad_k);
  auto* dv = static_cast<bf16*>(grad_v);
  return shape.head_dim == 64
             ? backward_typed<64>(gb, qb, kb, vb, ob, lse, cu_seqlens, dq, dk, dv, delta, shape, stream)
             : backward_typed<128>(gb, qb, kb, vb, ob, lse, cu_seqlens, dq, dk, dv, delta, shape, stream);
}

}  // namespace vpit::cuda
