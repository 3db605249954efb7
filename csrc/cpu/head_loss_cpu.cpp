#include "head_loss_cpu.h"

#include <algorithm>
#include <cmath>

namespace vpit::cpu {

constexpr float kCosineEps = 1e-8f;

void cross_entropy_rows(float* logits, int64_t ld, int64_t vocab, const int64_t* targets,
                        int64_t row_begin, int64_t row_end, float grad_scale, float* row_loss) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    float* z = logits + r * ld;
    const float max = *std::max_element(z, z + vocab);
    double sum = 0.0;
    for (int64_t j = 0; j < vocab; ++j) sum += std::exp(double(z[j]) - max);
    const double log_sum = std::log(sum);
    const int64_t target = targets[r];
    row_loss[r] = static_cast<float>((double(max) - z[target]) + log_sum);
    for (int64_t j = 0; j < vocab; ++j) {
      z[j] = grad_scale * static_cast<float>(std::exp((double(z[j]) - max) - log_sum));
    }
    z[target] -= grad_scale;
  }
}

void cosine_rows(const float* pred, const float* target, float* grad_pred, int64_t dim,
                 int64_t row_begin, int64_t row_end, float grad_scale, float* row_loss) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    const float* p = pred + r * dim;
    const float* t = target + r * dim;
    double pt = 0, pp = 0, tt = 0;
    for (int64_t c = 0; c < dim; ++c) {
      pt += double(p[c]) * t[c];
      pp += double(p[c]) * p[c];
      tt += double(t[c]) * t[c];
    }
    const double np = std::max(std::sqrt(pp), double(kCosineEps));
    const double nt = std::max(std::sqrt(tt), double(kCosineEps));
    const double cos = pt / (np * nt);
    row_loss[r] = static_cast<float>(1.0 - cos);
    // d(1 - cos)/dp = -(t / (np nt) - cos p / np^2)
    float* g = grad_pred + r * dim;
    for (int64_t c = 0; c < dim; ++c) {
      g[c] = static_cast<float>(-grad_scale * (t[c] / (np * nt) - cos * p[c] / (np * np)));
    }
  }
}

}  // namespace vpit::cpu
