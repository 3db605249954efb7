#include "decode_dispatch_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace vpit::cpu {

void decode_dispatch_prepare(const DecodeStateIn& in, const float* visual_pred,
                             const int64_t* eos_ids, int64_t num_eos, const DecodeStateOut& out,
                             float* visual, int64_t row_begin, int64_t row_end, int64_t dim,
                             const DecodeIds& ids, bool normalize) {
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t text_id = in.text_ids[row];
    const bool is_eos = std::find(eos_ids, eos_ids + num_eos, text_id) != eos_ids + num_eos;
    const RowStep s = decode_row_step(in.mode[row], in.visual_count[row], in.images_left[row],
                                      text_id, is_eos, ids);
    store_row_step(out, row, s);

    float* dst = visual + row * dim;
    if (!s.emits_visual) {
      std::fill(dst, dst + dim, 0.f);
      continue;
    }
    const float* src = visual_pred + row * dim;
    if (!normalize) {
      std::copy(src, src + dim, dst);
      continue;
    }
    double sum_sq = 0.0;
    for (int64_t c = 0; c < dim; ++c) sum_sq += double(src[c]) * src[c];
    const float denom = std::max(static_cast<float>(std::sqrt(sum_sq)), kVisualNormEps);
    for (int64_t c = 0; c < dim; ++c) dst[c] = src[c] / denom;
  }
}

void decode_dispatch_assemble(const int64_t* next_ids, const bool* emits_visual,
                              const void* adapted, const void* table,
                              int64_t table_row_stride_bytes, void* out, int64_t row_bytes,
                              int64_t row_begin, int64_t row_end) {
  const auto* adapted_bytes = static_cast<const char*>(adapted);
  const auto* table_bytes = static_cast<const char*>(table);
  auto* out_bytes = static_cast<char*>(out);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const char* src = emits_visual[row] ? adapted_bytes + row * row_bytes
                                        : table_bytes + next_ids[row] * table_row_stride_bytes;
    std::memcpy(out_bytes + row * row_bytes, src, static_cast<size_t>(row_bytes));
  }
}

}  // namespace vpit::cpu
