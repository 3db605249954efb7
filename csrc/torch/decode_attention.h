// Torch adapters of decode attention: check the arguments, then launch the CPU or CUDA kernel.
// Inference only: no backward (vpit_fast/ops/decode_attention.py says so).
#pragma once
#include <ATen/ATen.h>

#include "../kernels/decode_attention.h"

namespace vpit {

// query [B, H, D], key and value [B, Hkv, L, D] of one floating dtype, key_valid [B, L] bool,
// all on one device, H a multiple of Hkv, D <= kDecodeAttentionMaxHeadDim, scale finite.
// Returns the tensors as the kernels read them (last dimension contiguous; inputs are copied only
// when it is not) and their shape.
struct DecodeAttentionArgs {
  at::Tensor query, key, value, key_valid;
  DecodeAttentionShape shape;
};
DecodeAttentionArgs check_decode_attention(const at::Tensor& query, const at::Tensor& key,
                                           const at::Tensor& value, const at::Tensor& key_valid,
                                           double scale);

// Returns out [B, H, D] in query's dtype.
at::Tensor decode_attention_cpu(const at::Tensor& query, const at::Tensor& key,
                                const at::Tensor& value, const at::Tensor& key_valid,
                                double scale);
#ifdef VPIT_FAST_WITH_CUDA
at::Tensor decode_attention_cuda(const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& key_valid,
                                 double scale);
#endif

}  // namespace vpit
