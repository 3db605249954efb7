// CPU kernels of the decode-step modality dispatch. Framework-free: fp32 visual tokens, raw
// bytes for the embedding rows, one row range per call so the caller parallelises as it likes.
#pragma once
#include <cstdint>

#include "../kernels/decode_step.h"

namespace vpit::cpu {

// Rows [row_begin, row_end) of the step: state transition (decode_row_step), and the emitted
// visual token: visual_pred's row (divided by max(L2 norm, 1e-12) with `normalize`) on rows that
// emit one, zeros elsewhere. visual_pred and visual: [B, dim] fp32; eos_ids: [num_eos].
void decode_dispatch_prepare(const DecodeStateIn& in, const float* visual_pred,
                             const int64_t* eos_ids, int64_t num_eos, const DecodeStateOut& out,
                             float* visual, int64_t row_begin, int64_t row_end, int64_t dim,
                             const DecodeIds& ids, bool normalize);

// Rows [row_begin, row_end) of the next input embeddings: adapted's row where emits_visual,
// else row next_ids[row] of the table. Rows are copied as bytes (adapted, table and out share
// one dtype). The caller has checked every gathered id lies inside the table.
// adapted, out: [B, row_bytes] contiguous; table rows start table_row_stride_bytes apart.
void decode_dispatch_assemble(const int64_t* next_ids, const bool* emits_visual,
                              const void* adapted, const void* table,
                              int64_t table_row_stride_bytes, void* out, int64_t row_bytes,
                              int64_t row_begin, int64_t row_end);

}  // namespace vpit::cpu
