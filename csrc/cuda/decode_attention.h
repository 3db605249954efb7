// Launcher of the CUDA decode attention (the contract: kernels/decode_attention.h).
// Framework-free: plain pointers, a stream, an error code. It never synchronises or reads device
// memory on the host, so it can be captured in a CUDA graph.
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>

#include "../kernels/decode_attention.h"
#include "dtype.h"

namespace vpit::cuda {

// Slots one thread block scores at a time (a tile).
constexpr int64_t kDecodeAttentionTile = 128;

// Scratch of one call, in floats: partial outputs [batch, heads, splits, head_dim] and the
// max and sum [batch, heads, splits] of each split (splits depend on the shape and num_sms).
int64_t decode_attention_scratch_floats(const DecodeAttentionShape& shape, int num_sms);

// Split-K (flash-decoding) attention. The cache is cut into tiles of kDecodeAttentionTile slots
// and the tiles into splits, enough to fill num_sms SMs about twice: one block per (split, KV
// head, group of <= 8 query heads, row) walks its tiles with an online softmax for all the query
// heads sharing the KV head (each cached key and value is read once per such group); a second
// kernel merges the splits. Tiles without a valid slot cost one read of the mask. query, key,
// value, out: `dtype`; out [batch, heads, head_dim] contiguous; scratch:
// decode_attention_scratch_floats(shape, num_sms) floats. `vectorized`: every row start of query,
// key and value is 16-byte aligned (the caller checks), so rows move in 16-byte packs.
// `programmatic`: both kernels use programmatic dependent launch (pdl.cuh; Hopper and later), so
// they start while the kernel before them ends and let the next kernel start early.
// head_dim <= kDecodeAttentionMaxHeadDim; batch < 65536.
cudaError_t decode_attention(const void* query, const void* key, const void* value,
                             const bool* key_valid, void* out, float* scratch, DType dtype,
                             const DecodeAttentionShape& shape, int num_sms, bool vectorized,
                             bool programmatic, cudaStream_t stream);

}  // namespace vpit::cuda
