// Bilinear source taps along one axis, matching PyTorch's upsample_bilinear2d with
// align_corners=False (area_pixel_compute_source_index + guard_index_and_lambda).
// Framework-free: included by the CPU kernels, the CUDA kernels and their unit tests.
#pragma once

#if defined(__CUDACC__)
#define VPIT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VPIT_HOST_DEVICE inline
#endif

namespace vpit {

// The token grids of one interpolation: [in_h*in_w] tokens in, [out_h*out_w] tokens out, row-major.
struct TokenGrid {
  int in_h;
  int in_w;
  int out_h;
  int out_w;
};

// F.normalize's eps: rows are divided by max(||row||, kNormEps).
constexpr float kNormEps = 1e-12f;

// Output index `o` reads input indices i0 and i1 with weights w0 and w1 (w0 + w1 == 1).
struct Taps {
  int i0;
  int i1;
  float w0;
  float w1;
};

// PyTorch computes the scale as in/out in the op-math type (float for every dtype we accept).
VPIT_HOST_DEVICE float axis_scale(int in_size, int out_size) {
  return static_cast<float>(in_size) / static_cast<float>(out_size);
}

VPIT_HOST_DEVICE Taps source_taps(int o, int in_size, int out_size, float scale) {
  Taps t;
  if (in_size == out_size) {  // PyTorch copies exactly on an identity axis.
    t.i0 = o; t.i1 = o; t.w0 = 1.f; t.w1 = 0.f;
    return t;
  }
  float src = scale * (static_cast<float>(o) + 0.5f) - 0.5f;
  if (src < 0.f) src = 0.f;
  int i0 = static_cast<int>(src);  // src >= 0, so truncation is floor
  if (i0 > in_size - 1) i0 = in_size - 1;
  float lambda = src - static_cast<float>(i0);
  lambda = lambda < 0.f ? 0.f : (lambda > 1.f ? 1.f : lambda);
  t.i0 = i0;
  t.i1 = i0 < in_size - 1 ? i0 + 1 : i0;
  t.w1 = lambda;
  t.w0 = 1.f - lambda;
  return t;
}

// The outputs along an axis whose taps can touch input index i form the contiguous range
// [first, last] (taps are monotonic in o). Callers still test each o exactly with source_taps;
// this only bounds the loop, with one index of margin on each side against rounding.
VPIT_HOST_DEVICE void touching_outputs(int i, int in_size, int out_size, int* first, int* last) {
  if (in_size == out_size) { *first = i; *last = i; return; }
  float inv = static_cast<float>(out_size) / static_cast<float>(in_size);
  int lo = static_cast<int>((static_cast<float>(i) - 0.5f) * inv - 0.5f) - 1;
  int hi = static_cast<int>((static_cast<float>(i) + 1.5f) * inv - 0.5f) + 1;
  *first = lo < 0 ? 0 : lo;
  *last = hi > out_size - 1 ? out_size - 1 : hi;
}

}  // namespace vpit
