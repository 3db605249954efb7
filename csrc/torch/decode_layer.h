// Torch adapters of the fused decode-step projections (csrc/kernels/decode_layer.h): check the
// arguments, then run the CUDA kernels, or the same computation in ATen ops (on the CPU, and on
// CUDA for what the kernels do not take: more than kDecodeLayerMaxRows rows, unaligned or
// non-contiguous operands). Inference only: vpit_fast/ops/decode_layer.py registers no backward.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "../kernels/decode_layer.h"

namespace vpit {

using OptionalTensor = std::optional<at::Tensor>;

// Returns query [R, heads, head_dim]; writes k, v at slot cursor of key_cache / value_cache
// [R, kv_heads, cache_len, head_dim]. Shapes and dtypes: vpit_fast/ops/decode_layer.py.
at::Tensor decode_qkv_rope(const at::Tensor& hidden, const at::Tensor& norm_weight, double eps,
                           const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv,
                           const OptionalTensor& bq, const OptionalTensor& bk,
                           const OptionalTensor& bv, const at::Tensor& inv_freq, double rope_scale,
                           const at::Tensor& positions, const at::Tensor& cursor,
                           at::Tensor& key_cache, at::Tensor& value_cache);

// Returns silu(gate) * up [R, intermediate] of the RMSNorm of hidden [R, H].
at::Tensor decode_gate_up(const at::Tensor& hidden, const at::Tensor& norm_weight, double eps,
                          const at::Tensor& w_gate, const at::Tensor& w_up,
                          const OptionalTensor& b_gate, const OptionalTensor& b_up);

// residual [R, N] += x [R, K] weight^T + bias.
void decode_proj_add_(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                      const OptionalTensor& bias);

#ifdef VPIT_FAST_WITH_CUDA
// The CUDA kernels for checked arguments; false (nothing launched) when they do not take them.
bool decode_qkv_rope_cuda(const at::Tensor& hidden, const at::Tensor& norm_weight, double eps,
                          const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv,
                          const OptionalTensor& bq, const OptionalTensor& bk,
                          const OptionalTensor& bv, const at::Tensor& inv_freq, double rope_scale,
                          const at::Tensor& positions, const at::Tensor& cursor,
                          at::Tensor& key_cache, at::Tensor& value_cache, at::Tensor& query);
bool decode_gate_up_cuda(const at::Tensor& hidden, const at::Tensor& norm_weight, double eps,
                         const at::Tensor& w_gate, const at::Tensor& w_up,
                         const OptionalTensor& b_gate, const OptionalTensor& b_up, at::Tensor& out);
bool decode_proj_add_cuda(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                          const OptionalTensor& bias);
#endif

}  // namespace vpit
