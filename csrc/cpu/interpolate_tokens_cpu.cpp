#include "interpolate_tokens_cpu.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace vpit::cpu {
namespace {

// The four source tokens of one output token and their weights.
struct Stencil {
  int64_t token[4];
  float weight[4];
};

Stencil stencil_of(int out_token, const TokenGrid& g) {
  const int oy = out_token / g.out_w, ox = out_token % g.out_w;
  const Taps ty = source_taps(oy, g.in_h, g.out_h, axis_scale(g.in_h, g.out_h));
  const Taps tx = source_taps(ox, g.in_w, g.out_w, axis_scale(g.in_w, g.out_w));
  Stencil s;
  s.token[0] = int64_t(ty.i0) * g.in_w + tx.i0;  s.weight[0] = ty.w0 * tx.w0;
  s.token[1] = int64_t(ty.i0) * g.in_w + tx.i1;  s.weight[1] = ty.w0 * tx.w1;
  s.token[2] = int64_t(ty.i1) * g.in_w + tx.i0;  s.weight[2] = ty.w1 * tx.w0;
  s.token[3] = int64_t(ty.i1) * g.in_w + tx.i1;  s.weight[3] = ty.w1 * tx.w1;
  return s;
}

void interpolate_row(const float* image, int out_token, const TokenGrid& g, int64_t channels,
                     float* row) {
  const Stencil s = stencil_of(out_token, g);
  const float* x[4];
  for (int k = 0; k < 4; ++k) x[k] = image + s.token[k] * channels;
  for (int64_t c = 0; c < channels; ++c) {
    row[c] = s.weight[0] * x[0][c] + s.weight[1] * x[1][c] + s.weight[2] * x[2][c] +
             s.weight[3] * x[3][c];
  }
}

float l2_norm(const float* row, int64_t channels) {
  double sum = 0.0;
  for (int64_t c = 0; c < channels; ++c) sum += double(row[c]) * row[c];
  return static_cast<float>(std::sqrt(sum));
}

}  // namespace

void interpolate_tokens_forward(const float* x, float* out, int64_t batch_begin, int64_t batch_end,
                                int64_t channels, TokenGrid grid, bool normalize) {
  const int64_t in_tokens = int64_t(grid.in_h) * grid.in_w;
  const int out_tokens = grid.out_h * grid.out_w;
  for (int64_t b = batch_begin; b < batch_end; ++b) {
    const float* image = x + b * in_tokens * channels;
    for (int t = 0; t < out_tokens; ++t) {
      float* row = out + (b * out_tokens + t) * channels;
      interpolate_row(image, t, grid, channels, row);
      if (normalize) {
        const float denom = std::max(l2_norm(row, channels), kNormEps);
        for (int64_t c = 0; c < channels; ++c) row[c] /= denom;
      }
    }
  }
}

void interpolate_tokens_backward(const float* grad_out, const float* x, float* grad_in,
                                 int64_t batch_begin, int64_t batch_end, int64_t channels,
                                 TokenGrid grid, bool normalize) {
  const int64_t in_tokens = int64_t(grid.in_h) * grid.in_w;
  const int out_tokens = grid.out_h * grid.out_w;
  std::vector<float> values(normalize ? channels : 0), grad_values(normalize ? channels : 0);
  for (int64_t b = batch_begin; b < batch_end; ++b) {
    float* grad_image = grad_in + b * in_tokens * channels;
    std::fill(grad_image, grad_image + in_tokens * channels, 0.f);
    for (int t = 0; t < out_tokens; ++t) {
      const float* g = grad_out + (b * out_tokens + t) * channels;
      if (normalize) {
        // d/dn of n / max(||n||, eps): (g - y (y.g)) / ||n|| above eps, g / eps below it.
        interpolate_row(x + b * in_tokens * channels, t, grid, channels, values.data());
        const float norm = l2_norm(values.data(), channels);
        if (norm >= kNormEps) {
          double dot = 0.0;
          for (int64_t c = 0; c < channels; ++c) dot += double(values[c] / norm) * g[c];
          for (int64_t c = 0; c < channels; ++c) {
            grad_values[c] = (g[c] - (values[c] / norm) * float(dot)) / norm;
          }
        } else {
          for (int64_t c = 0; c < channels; ++c) grad_values[c] = g[c] / kNormEps;
        }
        g = grad_values.data();
      }
      const Stencil s = stencil_of(t, grid);
      for (int k = 0; k < 4; ++k) {
        if (s.weight[k] == 0.f) continue;
        float* dst = grad_image + s.token[k] * channels;
        for (int64_t c = 0; c < channels; ++c) dst[c] += s.weight[k] * g[c];
      }
    }
  }
}

}  // namespace vpit::cpu
