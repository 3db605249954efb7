// segment_attention: causal attention within short packed segments (csrc/cuda/segment_attention.h),
// CUDA only; the Python backend picks it when every segment is short enough.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace vpit {

#ifdef VPIT_FAST_WITH_CUDA
// query [N, H, D], key/value [N, Hkv, D] bf16 on one CUDA device; cu_seqlens [S + 1] int32.
// Returns (out [N, H, D], lse [H, N] fp32).
std::tuple<at::Tensor, at::Tensor> segment_attention_cuda(const at::Tensor& query, const at::Tensor& key,
                                                          const at::Tensor& value, const at::Tensor& cu_seqlens,
                                                          int64_t max_seqlen, double scale);

// (grad_query, grad_key, grad_value) of the forward above.
std::tuple<at::Tensor, at::Tensor, at::Tensor> segment_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens, int64_t max_seqlen,
    double scale);
#endif

}  // namespace vpit
