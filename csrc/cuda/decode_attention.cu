// Split-K decode attention (flash-decoding) over a static KV cache with a validity mask.
//
// split kernel, one block per (split of the cache, KV head, group of <= 8 query heads, row),
// walking the split's tiles of 128 slots with an online softmax; per tile:
//   1. one thread per slot: the scores of its key against the group's queries (queries in shared
//      memory, read as broadcasts), in log2 units so the softmax uses exp2;
//   2. one warp per query head: the new running max, exp2(score - max), the running sum, and the
//      factor that rescales what was summed so far;
//   3. the probability-weighted value rows: threads split the head dimension in packs and the
//      slots in groups; each thread rescales and adds to its own running sums in shared memory.
//   The block then sums its slot groups and writes the unnormalised partial output, the max and
//   the sum. A split with no valid slot writes only sum = 0, which tells the merge to skip it
//   (its partial output is never read).
// merge kernel, one block per (row, query head): rescales the splits to the global max and
// divides by the global sum; a row with no valid slot gets zeros.
#include "decode_attention.h"

#include <algorithm>
#include <cmath>

#include "dtypes.cuh"
#include "pdl.cuh"

namespace vpit::cuda {
namespace {

constexpr int kThreads = static_cast<int>(kDecodeAttentionTile);  // one slot per thread
constexpr int kWarps = kThreads / 32;
constexpr int kMaxGroup = 8;  // query heads per block
// A slot's probabilities move as two float4s (split kernel); change those lines with this.
static_assert(kMaxGroup == 8, "the probability rows are read and written as two float4s");
constexpr float kLog2e = 1.4426950408889634f;
constexpr int64_t kMaxSplits = 4096;

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Shared memory of the split kernel, in floats: queries [kMaxGroup][dim], probabilities
// [kThreads][kMaxGroup] (a slot's probabilities for all query heads in two 16-byte reads), running max, sum and rescale factor [3][kMaxGroup], the tile's validity
// [kThreads], and the slot groups' running weighted sums [slot_groups][kMaxGroup][dim].
struct SplitLayout {
  int packs;        // head_dim / VEC
  int pack_threads; // threads across one value row: min(packs, kThreads)
  int slot_groups;  // kThreads / pack_threads
  __host__ __device__ SplitLayout(int64_t dim, int vec) {
    packs = static_cast<int>(dim / vec);
    pack_threads = packs < kThreads ? packs : kThreads;
    slot_groups = kThreads / pack_threads;
  }
  __host__ __device__ int64_t floats(int64_t dim) const {
    return kMaxGroup * dim + kMaxGroup * kThreads + 3 * kMaxGroup + kThreads +
           int64_t(slot_groups) * kMaxGroup * dim;
  }
};

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, 1)
split_kernel(const T* __restrict__ query, const T* __restrict__ key, const T* __restrict__ value,
             const bool* __restrict__ key_valid, DecodeAttentionShape s, int group_slices,
             int64_t tiles_per_split, int64_t splits, float* __restrict__ part_out,
             float* __restrict__ part_max, float* __restrict__ part_sum) {
  // Everything this kernel reads may come from the kernel before it (the query, the new slot).
  wait_for_previous_kernel();
  allow_next_kernel();
  const int64_t split = blockIdx.x;
  const int64_t kv_head = blockIdx.y / group_slices;
  const int slice = static_cast<int>(blockIdx.y % group_slices);
  const int64_t b = blockIdx.z;
  const int64_t group = s.heads / s.kv_heads, dim = s.head_dim;
  const int first = slice * kMaxGroup;
  const int count = static_cast<int>(group - first < kMaxGroup ? group - first : kMaxGroup);
  const int64_t head0 = kv_head * group + first;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  // Index of (row, head0 + g, split) in the partial arrays: part0 + g * splits.
  const int64_t part0 = (b * s.heads + head0) * splits + split;
  const bool* valid = key_valid + b * s.valid_stride_b;
  const T* k_head = key + b * s.k_stride_b + kv_head * s.k_stride_h;
  const T* v_head = value + b * s.v_stride_b + kv_head * s.v_stride_h;

  extern __shared__ float4 smem4[];  // float4: 16-byte aligned
  float* smem = reinterpret_cast<float*>(smem4);
  const SplitLayout layout(dim, VEC);
  float* q_sh = smem;                           // [kMaxGroup][dim]
  float* p_sh = q_sh + kMaxGroup * dim;         // [kThreads][kMaxGroup]
  float* max_sh = p_sh + kMaxGroup * kThreads;  // [kMaxGroup] running max (log2 units)
  float* sum_sh = max_sh + kMaxGroup;           // [kMaxGroup] running sum of exp2(score - max)
  float* alpha_sh = sum_sh + kMaxGroup;         // [kMaxGroup] rescale of the sums so far
  float* live_sh = alpha_sh + kMaxGroup;        // [kThreads] 1 where the tile's slot is valid
  float* acc_sh = live_sh + kThreads;           // [slot_groups][kMaxGroup][dim]

  const float q_scale = s.scale * kLog2e;
  for (int64_t i = tid; i < count * dim; i += kThreads) {
    const int64_t g = i / dim, d = i % dim;
    q_sh[i] = Float<T>::load(query[b * s.q_stride_b + (head0 + g) * s.q_stride_h + d]) * q_scale;
  }
  for (int64_t i = tid; i < int64_t(layout.slot_groups) * kMaxGroup * dim; i += kThreads) acc_sh[i] = 0.f;
  if (tid < kMaxGroup) {
    max_sh[tid] = -INFINITY;
    sum_sh[tid] = 0.f;
  }
  __syncthreads();

  const int64_t tile_end = min((split + 1) * tiles_per_split, (s.cache_len + kThreads - 1) / kThreads);
  bool any_live = false;
  for (int64_t tile = split * tiles_per_split; tile < tile_end; ++tile) {
    const int64_t slot = tile * kThreads + tid;
    const bool live = slot < s.cache_len && valid[slot];
    if (!__syncthreads_or(live)) continue;  // uniform: nothing valid in this tile
    any_live = true;
    live_sh[tid] = live ? 1.f : 0.f;  // read in step 3, after two barriers

    // 1. scores, one slot per thread
    float score[kMaxGroup] = {};
    if (live) {
      const T* k = k_head + slot * s.k_stride_l;
      for (int64_t d = 0; d < dim; d += VEC) {
        float kv[VEC];
        load_floats<T, VEC>(k + d, kv);
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g) {
          if (g < count) {
            const float* q = q_sh + g * dim + d;
            if constexpr (VEC % 4 == 0) {  // 16-byte broadcast reads of the queries
#pragma unroll
              for (int i = 0; i < VEC; i += 4) {
                const float4 q4 = *reinterpret_cast<const float4*>(q + i);
                score[g] += kv[i] * q4.x + kv[i + 1] * q4.y + kv[i + 2] * q4.z + kv[i + 3] * q4.w;
              }
            } else {
#pragma unroll
              for (int i = 0; i < VEC; ++i) score[g] += kv[i] * q[i];
            }
          }
        }
      }
    }
    float4* p_row = reinterpret_cast<float4*>(p_sh + tid * kMaxGroup);
    p_row[0] = live ? make_float4(score[0], score[1], score[2], score[3]) : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
    p_row[1] = live ? make_float4(score[4], score[5], score[6], score[7]) : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
    __syncthreads();

    // 2. online softmax statistics, one warp per query head
    for (int g = warp; g < count; g += kWarps) {
      const float old_max = max_sh[g], old_sum = sum_sh[g];
      float m = -INFINITY;
      for (int j = lane; j < kThreads; j += 32) m = fmaxf(m, p_sh[j * kMaxGroup + g]);
      m = fmaxf(warp_max(m), old_max);  // finite: the tile has a valid slot
      float sum = 0.f;
      for (int j = lane; j < kThreads; j += 32) {
        const float e = exp2f(p_sh[j * kMaxGroup + g] - m);  // 0 for invalid slots
        p_sh[j * kMaxGroup + g] = e;
        sum += e;
      }
      sum = warp_sum(sum);
      __syncwarp();  // every lane has read max_sh[g] and sum_sh[g] before lane 0 rewrites them
      if (lane == 0) {
        const float alpha = exp2f(old_max - m);  // 0 on the first valid tile
        alpha_sh[g] = alpha;
        sum_sh[g] = old_sum * alpha + sum;
        max_sh[g] = m;
      }
    }
    __syncthreads();

    // 3. rescale the running weighted sums and add this tile's value rows:
    //    thread = (slot group, pack of VEC columns); each owns its acc_sh entries.
    const int slot_group = tid / layout.pack_threads;
    if (slot_group < layout.slot_groups) {
      for (int pack = tid % layout.pack_threads; pack < layout.packs; pack += layout.pack_threads) {
        const int64_t col = int64_t(pack) * VEC;
        float acc[kMaxGroup][VEC] = {};
        const int slots = static_cast<int>(min(int64_t(kThreads), s.cache_len - tile * kThreads));
        // Unrolled without a branch around the loads, so several value rows are in flight.
#pragma unroll 4
        for (int j = slot_group; j < slots; j += layout.slot_groups) {
          float v[VEC];
          load_floats<T, VEC>(v_head + (tile * kThreads + j) * s.v_stride_l + col, v);
          // An invalid slot's value is zeroed, not just weighted by 0: an unfilled cache may hold NaN.
          const bool slot_live = live_sh[j] != 0.f;
#pragma unroll
          for (int i = 0; i < VEC; ++i) v[i] = slot_live ? v[i] : 0.f;
          const float4* p_row = reinterpret_cast<const float4*>(p_sh + j * kMaxGroup);
          const float4 p_lo = p_row[0], p_hi = p_row[1];
          const float p[kMaxGroup] = {p_lo.x, p_lo.y, p_lo.z, p_lo.w, p_hi.x, p_hi.y, p_hi.z, p_hi.w};
#pragma unroll
          for (int g = 0; g < kMaxGroup; ++g) {
            if (g < count) {
#pragma unroll
              for (int i = 0; i < VEC; ++i) acc[g][i] += p[g] * v[i];
            }
          }
        }
#pragma unroll
        for (int g = 0; g < kMaxGroup; ++g) {
          if (g < count) {
            float* dst = acc_sh + (int64_t(slot_group) * kMaxGroup + g) * dim + col;
            const float alpha = alpha_sh[g];
#pragma unroll
            for (int i = 0; i < VEC; ++i) dst[i] = dst[i] * alpha + acc[g][i];
          }
        }
      }
    }
    __syncthreads();  // p_sh and alpha_sh are rewritten by the next tile
  }

  if (!any_live) {  // uniform; sum = 0 tells the merge to skip this split
    if (tid < count) part_sum[part0 + tid * splits] = 0.f;
    return;
  }
  if (tid < count) {
    part_max[part0 + tid * splits] = max_sh[tid];
    part_sum[part0 + tid * splits] = sum_sh[tid];
  }
  for (int64_t i = tid; i < count * dim; i += kThreads) {
    const int64_t g = i / dim, d = i % dim;
    float total = 0.f;
    for (int sg = 0; sg < layout.slot_groups; ++sg) total += acc_sh[(int64_t(sg) * kMaxGroup + g) * dim + d];
    part_out[(part0 + g * splits) * dim + d] = total;
  }
}

// The block's maximum / sum of v (blockDim.x == kThreads); `scratch` holds kWarps floats.
__device__ float block_max(float v, float* scratch) {
  v = warp_max(v);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float m = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) m = fmaxf(m, scratch[w]);
  __syncthreads();  // scratch is reused
  return m;
}

__device__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  float total = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

// The merge's weights, padded to whole 16-byte words: the unrolled loop over the splits reads them
// several at a time (compute-sanitizer saw a 12-byte read past a 1-split array without padding).
__host__ __device__ constexpr int64_t merge_weight_floats(int64_t splits) { return (splits + 3) / 4 * 4; }

// One block per (row, query head): the splits' weights exp2(max - global max) go to shared
// memory (0 for skipped splits), computed by the threads together, then each output column sums
// the weighted partial outputs.
template <typename T>
__global__ void __launch_bounds__(kThreads)
merge_kernel(const float* __restrict__ part_out, const float* __restrict__ part_max,
             const float* __restrict__ part_sum, int64_t splits, int64_t dim, T* __restrict__ out) {
  wait_for_previous_kernel();
  allow_next_kernel();  // e.g. the output projection starts streaming its weights
  extern __shared__ float weight_sh[];  // [merge_weight_floats(splits)], zeros past splits
  __shared__ float scratch[kWarps];
  const int64_t pair = blockIdx.x;  // b * heads + h
  const float* maxes = part_max + pair * splits;
  const float* sums = part_sum + pair * splits;
  float m = -INFINITY;
  for (int64_t c = threadIdx.x; c < splits; c += kThreads)
    if (sums[c] > 0.f) m = fmaxf(m, maxes[c]);
  m = block_max(m, scratch);
  float denom = 0.f;
  for (int64_t c = threadIdx.x; c < merge_weight_floats(splits); c += kThreads) {
    const float w = c < splits && sums[c] > 0.f ? exp2f(maxes[c] - m) : 0.f;
    weight_sh[c] = w;
    if (c < splits) denom += w * sums[c];
  }
  denom = block_sum(denom, scratch);  // its barriers also publish weight_sh
  const float* partial = part_out + pair * splits * dim;
  for (int64_t d = threadIdx.x; d < dim; d += kThreads) {
    float acc = 0.f;
#pragma unroll 4
    for (int64_t c = 0; c < splits; ++c) {
      const float w = weight_sh[c];
      // A skipped split's partial output was never written: it is not read.
      if (w > 0.f) acc += w * partial[c * dim + d];
    }
    out[pair * dim + d] = Float<T>::store(denom > 0.f ? acc / denom : 0.f);
  }
}

// Tiles of kThreads slots, split over enough blocks to fill the GPU about twice: at batch 1 every
// tile gets its own block; at larger batches a block walks several tiles (online softmax), which
// keeps the partial outputs and the merge small.
struct Splits {
  int64_t tiles_per_split, splits;
};
Splits splits_of(const DecodeAttentionShape& s, int num_sms) {
  const int64_t tiles = (s.cache_len + kThreads - 1) / kThreads;
  const int64_t group_slices = (s.heads / s.kv_heads + kMaxGroup - 1) / kMaxGroup;
  const int64_t other_blocks = s.batch * s.kv_heads * group_slices;
  const int64_t wanted = (2 * int64_t(num_sms > 0 ? num_sms : 1) + other_blocks - 1) / other_blocks;
  const int64_t splits = wanted < tiles ? wanted : tiles;
  // At most kMaxSplits splits, so the merge's per-split weights fit in shared memory.
  const int64_t per_split = std::max((tiles + splits - 1) / splits, (tiles + kMaxSplits - 1) / kMaxSplits);
  return {per_split, (tiles + per_split - 1) / per_split};
}

template <typename T, int VEC>
cudaError_t launch(const void* query, const void* key, const void* value, const bool* key_valid,
                   void* out, float* scratch, const DecodeAttentionShape& s, int num_sms,
                   bool programmatic, cudaStream_t stream) {
  const Splits split = splits_of(s, num_sms);
  const int64_t splits = split.splits, pairs = s.batch * s.heads;
  float* part_out = scratch;
  float* part_max = part_out + pairs * splits * s.head_dim;
  float* part_sum = part_max + pairs * splits;
  const int64_t group = s.heads / s.kv_heads;
  const int group_slices = static_cast<int>((group + kMaxGroup - 1) / kMaxGroup);
  const SplitLayout layout(s.head_dim, VEC);
  const size_t smem = static_cast<size_t>(layout.floats(s.head_dim)) * sizeof(float);
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(s.kv_heads * group_slices),
                  static_cast<unsigned>(s.batch));
  const cudaError_t err = launch_kernel(
      grid, dim3(kThreads), smem, stream, programmatic, split_kernel<T, VEC>, static_cast<const T*>(query),
      static_cast<const T*>(key), static_cast<const T*>(value), key_valid, s, group_slices, split.tiles_per_split,
      splits, part_out, part_max, part_sum);
  if (err != cudaSuccess) return err;
  return launch_kernel(dim3(static_cast<unsigned>(pairs)), dim3(kThreads),
                       size_t(merge_weight_floats(splits)) * sizeof(float), stream, programmatic, merge_kernel<T>,
                       static_cast<const float*>(part_out), static_cast<const float*>(part_max),
                       static_cast<const float*>(part_sum), splits, s.head_dim, static_cast<T*>(out));
}

template <typename T>
cudaError_t launch_typed(const void* query, const void* key, const void* value,
                         const bool* key_valid, void* out, float* scratch,
                         const DecodeAttentionShape& s, int num_sms, bool vectorized,
                         bool programmatic, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  if (vectorized && s.head_dim % kVec == 0)
    return launch<T, kVec>(query, key, value, key_valid, out, scratch, s, num_sms, programmatic, stream);
  return launch<T, 1>(query, key, value, key_valid, out, scratch, s, num_sms, programmatic, stream);
}

}  // namespace

int64_t decode_attention_scratch_floats(const DecodeAttentionShape& s, int num_sms) {
  if (s.batch == 0 || s.heads == 0 || s.cache_len == 0) return 0;
  const int64_t parts = s.batch * s.heads * splits_of(s, num_sms).splits;
  return parts * s.head_dim + 2 * parts;
}

cudaError_t decode_attention(const void* query, const void* key, const void* value,
                             const bool* key_valid, void* out, float* scratch, DType dtype,
                             const DecodeAttentionShape& shape, int num_sms, bool vectorized,
                             bool programmatic, cudaStream_t stream) {
  if (shape.batch == 0 || shape.heads == 0 || shape.head_dim == 0) return cudaSuccess;
  if (shape.cache_len == 0) {
    // No slot at all: every row has no valid slot, so the output is zeros.
    const size_t elem = dtype == DType::kFloat32 ? 4 : 2;
    return cudaMemsetAsync(out, 0, size_t(shape.batch * shape.heads * shape.head_dim) * elem, stream);
  }
  switch (dtype) {
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(query, key, value, key_valid, out, scratch, shape, num_sms, vectorized,
                                 programmatic, stream);
    case DType::kFloat16:
      return launch_typed<__half>(query, key, value, key_valid, out, scratch, shape, num_sms, vectorized,
                                 programmatic, stream);
    default:
      return launch_typed<float>(query, key, value, key_valid, out, scratch, shape, num_sms, vectorized,
                                 programmatic, stream);
  }
}

}  // namespace vpit::cuda
