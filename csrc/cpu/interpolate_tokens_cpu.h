// CPU kernels of token interpolation. Framework-free: float32 in, float32 out, one batch range
// per call so the caller can parallelise over batches however it likes.
#pragma once
#include <cstdint>

#include "../kernels/bilinear_taps.h"

namespace vpit::cpu {

// x: [batch, in_h*in_w, channels], out: [batch, out_h*out_w, channels]; fills batches
// [batch_begin, batch_end). With `normalize`, each output token is divided by max(L2 norm, 1e-12).
void interpolate_tokens_forward(const float* x, float* out, int64_t batch_begin, int64_t batch_end,
                                int64_t channels, TokenGrid grid, bool normalize);

// grad_out: [batch, out_tokens, channels] -> grad_in: [batch, in_tokens, channels] (overwritten).
// `x` is read only when `normalize` is set (to recompute the pre-normalisation values).
void interpolate_tokens_backward(const float* grad_out, const float* x, float* grad_in,
                                 int64_t batch_begin, int64_t batch_end, int64_t channels,
                                 TokenGrid grid, bool normalize);

}  // namespace vpit::cpu
