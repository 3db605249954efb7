#include "decode_attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "../cpu/decode_attention_cpu.h"
#include "checks.h"

namespace vpit {
namespace {

at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

DecodeAttentionShape shape_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& valid, double scale) {
  DecodeAttentionShape s{};
  s.batch = q.size(0);
  s.heads = q.size(1);
  s.head_dim = q.size(2);
  s.kv_heads = k.size(1);
  s.cache_len = k.size(2);
  s.q_stride_b = q.stride(0);
  s.q_stride_h = q.stride(1);
  s.k_stride_b = k.stride(0);
  s.k_stride_h = k.stride(1);
  s.k_stride_l = k.stride(2);
  s.v_stride_b = v.stride(0);
  s.v_stride_h = v.stride(1);
  s.v_stride_l = v.stride(2);
  s.valid_stride_b = valid.stride(0);
  s.scale = static_cast<float>(scale);
  return s;
}

}  // namespace

#define CHECK_DA(cond, ...) VPIT_CHECK_ARG("decode_attention", cond, __VA_ARGS__)

DecodeAttentionArgs check_decode_attention(const at::Tensor& query, const at::Tensor& key,
                                           const at::Tensor& value, const at::Tensor& key_valid,
                                           double scale) {
  CHECK_DA(query.dim() == 3, "query must be [batch, heads, head_dim], got shape ", query.sizes());
  CHECK_DA(key.dim() == 4, "key must be [batch, kv_heads, cache_len, head_dim], got shape ",
           key.sizes());
  CHECK_DA(value.sizes() == key.sizes(), "value must have key's shape ", key.sizes(), ", got ",
           value.sizes());
  CHECK_DA(is_float_kind(query), "query must be float32, bfloat16 or float16, got ",
           query.scalar_type());
  CHECK_DA(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(),
           "query, key and value must share a dtype, got ", query.scalar_type(), ", ",
           key.scalar_type(), ", ", value.scalar_type());
  CHECK_DA(key_valid.scalar_type() == at::kBool, "key_valid must be bool, got ",
           key_valid.scalar_type());
  CHECK_DA(key.device() == query.device() && value.device() == query.device() &&
               key_valid.device() == query.device(),
           "query, key, value and key_valid must share a device, got ", query.device(), ", ",
           key.device(), ", ", value.device(), ", ", key_valid.device());
  const int64_t batch = query.size(0), heads = query.size(1), dim = query.size(2);
  CHECK_DA(key.size(0) == batch && key.size(3) == dim, "key must be [", batch,
           ", kv_heads, cache_len, ", dim, "] to match query ", query.sizes(), ", got ",
           key.sizes());
  const int64_t kv_heads = key.size(1), cache_len = key.size(2);
  CHECK_DA(kv_heads > 0 ? heads % kv_heads == 0 : heads == 0, "query's ", heads,
           " heads must be a multiple of key's ", kv_heads, " kv_heads");
  CHECK_DA(key_valid.dim() == 2 && key_valid.size(0) == batch && key_valid.size(1) == cache_len,
           "key_valid must be [", batch, ", ", cache_len, "], got shape ", key_valid.sizes());
  CHECK_DA(dim <= kDecodeAttentionMaxHeadDim, "head_dim must be at most ",
           kDecodeAttentionMaxHeadDim, ", got ", dim);
  CHECK_DA(std::isfinite(scale), "scale must be finite, got ", scale);
  DecodeAttentionArgs args{last_dim_contiguous(query), last_dim_contiguous(key),
                           last_dim_contiguous(value), last_dim_contiguous(key_valid), {}};
  args.shape = shape_of(args.query, args.key, args.value, args.key_valid, scale);
  return args;
}

at::Tensor decode_attention_cpu(const at::Tensor& query, const at::Tensor& key,
                                const at::Tensor& value, const at::Tensor& key_valid,
                                double scale) {
  DecodeAttentionArgs a = check_decode_attention(query, key, value, key_valid, scale);
  // The CPU kernel computes in fp32: other dtypes are converted (contiguous fp32 copies).
  if (query.scalar_type() != at::kFloat) {
    a.query = a.query.to(at::kFloat).contiguous();
    a.key = a.key.to(at::kFloat).contiguous();
    a.value = a.value.to(at::kFloat).contiguous();
    a.shape = shape_of(a.query, a.key, a.value, a.key_valid, scale);
  }
  const DecodeAttentionShape s = a.shape;
  at::Tensor out = at::empty({s.batch, s.heads, s.head_dim}, a.query.options());
  const float* q = a.query.data_ptr<float>();
  const float* k = a.key.data_ptr<float>();
  const float* v = a.value.data_ptr<float>();
  const bool* valid = a.key_valid.data_ptr<bool>();
  float* o = out.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, s.cache_len * s.head_dim));
  at::parallel_for(0, s.batch * s.heads, grain, [&](int64_t begin, int64_t end) {
    cpu::decode_attention(q, k, v, valid, o, s, begin, end);
  });
  return out.to(query.scalar_type());
}

}  // namespace vpit
