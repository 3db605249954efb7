// CPU kernel of decode attention (the contract: kernels/decode_attention.h). Framework-free,
// fp32, one range of (row, head) pairs per call so the caller parallelises as it likes.
#pragma once
#include <cstdint>

#include "../kernels/decode_attention.h"

namespace vpit::cpu {

// Pairs [pair_begin, pair_end) of the flattened (batch, heads) index: out[pair] = the softmax-
// weighted sum of the valid value rows. Scores are fp32, the softmax sums and the weighted sum
// are accumulated in double.
void decode_attention(const float* query, const float* key, const float* value,
                      const bool* key_valid, float* out, const DecodeAttentionShape& shape,
                      int64_t pair_begin, int64_t pair_end);

}  // namespace vpit::cpu
