#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../cuda/segment_attention.h"
#include "checks.h"
#include "segment_attention.h"

namespace vpit {
namespace {

// A contiguous copy when t is not contiguous or not 16-byte aligned (the kernels move 16 bytes).
at::Tensor dense(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return cuda::is_aligned(c.data_ptr(), 16) ? c : c.clone();
}

cuda::SegmentAttentionShape check(const char* op, const at::Tensor& query, const at::Tensor& key,
                                  const at::Tensor& value, const at::Tensor& cu_seqlens,
                                  int64_t max_seqlen, double scale) {
  const std::string name = std::string("vpit_fast.") + op + ": ";
  VPIT_CHECK(query.dim() == 3 && key.dim() == 3 && value.dim() == 3, name,
             "query, key and value must be [tokens, heads, head_dim], got ", query.sizes(), ", ",
             key.sizes(), ", ", value.sizes());
  VPIT_CHECK(key.sizes() == value.sizes() && key.size(0) == query.size(0) && key.size(2) == query.size(2),
             name, "key ", key.sizes(), " and value ", value.sizes(),
             " must match and share tokens and head_dim with query ", query.sizes());
  VPIT_CHECK(key.size(1) > 0 && query.size(1) % key.size(1) == 0, name, "query heads (", query.size(1),
             ") must be a multiple of key/value heads (", key.size(1), ")");
  for (const at::Tensor* t : {&query, &key, &value}) {
    VPIT_CHECK(t->scalar_type() == at::kBFloat16, name, "query, key and value must be bfloat16, got ",
               t->scalar_type());
    VPIT_CHECK(t->is_cuda() && t->device() == query.device(), name,
               "query, key and value must be on one CUDA device, got ", t->device());
  }
  VPIT_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 2 && cu_seqlens.scalar_type() == at::kInt &&
                 cu_seqlens.device() == query.device(),
             name, "cu_seqlens must be a 1-D int32 tensor of at least 2 boundaries on ", query.device(),
             ", got ", cu_seqlens.scalar_type(), " of shape ", cu_seqlens.sizes(), " on ", cu_seqlens.device());
  VPIT_CHECK(cuda::segment_attention_supported(int(query.size(2)), int(std::min<int64_t>(max_seqlen, 1 << 30))),
             name, "head_dim must be 64 or 128 and max_seqlen in [1, ", cuda::kSegmentMaxSeqlen, "], got ",
             query.size(2), " and ", max_seqlen);
  VPIT_CHECK(scale > 0, name, "scale must be positive, got ", scale);
  VPIT_CHECK(cu_seqlens.numel() - 1 <= (int64_t(1) << 31) / ((cuda::kSegmentMaxSeqlen + 63) / 64), name,
             "too many segments: ", cu_seqlens.numel() - 1);
  return {query.size(0), int(query.size(1)), int(key.size(1)), int(query.size(2)),
          int(cu_seqlens.numel() - 1), int(max_seqlen), float(scale)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> segment_attention_cuda(const at::Tensor& query, const at::Tensor& key,
                                                          const at::Tensor& value, const at::Tensor& cu_seqlens,
                                                          int64_t max_seqlen, double scale) {
  const auto shape = check("segment_attention", query, key, value, cu_seqlens, max_seqlen, scale);
  const c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor q = dense(query), k = dense(key), v = dense(value), cu = cu_seqlens.contiguous();
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({query.size(1), query.size(0)}, q.options().dtype(at::kFloat));
  const cudaError_t err = cuda::segment_attention_forward(
      q.data_ptr(), k.data_ptr(), v.data_ptr(), cu.data_ptr<int32_t>(), out.data_ptr(),
      lse.data_ptr<float>(), cuda::DType::kBFloat16, shape, at::cuda::getCurrentCUDAStream());
  VPIT_CHECK(err == cudaSuccess, "vpit_fast.segment_attention: CUDA error: ", cudaGetErrorString(err));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> segment_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens, int64_t max_seqlen,
    double scale) {
  const auto shape = check("segment_attention_backward", query, key, value, cu_seqlens, max_seqlen, scale);
  VPIT_CHECK(grad_out.sizes() == query.sizes() && out.sizes() == query.sizes() &&
                 grad_out.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16 &&
                 grad_out.device() == query.device() && out.device() == query.device(),
             "vpit_fast.segment_attention_backward: grad_out and out must be bfloat16 like query ",
             query.sizes(), ", got ", grad_out.sizes(), " and ", out.sizes());
  VPIT_CHECK(lse.dim() == 2 && lse.size(0) == query.size(1) && lse.size(1) == query.size(0) &&
                 lse.scalar_type() == at::kFloat && lse.device() == query.device(),
             "vpit_fast.segment_attention_backward: lse must be float32 [heads, tokens] = [", query.size(1),
             ", ", query.size(0), "], got ", lse.scalar_type(), " of shape ", lse.sizes());
  const c10::cuda::CUDAGuard guard(query.device());
  const at::Tensor q = dense(query), k = dense(key), v = dense(value), o = dense(out), g = dense(grad_out);
  const at::Tensor l = lse.contiguous(), cu = cu_seqlens.contiguous();
  at::Tensor grad_q = at::empty_like(q), grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  at::Tensor delta = at::empty_like(l);
  const cudaError_t err = cuda::segment_attention_backward(
      g.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), o.data_ptr(), l.data_ptr<float>(),
      cu.data_ptr<int32_t>(), grad_q.data_ptr(), grad_k.data_ptr(), grad_v.data_ptr(), delta.data_ptr<float>(),
      cuda::DType::kBFloat16, shape, at::cuda::getCurrentCUDAStream());
  VPIT_CHECK(err == cudaSuccess, "vpit_fast.segment_attention_backward: CUDA error: ", cudaGetErrorString(err));
  return {grad_q, grad_k, grad_v};
}

}  // namespace vpit
