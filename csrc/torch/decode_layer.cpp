#include "decode_layer.h"

#include <ATen/MemoryOverlap.h>

#include <cmath>
#include <string>

#include "checks.h"

namespace vpit {
namespace {

// op is a variable here, so the message is assembled rather than pasted like VPIT_CHECK_ARG's.
#define CHECK_DL(op, cond, ...) TORCH_CHECK(cond, ::vpit::detail::cat("vpit_fast.", op, ": ", __VA_ARGS__))

void check_same(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                const char* name) {
  CHECK_DL(op, t.scalar_type() == ref.scalar_type(), name, " must have ", ref_name, "'s dtype ",
           ref.scalar_type(), ", got ", t.scalar_type());
  CHECK_DL(op, t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name,
           " is on ", ref.device(), ": all tensors must share a device");
}

// hidden [R, H] of a float dtype, last dimension contiguous.
void check_rows(const char* op, const at::Tensor& t, const char* name) {
  CHECK_DL(op, t.dim() == 2, name, " must be [rows, features], got shape ", t.sizes());
  CHECK_DL(op, is_float_kind(t), name, " must be float32, bfloat16 or float16, got ",
           t.scalar_type());
  CHECK_DL(op, t.size(1) <= 1 || t.stride(1) == 1, name,
           " must have a contiguous last dimension, got strides ", t.strides());
}

void check_weight(const char* op, const at::Tensor& ref, const at::Tensor& w, const char* name,
                  int64_t in_features) {
  check_same(op, ref, "hidden", w, name);
  CHECK_DL(op, w.dim() == 2 && w.size(1) == in_features, name, " must be [out_features, ",
           in_features, "], got shape ", w.sizes());
}

void check_bias(const char* op, const at::Tensor& ref, const OptionalTensor& b, const char* name,
                int64_t out_features) {
  if (!b.has_value()) return;
  check_same(op, ref, "hidden", *b, name);
  CHECK_DL(op, b->dim() == 1 && b->size(0) == out_features, name, " must be [", out_features,
           "], got shape ", b->sizes());
}

void check_norm(const char* op, const at::Tensor& hidden, const at::Tensor& norm_weight,
                double eps) {
  check_same(op, hidden, "hidden", norm_weight, "norm_weight");
  CHECK_DL(op, norm_weight.dim() == 1 && norm_weight.size(0) == hidden.size(1),
           "norm_weight must be [", hidden.size(1), "], got shape ", norm_weight.sizes());
  CHECK_DL(op, std::isfinite(eps) && eps >= 0, "eps must be a finite number >= 0, got ", eps);
}

// transformers' LlamaRMSNorm, rounding included.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor h = x.to(at::kFloat);
  h = h * at::rsqrt(h.pow(2).mean(-1, /*keepdim=*/true) + eps);
  return weight * h.to(x.scalar_type());
}

// transformers' apply_rotary_pos_emb on [R, heads, D] with cos, sin [R, 1, D] in x's dtype.
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  const at::Tensor rotated = at::cat({-x.narrow(-1, half, half), x.narrow(-1, 0, half)}, -1);
  return x * cos + rotated * sin;
}

at::Tensor cursor_index(const at::Tensor& cursor) { return cursor.reshape({1}); }

}  // namespace

at::Tensor decode_qkv_rope(const at::Tensor& hidden, const at::Tensor& norm_weight, double eps,
                           const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv,
                           const OptionalTensor& bq, const OptionalTensor& bk,
                           const OptionalTensor& bv, const at::Tensor& inv_freq, double rope_scale,
                           const at::Tensor& positions, const at::Tensor& cursor,
                           at::Tensor& key_cache, at::Tensor& value_cache) {
  const char* op = "decode_qkv_rope";
  check_rows(op, hidden, "hidden");
  check_norm(op, hidden, norm_weight, eps);
  const int64_t R = hidden.size(0), H = hidden.size(1);
  CHECK_DL(op, key_cache.dim() == 4, "key_cache must be [rows, kv_heads, cache_len, head_dim], got shape ",
           key_cache.sizes());
  CHECK_DL(op, value_cache.sizes() == key_cache.sizes(), "value_cache must have key_cache's shape ",
           key_cache.sizes(), ", got ", value_cache.sizes());
  check_same(op, hidden, "hidden", key_cache, "key_cache");
  check_same(op, hidden, "hidden", value_cache, "value_cache");
  const int64_t Hkv = key_cache.size(1), L = key_cache.size(2), D = key_cache.size(3);
  CHECK_DL(op, key_cache.size(0) == R, "key_cache must hold hidden's ", R, " rows, got shape ",
           key_cache.sizes());
  CHECK_DL(op, D > 0 && D % 2 == 0, "head_dim (key_cache's last dimension) must be even and "
           "positive for RoPE, got ", D);
  CHECK_DL(op, key_cache.stride(3) == 1 && value_cache.stride(3) == 1,
           "key_cache and value_cache must have a contiguous last dimension (they are written in "
           "place), got strides ", key_cache.strides(), " and ", value_cache.strides());
  check_weight(op, hidden, wq, "wq", H);
  CHECK_DL(op, wq.size(0) % D == 0, "wq must have heads * ", D, " rows, got ", wq.size(0));
  const int64_t heads = wq.size(0) / D;
  check_weight(op, hidden, wk, "wk", H);
  check_weight(op, hidden, wv, "wv", H);
  CHECK_DL(op, wk.size(0) == Hkv * D && wv.size(0) == Hkv * D, "wk and wv must be [", Hkv * D,
           ", ", H, "] for the cache's ", Hkv, " kv_heads of ", D, ", got ", wk.sizes(), " and ",
           wv.sizes());
  check_bias(op, hidden, bq, "bq", heads * D);
  check_bias(op, hidden, bk, "bk", Hkv * D);
  check_bias(op, hidden, bv, "bv", Hkv * D);
  CHECK_DL(op, inv_freq.scalar_type() == at::kFloat && inv_freq.dim() == 1 && inv_freq.size(0) == D / 2,
           "inv_freq must be a float32 [", D / 2, "] tensor, got ", inv_freq.scalar_type(), " ",
           inv_freq.sizes());
  CHECK_DL(op, std::isfinite(rope_scale), "rope_scale must be finite, got ", rope_scale);
  CHECK_DL(op, positions.scalar_type() == at::kLong && positions.dim() == 1 && positions.size(0) == R,
           "positions must be an int64 [", R, "] tensor, got ", positions.scalar_type(), " ",
           positions.sizes());
  CHECK_DL(op, cursor.scalar_type() == at::kLong && cursor.numel() == 1,
           "cursor must be a one-element int64 tensor (the cache slot), got ", cursor.scalar_type(),
           " ", cursor.sizes());
  for (const at::Tensor* t : {&inv_freq, &positions, &cursor})
    CHECK_DL(op, t->device() == hidden.device(), "inv_freq, positions and cursor must be on hidden's device ",
             hidden.device(), ", got ", t->device());
  if (hidden.device().is_cpu() && R > 0) {
    const int64_t slot = cursor.item<int64_t>();  // CUDA cannot check without a host sync
    CHECK_DL(op, slot >= 0 && slot < L, "cursor must be a slot in [0, ", L, "), got ", slot);
  }
  at::Tensor query = at::empty({R, heads, D}, hidden.options());
#ifdef VPIT_FAST_WITH_CUDA
  if (hidden.is_cuda() && decode_qkv_rope_cuda(hidden, norm_weight, eps, wq, wk, wv, bq, bk, bv, inv_freq,
                                               rope_scale, positions, cursor, key_cache, value_cache, query))
    return query;
#endif
  const at::Tensor xn = rms_norm(hidden, norm_weight, eps);
  const at::Tensor freqs = positions.to(at::kFloat).unsqueeze(1) * inv_freq.unsqueeze(0);
  const at::Tensor angles = at::cat({freqs, freqs}, -1).unsqueeze(1);  // [R, 1, D]
  const at::Tensor cos = (angles.cos() * rope_scale).to(hidden.scalar_type());
  const at::Tensor sin = (angles.sin() * rope_scale).to(hidden.scalar_type());
  query.copy_(rotate(at::linear(xn, wq, bq).view({R, heads, D}), cos, sin));
  const at::Tensor k = rotate(at::linear(xn, wk, bk).view({R, Hkv, D}), cos, sin);
  const at::Tensor v = at::linear(xn, wv, bv).view({R, Hkv, D});
  key_cache.index_copy_(2, cursor_index(cursor), k.unsqueeze(2));
  value_cache.index_copy_(2, cursor_index(cursor), v.unsqueeze(2));
  return query;
}

at::Tensor decode_gate_up(const at::Tensor& hidden, const at::Tensor& norm_weight, double eps,
                          const at::Tensor& w_gate, const at::Tensor& w_up,
                          const OptionalTensor& b_gate, const OptionalTensor& b_up) {
  const char* op = "decode_gate_up";
  check_rows(op, hidden, "hidden");
  check_norm(op, hidden, norm_weight, eps);
  const int64_t H = hidden.size(1);
  check_weight(op, hidden, w_gate, "w_gate", H);
  check_weight(op, hidden, w_up, "w_up", H);
  const int64_t I = w_gate.size(0);
  CHECK_DL(op, w_up.size(0) == I, "w_up must have w_gate's ", I, " rows, got ", w_up.size(0));
  check_bias(op, hidden, b_gate, "b_gate", I);
  check_bias(op, hidden, b_up, "b_up", I);
  at::Tensor out = at::empty({hidden.size(0), I}, hidden.options());
#ifdef VPIT_FAST_WITH_CUDA
  if (hidden.is_cuda() && decode_gate_up_cuda(hidden, norm_weight, eps, w_gate, w_up, b_gate, b_up, out))
    return out;
#endif
  const at::Tensor xn = rms_norm(hidden, norm_weight, eps);
  out.copy_(at::silu(at::linear(xn, w_gate, b_gate)) * at::linear(xn, w_up, b_up));
  return out;
}

void decode_proj_add_(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                      const OptionalTensor& bias) {
  const char* op = "decode_proj_add_";
  check_rows(op, residual, "residual");
  check_rows(op, x, "x");
  check_same(op, residual, "residual", x, "x");
  CHECK_DL(op, x.size(0) == residual.size(0), "x must have residual's ", residual.size(0),
           " rows, got shape ", x.sizes());
  // Strided views are "too hard" to compare exactly: then sharing the storage counts as overlap.
  const at::MemOverlapStatus overlap = at::get_overlap_status(residual, x);
  CHECK_DL(op, overlap == at::MemOverlapStatus::No ||
                   (overlap == at::MemOverlapStatus::TooHard && !residual.storage().is_alias_of(x.storage())),
           "x must not overlap residual (residual is written while x is read)");
  check_same(op, residual, "residual", weight, "weight");
  CHECK_DL(op, weight.dim() == 2 && weight.size(0) == residual.size(1) && weight.size(1) == x.size(1),
           "weight must be [", residual.size(1), ", ", x.size(1), "] (residual's features, x's "
           "features), got shape ", weight.sizes());
  if (bias.has_value()) {
    check_same(op, residual, "residual", *bias, "bias");
    CHECK_DL(op, bias->dim() == 1 && bias->size(0) == residual.size(1), "bias must be [",
             residual.size(1), "], got shape ", bias->sizes());
  }
#ifdef VPIT_FAST_WITH_CUDA
  if (residual.is_cuda() && decode_proj_add_cuda(residual, x, weight, bias)) return;
#endif
  residual.add_(at::linear(x, weight, bias));
}

}  // namespace vpit
