// Unit tests of the framework-free CPU decode attention: grouped heads against a direct double
// computation, invalid slots holding NaN never read, and a row with no valid slot giving zeros.
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "check.h"
#include "cpu/decode_attention_cpu.h"

static vpit::DecodeAttentionShape contiguous_shape(int64_t batch, int64_t heads, int64_t kv_heads,
                                                   int64_t len, int64_t dim) {
  vpit::DecodeAttentionShape s{};
  s.batch = batch;
  s.heads = heads;
  s.kv_heads = kv_heads;
  s.cache_len = len;
  s.head_dim = dim;
  s.q_stride_b = heads * dim;
  s.q_stride_h = dim;
  s.k_stride_b = s.v_stride_b = kv_heads * len * dim;
  s.k_stride_h = s.v_stride_h = len * dim;
  s.k_stride_l = s.v_stride_l = dim;
  s.valid_stride_b = len;
  s.scale = 1.f / std::sqrt(float(dim));
  return s;
}

static void test_against_direct_double() {
  const int64_t B = 2, H = 6, Hkv = 2, L = 37, D = 5;
  const vpit::DecodeAttentionShape s = contiguous_shape(B, H, Hkv, L, D);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  std::vector<float> q(B * H * D), k(B * Hkv * L * D), v(B * Hkv * L * D), out(B * H * D, -1.f);
  for (float& x : q) x = normal(rng);
  for (float& x : k) x = normal(rng);
  for (float& x : v) x = normal(rng);
  std::vector<char> valid_bytes(B * L);
  for (int64_t i = 0; i < B * L; ++i) valid_bytes[i] = (i * 7 % 5) != 0;
  valid_bytes[L] = 0;  // row 1 starts with an invalid slot
  bool valid[B * L];
  for (int64_t i = 0; i < B * L; ++i) valid[i] = valid_bytes[i] != 0;
  for (int64_t b = 0; b < B; ++b)  // invalid slots hold NaN
    for (int64_t kvh = 0; kvh < Hkv; ++kvh)
      for (int64_t l = 0; l < L; ++l)
        if (!valid[b * L + l])
          for (int64_t d = 0; d < D; ++d) {
            k[((b * Hkv + kvh) * L + l) * D + d] = std::numeric_limits<float>::quiet_NaN();
            v[((b * Hkv + kvh) * L + l) * D + d] = std::numeric_limits<float>::quiet_NaN();
          }

  vpit::cpu::decode_attention(q.data(), k.data(), v.data(), valid, out.data(), s, 0, B * H);

  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kvh = h / (H / Hkv);
      std::vector<double> w(L, 0.0);
      double total = 0.0;
      for (int64_t l = 0; l < L; ++l) {
        if (!valid[b * L + l]) continue;
        double dot = 0.0;
        for (int64_t d = 0; d < D; ++d)
          dot += double(q[(b * H + h) * D + d]) * k[((b * Hkv + kvh) * L + l) * D + d];
        w[l] = std::exp(dot * s.scale);
        total += w[l];
      }
      for (int64_t d = 0; d < D; ++d) {
        double expected = 0.0;
        for (int64_t l = 0; l < L; ++l)
          if (valid[b * L + l]) expected += w[l] / total * v[((b * Hkv + kvh) * L + l) * D + d];
        const float got = out[(b * H + h) * D + d];
        CHECK(std::fabs(got - expected) <= 1e-5 * (1.0 + std::fabs(expected)),
              "b %lld h %lld d %lld: got %g expected %g", (long long)b, (long long)h, (long long)d,
              got, expected);
      }
    }
}

static void test_row_without_valid_slots_is_zero() {
  const vpit::DecodeAttentionShape s = contiguous_shape(1, 2, 1, 4, 3);
  std::vector<float> q(6, 1.f), k(12, std::numeric_limits<float>::quiet_NaN()), v(12, 1.f);
  std::vector<float> out(6, -1.f);
  const bool valid[4] = {false, false, false, false};
  vpit::cpu::decode_attention(q.data(), k.data(), v.data(), valid, out.data(), s, 0, 2);
  for (float x : out) CHECK(x == 0.f, "got %g instead of 0", x);
}

int main() {
  test_against_direct_double();
  test_row_without_valid_slots_is_zero();
  return TEST_MAIN_RESULT();
}
