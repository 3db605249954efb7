#include "decode_attention_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace vpit::cpu {

void decode_attention(const float* query, const float* key, const float* value,
                      const bool* key_valid, float* out, const DecodeAttentionShape& s,
                      int64_t pair_begin, int64_t pair_end) {
  if (pair_begin >= pair_end) return;
  const int64_t group = s.heads / s.kv_heads, dim = s.head_dim;
  std::vector<float> scores(static_cast<size_t>(s.cache_len));
  std::vector<double> acc(static_cast<size_t>(dim));
  for (int64_t pair = pair_begin; pair < pair_end; ++pair) {
    const int64_t b = pair / s.heads, h = pair % s.heads, kvh = h / group;
    const float* q = query + b * s.q_stride_b + h * s.q_stride_h;
    const float* k = key + b * s.k_stride_b + kvh * s.k_stride_h;
    const float* v = value + b * s.v_stride_b + kvh * s.v_stride_h;
    const bool* valid = key_valid + b * s.valid_stride_b;

    float max_score = -std::numeric_limits<float>::infinity();
    for (int64_t l = 0; l < s.cache_len; ++l) {
      if (!valid[l]) continue;
      float dot = 0.f;
      for (int64_t d = 0; d < dim; ++d) dot += q[d] * k[l * s.k_stride_l + d];
      scores[l] = dot * s.scale;
      max_score = std::max(max_score, scores[l]);
    }
    std::fill(acc.begin(), acc.end(), 0.0);
    double denom = 0.0;
    for (int64_t l = 0; l < s.cache_len; ++l) {
      if (!valid[l]) continue;
      const double p = std::exp(double(scores[l]) - double(max_score));
      denom += p;
      for (int64_t d = 0; d < dim; ++d) acc[d] += p * v[l * s.v_stride_l + d];
    }
    float* o = out + pair * dim;
    for (int64_t d = 0; d < dim; ++d) o[d] = denom > 0.0 ? static_cast<float>(acc[d] / denom) : 0.f;
  }
}

}  // namespace vpit::cpu
