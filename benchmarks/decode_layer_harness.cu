// Standalone timing of the fused decode-layer kernels (csrc/cuda/decode_layer.cu) at
// LLaMA-3.2-1B shapes, bf16, without torch: each kernel and a layer's four kernels, 200
// back-to-back launches, with and without programmatic dependent launch (CUDA events).
// The kernel-variant table in benchmarks/RESULTS.md came from builds of this file against edited
// copies of decode_layer.cu (the constants kStages, kPairPacks / kSinglePacks, kBlocksPerSm).
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 -Icsrc \
//        benchmarks/decode_layer_harness.cu csrc/cuda/decode_layer.cu -o /tmp/harness && /tmp/harness [rows]
#include <cstdio>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include "cuda/decode_layer.h"
using namespace vpit;
using namespace vpit::cuda;
#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("err %s line %d\n", cudaGetErrorString(e), __LINE__); return 1; } } while (0)
int main(int argc, char** argv) {
  const int R = argc > 1 ? atoi(argv[1]) : 1;
  const int64_t H = 2048, I = 8192, Hq = 32, Hkv = 8, D = 64, L = 2176;
  int sms; cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  __nv_bfloat16 *x, *nw, *wq, *wk, *wv, *wo, *wg, *wu, *wd, *q, *kc, *vc, *act, *attn, *copy_dst;
  float* inv; int64_t *pos, *cur;
  auto alloc = [](void** p, size_t n) { return cudaMalloc(p, n); };
  CK(alloc((void**)&x, R * H * 2)); CK(alloc((void**)&nw, H * 2)); CK(alloc((void**)&wq, Hq * D * H * 2));
  CK(alloc((void**)&wk, Hkv * D * H * 2)); CK(alloc((void**)&wv, Hkv * D * H * 2)); CK(alloc((void**)&wo, H * H * 2));
  CK(alloc((void**)&wg, I * H * 2)); CK(alloc((void**)&wu, I * H * 2)); CK(alloc((void**)&wd, I * H * 2));
  CK(alloc((void**)&q, R * Hq * D * 2)); CK(alloc((void**)&kc, R * Hkv * L * D * 2)); CK(alloc((void**)&vc, R * Hkv * L * D * 2));
  CK(alloc((void**)&act, R * I * 2)); CK(alloc((void**)&attn, R * H * 2)); CK(alloc((void**)&copy_dst, I * H * 4));
  CK(alloc((void**)&inv, D / 2 * 4)); CK(alloc((void**)&pos, R * 8)); CK(alloc((void**)&cur, 8));
  cudaMemset(x, 0, R * H * 2); cudaMemset(nw, 0, H * 2); cudaMemset(pos, 0, R * 8); cudaMemset(cur, 0, 8); cudaMemset(inv, 0, D * 2);
  QkvRopeShape qs{R, H, Hq, Hkv, D, H, Hkv * L * D, L * D, D, 1e-5f, 1.f};
  GateUpShape gs{R, H, I, H, 1e-5f};
  ProjAddShape os{R, H, H, H, H}, ds{R, I, H, I, H};
  cudaStream_t st; cudaStreamCreate(&st);
  cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
  const int reps = 200;
  auto time = [&](const char* name, double mbytes, auto fn) {
    for (int i = 0; i < 10; ++i) fn();
    cudaEventRecord(a, st);
    for (int i = 0; i < reps; ++i) fn();
    cudaEventRecord(b, st);
    cudaEventSynchronize(b);
    float ms; cudaEventElapsedTime(&ms, a, b);
    const double us = ms * 1000 / reps;
    printf("%-28s %8.2f us  %6.2f TB/s\n", name, us, mbytes * 1e6 / (us * 1e-6) / 1e12);
    return us;
  };
  for (int pdl = 0; pdl < 2; ++pdl) {
    printf("--- R=%d programmatic=%d\n", R, pdl);
    time("qkv 12MB", 12.58, [&] { decode_qkv_rope(x, nw, wq, wk, wv, nullptr, nullptr, nullptr, inv, pos, cur, q, kc, vc, DType::kBFloat16, qs, sms, pdl, st); });
    time("o_proj 8MB", 8.39, [&] { decode_proj_add(x, attn, wo, nullptr, DType::kBFloat16, os, sms, pdl, st); });
    time("gate_up 64MB", 67.1, [&] { decode_gate_up(x, nw, wg, wu, nullptr, nullptr, act, DType::kBFloat16, gs, sms, pdl, st); });
    time("down 32MB", 33.55, [&] { decode_proj_add(x, act, wd, nullptr, DType::kBFloat16, ds, sms, pdl, st); });
    time("layer (5 kernels, no attn)", 121.6, [&] {
      decode_qkv_rope(x, nw, wq, wk, wv, nullptr, nullptr, nullptr, inv, pos, cur, q, kc, vc, DType::kBFloat16, qs, sms, pdl, st);
      decode_proj_add(x, attn, wo, nullptr, DType::kBFloat16, os, sms, pdl, st);
      decode_gate_up(x, nw, wg, wu, nullptr, nullptr, act, DType::kBFloat16, gs, sms, pdl, st);
      decode_proj_add(x, act, wd, nullptr, DType::kBFloat16, ds, sms, pdl, st);
    });
  }
  time("memcpy D2D 33.5MB (r+w 67MB)", 67.1, [&] { cudaMemcpyAsync(copy_dst, wg, I * H * 2, cudaMemcpyDeviceToDevice, st); });
  CK(cudaGetLastError());
  return 0;
}
