// Causal attention within short packed segments (every segment at most kSegmentMaxSeqlen tokens),
// forward and backward, on tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulate).
// Framework-free: plain pointers, a stream, an error code.
//
// Why a kernel of our own: FlashAttention-2's varlen kernels tile 128 query rows per block and
// pay fixed costs per (segment, head) block; MetaMorph-like samples are ~50-250 tokens, where
// those kernels run far from the memory floor. Here one block stages the keys and values a chunk
// of 64 rows sees, once for a whole GQA group of query heads; each warp keeps a 16-row tile's
// scores, probabilities and gradients in registers (one online-softmax pass in the forward), and
// the K/V gradients of a GQA group are summed inside the block, without atomics.
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>

#include "dtype.h"

namespace vpit::cuda {

// The longest segment the kernels take; longer batches go to FlashAttention.
constexpr int kSegmentMaxSeqlen = 256;

struct SegmentAttentionShape {
  int64_t tokens;    // N: rows of q/k/v
  int heads;         // H query heads
  int kv_heads;      // Hkv, dividing H
  int head_dim;      // D: 64 or 128
  int num_segments;  // S: cu_seqlens holds S + 1 boundaries
  int max_seqlen;    // at least the longest segment, at most kSegmentMaxSeqlen
  float scale;       // softmax scale
};

// True when the kernels take this head_dim and max_seqlen.
bool segment_attention_supported(int head_dim, int max_seqlen);

// q [N, H, D], k/v [N, Hkv, D], out [N, H, D] (bf16, contiguous, 16-byte aligned),
// lse [H, N] fp32 (natural-log log-sum-exp of each row's scaled scores), cu_seqlens [S + 1] int32
// rising from 0 to N. Rows outside every segment are not written.
cudaError_t segment_attention_forward(const void* q, const void* k, const void* v,
                                      const int32_t* cu_seqlens, void* out, float* lse,
                                      DType dtype, const SegmentAttentionShape& shape,
                                      cudaStream_t stream);

// Gradients of the forward above. delta: [H, N] fp32 workspace (rowsum(grad_out * out), written
// by the dQ kernel and read by the dK/dV kernel).
cudaError_t segment_attention_backward(const void* grad_out, const void* q, const void* k,
                                       const void* v, const void* out, const float* lse,
                                       const int32_t* cu_seqlens, void* grad_q, void* grad_k,
                                       void* grad_v, float* delta, DType dtype,
                                       const SegmentAttentionShape& shape, cudaStream_t stream);

}  // namespace vpit::cuda
