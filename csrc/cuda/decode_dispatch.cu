// The fused modality dispatch of one decode step.
//
// prepare: one warp per row. The lanes share the row's state (broadcast loads), test the sampled
// id against the end-of-turn ids together (ballot), and lane 0 writes the new state; the whole
// warp then writes the visual token in 16-byte packs, reducing its norm first when normalising.
// assemble: one thread per word of the output (a pure copy, so no dtype conversion): the row's
// source is the adapter output or an embedding-table row, picked per row.
#include "decode_dispatch.h"

#include <algorithm>
#include <cassert>  // declares __assert_fail for device code
#include <type_traits>

#include "dtypes.cuh"

namespace vpit::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
prepare_kernel(DecodeStateIn in, const T* __restrict__ visual_pred,
               const int64_t* __restrict__ eos_ids, int64_t num_eos, DecodeStateOut out,
               T* __restrict__ visual, int64_t batch, int64_t dim, DecodeIds ids, bool normalize) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= batch) return;  // uniform per warp
  const int lane = threadIdx.x % 32;

  const int64_t text_id = in.text_ids[row];
  bool hit = false;
  for (int64_t e = lane; e < num_eos; e += 32) hit |= eos_ids[e] == text_id;
  const bool is_eos = __any_sync(0xffffffffu, hit);
  const RowStep s = decode_row_step(in.mode[row], in.visual_count[row], in.images_left[row],
                                    text_id, is_eos, ids);
  if (lane == 0) store_row_step(out, row, s);

  T* dst = visual + row * dim;
  if (!s.emits_visual) {
    const float zeros[VEC] = {};
    for (int64_t c = int64_t(lane) * VEC; c < dim; c += 32 * VEC) store_floats<T, VEC>(dst + c, zeros);
    return;
  }
  const T* src = visual_pred + row * dim;
  float denom = 1.f;
  if (normalize) {
    float sum_sq = 0.f;
    for (int64_t c = int64_t(lane) * VEC; c < dim; c += 32 * VEC) {
      float v[VEC];
      load_floats<T, VEC>(src + c, v);
#pragma unroll
      for (int i = 0; i < VEC; ++i) sum_sq += v[i] * v[i];
    }
    denom = fmaxf(sqrtf(warp_sum(sum_sq)), kVisualNormEps);
  }
  // Without normalisation v / 1 is exact: the token is copied bit for bit.
  for (int64_t c = int64_t(lane) * VEC; c < dim; c += 32 * VEC) {
    float v[VEC];
    load_floats<T, VEC>(src + c, v);
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] /= denom;
    store_floats<T, VEC>(dst + c, v);
  }
}

template <typename Word>
__global__ void __launch_bounds__(kThreads)
assemble_kernel(const int64_t* __restrict__ next_ids, const bool* __restrict__ emits_visual,
                const Word* __restrict__ adapted, const Word* __restrict__ table,
                int64_t table_rows, int64_t table_stride_words, Word* __restrict__ out,
                int64_t words, int64_t row_words) {
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < words;
       i += int64_t(gridDim.x) * kThreads) {
    const int64_t row = i / row_words;
    const int64_t w = i - row * row_words;
    const Word* src;
    if (emits_visual[row]) {
      src = adapted + row * row_words;
    } else {
      const int64_t id = next_ids[row];
      if (id < 0 || id >= table_rows) {
        // Called directly (not through assert) so NDEBUG builds keep the check, as PyTorch's
        // CUDA_KERNEL_ASSERT does. The thread stops here; the launch reports cudaErrorAssert.
        __assert_fail("vpit_fast.decode_dispatch_assemble: next_ids[row] is outside token_embedding",
                      __FILE__, __LINE__, __func__);
      }
      src = table + id * table_stride_words;
    }
    out[i] = src[w];
  }
}


// Widest pack (at most 16 bytes of T) that divides dim and suits both pointers.
template <typename T>
int pick_vec(int64_t dim, const void* a, const void* b) {
  for (int vec = 16 / int(sizeof(T)); vec > 1; vec /= 2) {
    if (dim % vec == 0 && is_aligned(a, vec * sizeof(T)) && is_aligned(b, vec * sizeof(T))) return vec;
  }
  return 1;
}

template <typename T>
cudaError_t prepare_typed(const DecodeStateIn& in, const T* visual_pred, const int64_t* eos_ids,
                          int64_t num_eos, const DecodeStateOut& out, T* visual, int64_t batch,
                          int64_t dim, const DecodeIds& ids, bool normalize, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  const dim3 blocks(static_cast<unsigned>((batch + kWarps - 1) / kWarps));
  const auto launch = [&](auto vec) {
    prepare_kernel<T, decltype(vec)::value><<<blocks, kThreads, 0, stream>>>(
        in, visual_pred, eos_ids, num_eos, out, visual, batch, dim, ids, normalize);
  };
  switch (pick_vec<T>(dim, visual_pred, visual)) {
    case 8: launch(std::integral_constant<int, 8>{}); break;  // 16-byte packs of 2-byte types
    case 4: launch(std::integral_constant<int, 4>{}); break;
    case 2: launch(std::integral_constant<int, 2>{}); break;
    default: launch(std::integral_constant<int, 1>{}); break;
  }
  return cudaGetLastError();
}

template <typename Word>
void launch_assemble(const int64_t* next_ids, const bool* emits_visual, const void* adapted,
                     const void* table, int64_t table_rows, int64_t table_row_stride_bytes,
                     void* out, int64_t batch, int64_t row_bytes, cudaStream_t stream) {
  const int64_t row_words = row_bytes / int64_t(sizeof(Word));
  const int64_t words = batch * row_words;
  // Grid-stride beyond 2^20 blocks keeps the grid within limits for any size.
  const int64_t blocks = std::min<int64_t>((words + kThreads - 1) / kThreads, int64_t(1) << 20);
  assemble_kernel<Word><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      next_ids, emits_visual, static_cast<const Word*>(adapted), static_cast<const Word*>(table),
      table_rows, table_row_stride_bytes / int64_t(sizeof(Word)), static_cast<Word*>(out), words,
      row_words);
}

}  // namespace

cudaError_t decode_dispatch_prepare(const DecodeStateIn& in, const void* visual_pred,
                                    const int64_t* eos_ids, int64_t num_eos,
                                    const DecodeStateOut& out, void* visual, DType dtype,
                                    int64_t batch, int64_t dim, const DecodeIds& ids,
                                    bool normalize, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return prepare_typed(in, static_cast<const float*>(visual_pred), eos_ids, num_eos, out,
                           static_cast<float*>(visual), batch, dim, ids, normalize, stream);
    case DType::kBFloat16:
      return prepare_typed(in, static_cast<const __nv_bfloat16*>(visual_pred), eos_ids, num_eos,
                           out, static_cast<__nv_bfloat16*>(visual), batch, dim, ids, normalize,
                           stream);
    case DType::kFloat16:
      return prepare_typed(in, static_cast<const __half*>(visual_pred), eos_ids, num_eos, out,
                           static_cast<__half*>(visual), batch, dim, ids, normalize, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t decode_dispatch_assemble(const int64_t* next_ids, const bool* emits_visual,
                                     const void* adapted, const void* table, int64_t table_rows,
                                     int64_t table_row_stride_bytes, void* out, int64_t batch,
                                     int64_t row_bytes, cudaStream_t stream) {
  if (batch == 0 || row_bytes == 0) return cudaSuccess;
  // The widest word that divides the row and the table stride and suits every pointer.
  const auto fits = [&](int64_t bytes) {
    return row_bytes % bytes == 0 && table_row_stride_bytes % bytes == 0 &&
           is_aligned(adapted, bytes) && is_aligned(table, bytes) && is_aligned(out, bytes);
  };
  if (fits(16)) {
    launch_assemble<uint4>(next_ids, emits_visual, adapted, table, table_rows,
                           table_row_stride_bytes, out, batch, row_bytes, stream);
  } else if (fits(8)) {
    launch_assemble<uint2>(next_ids, emits_visual, adapted, table, table_rows,
                           table_row_stride_bytes, out, batch, row_bytes, stream);
  } else if (fits(4)) {
    launch_assemble<uint32_t>(next_ids, emits_visual, adapted, table, table_rows,
                              table_row_stride_bytes, out, batch, row_bytes, stream);
  } else if (fits(2)) {
    launch_assemble<uint16_t>(next_ids, emits_visual, adapted, table, table_rows,
                              table_row_stride_bytes, out, batch, row_bytes, stream);
  } else {
    launch_assemble<uint8_t>(next_ids, emits_visual, adapted, table, table_rows,
                             table_row_stride_bytes, out, batch, row_bytes, stream);
  }
  return cudaGetLastError();
}

}  // namespace vpit::cuda
