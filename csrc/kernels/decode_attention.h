// The shape contract of decode attention: one query token per (row, head) against a static KV
// cache whose valid slots a mask marks. Framework-free: shared by the CPU kernel, the CUDA
// kernel and their unit tests. The reference is vpit_fast.ops.reference.decode_attention.
//
//   out[b, h] = sum_l p[l] * value[b, h / G, l],  p = softmax over valid l of
//               scale * <query[b, h], key[b, h / G, l]>,  G = heads / kv_heads (grouped queries)
//
// A row with no valid slot gets zeros (SDPA would give NaN there). Invalid slots are never
// read, so an unfilled cache may hold anything.
#pragma once
#include <cstdint>

namespace vpit {

// Largest head dimension the kernels take (the CUDA kernel keeps a block's queries in shared memory).
constexpr int64_t kDecodeAttentionMaxHeadDim = 256;

struct DecodeAttentionShape {
  int64_t batch, heads, kv_heads, cache_len, head_dim;
  // Element strides. query: [batch, heads, head_dim]; key, value: [batch, kv_heads, cache_len,
  // head_dim]; key_valid: [batch, cache_len]. The last dimension of each is contiguous. The
  // output is [batch, heads, head_dim] contiguous.
  int64_t q_stride_b, q_stride_h;
  int64_t k_stride_b, k_stride_h, k_stride_l;
  int64_t v_stride_b, v_stride_h, v_stride_l;
  int64_t valid_stride_b;
  float scale;  // multiplies the dot products (usually 1 / sqrt(head_dim))
};

}  // namespace vpit
