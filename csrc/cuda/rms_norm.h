// Backward of RMSNorm with the residual gradient folded in. Framework-free, host-includable.
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>

#include "dtype.h"

namespace vpit::cuda {

// Rows the backward gives each block's dw partial sum: launch with `rms_norm_backward_blocks`
// blocks and a dw_partial of [blocks, cols] floats.
int64_t rms_norm_backward_blocks(int64_t rows);

// For y = w * round(h * r) with r = rstd[row] = 1 / sqrt(mean(h^2) + eps) (round: to T, as
// transformers' LLaMA norm rounds before the weight), and dh_direct the gradient that reaches h
// another way (the residual stream; nullable):
//   dx = r * (g - h * r^2 * sum(g * h) / cols) + dh_direct,   g = dy * w
//   dw_partial[b, j] = sum over the rows block b owns of dy[., j] * round(h[., j] * r)
// dy, dh_direct, h, dx: [rows, cols] contiguous; w: [cols]; all of `dtype`. Sums in fp32, each
// block's rows in a fixed order (deterministic). One read of dy, h and dh_direct, one write of dx.
cudaError_t rms_norm_backward(const void* dy, const void* dh_direct, const void* h, const float* rstd,
                              const void* w, void* dx, float* dw_partial, int64_t rows, int64_t cols,
                              DType dtype, cudaStream_t stream);

// out[j] = sum over b < blocks of partial[b, j] (fixed order), written as `dtype`.
cudaError_t sum_partials(const float* partial, int64_t blocks, int64_t cols, void* out, DType dtype,
                         cudaStream_t stream);

}  // namespace vpit::cuda
