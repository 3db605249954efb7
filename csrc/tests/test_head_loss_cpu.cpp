// Unit tests of the framework-free head-loss row passes: cross-entropy loss and its in-place
// gradient, cosine loss and its gradient, each against finite differences of the loss.
#include <cmath>
#include <random>
#include <vector>

#include "check.h"
#include "cpu/head_loss_cpu.h"

static double ce_loss(const std::vector<float>& z, int64_t target) {
  double max = z[0];
  for (float v : z) max = std::max(max, double(v));
  double sum = 0;
  for (float v : z) sum += std::exp(v - max);
  return max + std::log(sum) - z[target];
}

static void test_cross_entropy_rows() {
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 3.f);
  const int64_t vocab = 37, ld = 40, rows = 3;
  const int64_t targets[rows] = {0, 36, 11};
  std::vector<float> logits(rows * ld, NAN), original(rows * ld);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < vocab; ++j) logits[r * ld + j] = normal(rng);
  original = logits;
  std::vector<float> loss(rows);
  const float scale = 0.5f;
  vpit::cpu::cross_entropy_rows(logits.data(), ld, vocab, targets, 0, rows, scale, loss.data());
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<float> z(original.begin() + r * ld, original.begin() + r * ld + vocab);
    CHECK(std::fabs(loss[r] - ce_loss(z, targets[r])) < 1e-5, "row %ld loss %f", long(r), loss[r]);
    double grad_sum = 0;
    for (int64_t j = 0; j < vocab; ++j) {
      std::vector<float> plus = z, minus = z;
      plus[j] += 1e-2f;
      minus[j] -= 1e-2f;
      const double fd = scale * (ce_loss(plus, targets[r]) - ce_loss(minus, targets[r])) / 2e-2;
      CHECK(std::fabs(logits[r * ld + j] - fd) < 1e-3, "row %ld col %ld grad %f fd %f", long(r),
            long(j), logits[r * ld + j], fd);
      grad_sum += logits[r * ld + j];
    }
    CHECK(std::fabs(grad_sum) < 1e-5, "softmax - onehot sums to zero, got %f", grad_sum);
    CHECK(std::isnan(logits[r * ld + vocab]), "padding columns are left alone");
  }
}

static double cosine_loss(const std::vector<float>& p, const std::vector<float>& t) {
  double pt = 0, pp = 0, tt = 0;
  for (size_t i = 0; i < p.size(); ++i) {
    pt += double(p[i]) * t[i];
    pp += double(p[i]) * p[i];
    tt += double(t[i]) * t[i];
  }
  return 1.0 - pt / (std::max(std::sqrt(pp), 1e-8) * std::max(std::sqrt(tt), 1e-8));
}

static void test_cosine_rows() {
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  const int64_t dim = 9, rows = 2;
  std::vector<float> pred(rows * dim), target(rows * dim), grad(rows * dim), loss(rows);
  for (float& v : pred) v = normal(rng);
  for (float& v : target) v = normal(rng);
  const float scale = 2.f;
  vpit::cpu::cosine_rows(pred.data(), target.data(), grad.data(), dim, 0, rows, scale, loss.data());
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<float> p(pred.begin() + r * dim, pred.begin() + (r + 1) * dim);
    std::vector<float> t(target.begin() + r * dim, target.begin() + (r + 1) * dim);
    CHECK(std::fabs(loss[r] - cosine_loss(p, t)) < 1e-6, "row %ld loss %f", long(r), loss[r]);
    for (int64_t c = 0; c < dim; ++c) {
      std::vector<float> plus = p, minus = p;
      plus[c] += 1e-3f;
      minus[c] -= 1e-3f;
      const double fd = scale * (cosine_loss(plus, t) - cosine_loss(minus, t)) / 2e-3;
      CHECK(std::fabs(grad[r * dim + c] - fd) < 1e-3, "row %ld dim %ld grad %f fd %f", long(r),
            long(c), grad[r * dim + c], fd);
    }
  }
}

int main() {
  test_cross_entropy_rows();
  test_cosine_rows();
  return TEST_MAIN_RESULT();
}
