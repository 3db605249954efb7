// The shape contract of the fused decode-step projections of a LLaMA-family decoder layer (LLaMA,
// Qwen2, Mistral): one new token per row, so every projection is a matrix-vector product per row
// and reads its weights once. Framework-free: shared by the CUDA kernels and their launchers. The
// reference is vpit_fast.ops.reference.decode_qkv_rope / decode_gate_up / decode_proj_add.
//
// Per layer the decode step runs
//   q, cache[k, v] = decode_qkv_rope(x)       RMSNorm -> q/k/v projections -> RoPE -> KV cache slot
//   a              = decode_attention(q, cache)
//   x             += decode_proj_add(a)       o projection added to the residual stream
//   m              = decode_gate_up(x)        RMSNorm -> silu(gate) * up
//   x             += decode_proj_add(m)       down projection added to the residual stream
//
// Rounding follows transformers' eager modules step for step (the normalised row rounded to the
// model dtype before the norm weight multiplies it, each projection's output rounded before RoPE,
// SiLU or the residual add), so the fused step differs from the model's own only by the order of
// the fp32 sums inside each dot product.
#pragma once
#include <cstdint>

namespace vpit {

// Most rows (sequences) one call takes: each weight is read once for all rows, which the kernels
// keep in registers. Larger batches fill the GPU with dense GEMMs anyway.
constexpr int64_t kDecodeLayerMaxRows = 8;

// x: [rows, hidden] (row stride x_stride); norm_weight [hidden]. Weights row-major contiguous
// [out, hidden]; biases [out] or null. inv_freq: [head_dim / 2] fp32 RoPE frequencies,
// rope_scale multiplies cos and sin (transformers' attention_scaling). positions: [rows] int64.
// query_out: [rows, heads, head_dim] contiguous. key_cache, value_cache: [rows, kv_heads,
// cache_len, head_dim] with the given strides (last dimension contiguous), written at slot
// *cursor (a device scalar, so a CUDA graph replays the step at the next slot).
struct QkvRopeShape {
  int64_t rows, hidden, heads, kv_heads, head_dim, x_stride;
  int64_t cache_stride_r, cache_stride_h, cache_stride_l;
  float eps, rope_scale;
};

// x: [rows, hidden] (row stride x_stride); gate and up weights [intermediate, hidden]; out:
// [rows, intermediate] contiguous = silu(x_n W_gate^T + b_gate) * (x_n W_up^T + b_up), x_n the
// RMSNorm of x.
struct GateUpShape {
  int64_t rows, hidden, intermediate, x_stride;
  float eps;
};

// residual [rows, out_features] (row stride residual_stride) += x W^T + b; x: [rows,
// in_features] (row stride x_stride); weight [out_features, in_features].
struct ProjAddShape {
  int64_t rows, in_features, out_features, x_stride, residual_stride;
};

}  // namespace vpit
