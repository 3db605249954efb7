// Launchers of the CUDA token-interpolation kernels. Framework-free: plain pointers, a stream,
// an error code. Includable by host-only C++ (the torch adapter) and by nvcc.
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>

#include "../kernels/bilinear_taps.h"
#include "dtype.h"

namespace vpit::cuda {

// x: [batch, in_h*in_w, channels] -> out: [batch, out_h*out_w, channels], same dtype, fp32 math.
cudaError_t interpolate_tokens_forward(const void* x, void* out, DType dtype, int64_t batch,
                                       int64_t channels, TokenGrid grid, bool normalize,
                                       cudaStream_t stream);

// Bytes of fp32 workspace interpolate_tokens_backward needs (zero unless `normalize`).
int64_t interpolate_tokens_backward_workspace(int64_t batch, int64_t channels, TokenGrid grid,
                                              bool normalize);

// grad_out: [batch, out_tokens, channels] -> grad_in: [batch, in_tokens, channels], every element
// written. `x` is read only with `normalize`; `workspace` holds the size asked for above.
cudaError_t interpolate_tokens_backward(const void* grad_out, const void* x, void* grad_in,
                                        void* workspace, DType dtype, int64_t batch,
                                        int64_t channels, TokenGrid grid, bool normalize,
                                        cudaStream_t stream);

}  // namespace vpit::cuda
