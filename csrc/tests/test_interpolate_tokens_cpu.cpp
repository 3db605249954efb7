// Unit tests of the framework-free interpolation pieces: tap positions, the touching-range bound
// the CUDA backward relies on, exactness on linear ramps, and that backward is forward's adjoint.
#include <cmath>
#include <random>
#include <vector>

#include "check.h"
#include "cpu/interpolate_tokens_cpu.h"

using vpit::TokenGrid;

static void test_metamorph_taps() {
  // 27 -> 8: src = 3.375 * (o + 0.5) - 0.5, so o = 0 reads 1 and 2 with weights 0.8125 / 0.1875.
  const vpit::Taps t = vpit::source_taps(0, 27, 8, vpit::axis_scale(27, 8));
  CHECK(t.i0 == 1 && t.i1 == 2, "taps %d %d", t.i0, t.i1);
  CHECK(std::fabs(t.w1 - 0.1875f) < 1e-6f && std::fabs(t.w0 - 0.8125f) < 1e-6f, "w %f %f", t.w0, t.w1);
  const vpit::Taps last = vpit::source_taps(7, 27, 8, vpit::axis_scale(27, 8));
  CHECK(last.i0 == 24 && last.i1 == 25, "last taps %d %d", last.i0, last.i1);
  const vpit::Taps up = vpit::source_taps(0, 3, 16, vpit::axis_scale(3, 16));  // clamped to 0
  CHECK(up.i0 == 0 && up.i1 == 1 && up.w1 == 0.f, "upsampled edge %d %d %f", up.i0, up.i1, up.w1);
}

static void test_touching_range_is_superset() {
  for (int in = 1; in <= 40; ++in) {
    for (int out = 1; out <= 40; ++out) {
      const float scale = vpit::axis_scale(in, out);
      for (int i = 0; i < in; ++i) {
        int first, last;
        vpit::touching_outputs(i, in, out, &first, &last);
        for (int o = 0; o < out; ++o) {
          const vpit::Taps t = vpit::source_taps(o, in, out, scale);
          const bool touches = (t.i0 == i && t.w0 != 0.f) || (t.i1 == i && t.w1 != 0.f);
          CHECK(!touches || (o >= first && o <= last), "in %d out %d: input %d touched by %d outside [%d, %d]",
                in, out, i, o, first, last);
        }
      }
    }
  }
}

static void test_linear_ramp_is_reproduced() {
  // Bilinear interpolation reproduces f(y, x) = 2y + 3x + 1 at interior sample points.
  const TokenGrid g{9, 7, 4, 5};
  std::vector<float> x(g.in_h * g.in_w), out(g.out_h * g.out_w);
  for (int y = 0; y < g.in_h; ++y)
    for (int xx = 0; xx < g.in_w; ++xx) x[y * g.in_w + xx] = 2.f * y + 3.f * xx + 1.f;
  vpit::cpu::interpolate_tokens_forward(x.data(), out.data(), 0, 1, 1, g, false);
  for (int oy = 0; oy < g.out_h; ++oy) {
    for (int ox = 0; ox < g.out_w; ++ox) {
      const float sy = vpit::axis_scale(g.in_h, g.out_h) * (oy + 0.5f) - 0.5f;
      const float sx = vpit::axis_scale(g.in_w, g.out_w) * (ox + 0.5f) - 0.5f;
      const float expected = 2.f * sy + 3.f * sx + 1.f;
      CHECK(std::fabs(out[oy * g.out_w + ox] - expected) < 1e-4f, "(%d,%d) %f vs %f", oy, ox,
            out[oy * g.out_w + ox], expected);
    }
  }
}

static double dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += double(a[i]) * b[i];
  return s;
}

static void test_backward_is_adjoint() {
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal;
  const TokenGrid grids[] = {{27, 27, 8, 8}, {5, 7, 3, 4}, {3, 3, 16, 16}, {8, 8, 8, 8}};
  for (const TokenGrid& g : grids) {
    const int batch = 2, channels = 3;
    std::vector<float> x(batch * g.in_h * g.in_w * channels), gy(batch * g.out_h * g.out_w * channels);
    for (float& v : x) v = normal(rng);
    for (float& v : gy) v = normal(rng);
    std::vector<float> y(gy.size()), gx(x.size(), NAN);
    vpit::cpu::interpolate_tokens_forward(x.data(), y.data(), 0, batch, channels, g, false);
    vpit::cpu::interpolate_tokens_backward(gy.data(), nullptr, gx.data(), 0, batch, channels, g, false);
    const double lhs = dot(y, gy), rhs = dot(x, gx);
    CHECK(std::fabs(lhs - rhs) <= 1e-4 * (std::fabs(lhs) + 1.0), "grid %dx%d->%dx%d: <Fx,g>=%f <x,F'g>=%f",
          g.in_h, g.in_w, g.out_h, g.out_w, lhs, rhs);
  }
}

static void test_normalized_rows_have_unit_norm() {
  const TokenGrid g{27, 27, 8, 8};
  const int channels = 5;
  std::vector<float> x(g.in_h * g.in_w * channels), y(g.out_h * g.out_w * channels);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * i);
  vpit::cpu::interpolate_tokens_forward(x.data(), y.data(), 0, 1, channels, g, true);
  for (int t = 0; t < g.out_h * g.out_w; ++t) {
    double s = 0;
    for (int c = 0; c < channels; ++c) s += double(y[t * channels + c]) * y[t * channels + c];
    CHECK(std::fabs(std::sqrt(s) - 1.0) < 1e-5, "token %d norm %f", t, std::sqrt(s));
  }
}

int main() {
  test_metamorph_taps();
  test_touching_range_is_superset();
  test_linear_ramp_is_reproduced();
  test_backward_is_adjoint();
  test_normalized_rows_have_unit_norm();
  return TEST_MAIN_RESULT();
}
