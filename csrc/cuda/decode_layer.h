// Launchers of the fused decode-step projections (the contract: kernels/decode_layer.h).
// Framework-free: plain pointers, a stream, an error code. They never synchronise or read device
// memory on the host, so a CUDA graph can capture them.
//
// What the caller guarantees (the torch adapter checks it and otherwise runs its ATen version):
// 1 <= rows <= kDecodeLayerMaxRows; every pointer and every row start (x, weights, residual,
// cache rows) 16-byte aligned, i.e. the reduction dimension and the row strides are multiples of
// 16 / element size; head_dim even.
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>

#include "../kernels/decode_layer.h"
#include "dtype.h"

namespace vpit::cuda {

// `programmatic`: launch with programmatic dependent launch (Hopper and later; the caller checks),
// so a kernel loads its first weights while the kernel before it in the stream finishes.

// Shared memory of every kernel: a ring of weight groups, plus, for the two RMSNorm kernels, the
// normalised rows (rows * hidden elements). The caller keeps the sum within the device's opt-in
// limit per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) and otherwise falls back.
constexpr int64_t kDecodeLayerRingBytes = 64 * 1024;

// One warp per pair of rotary partners (rows i and i + head_dim / 2 of one q, k or v head): both
// dot products for every row, then RoPE (q, k) and the write to query_out or the cache slot.
// Biases may be null.
cudaError_t decode_qkv_rope(const void* x, const void* norm_weight, const void* wq, const void* wk,
                            const void* wv, const void* bq, const void* bk, const void* bv,
                            const float* inv_freq, const int64_t* positions, const int64_t* cursor,
                            void* query_out, void* key_cache, void* value_cache, DType dtype,
                            const QkvRopeShape& shape, int num_sms, bool programmatic,
                            cudaStream_t stream);

// One warp per output feature: the gate and up dot products, then silu(gate) * up.
cudaError_t decode_gate_up(const void* x, const void* norm_weight, const void* w_gate,
                           const void* w_up, const void* b_gate, const void* b_up, void* out,
                           DType dtype, const GateUpShape& shape, int num_sms, bool programmatic,
                           cudaStream_t stream);

// One warp per output feature: the dot product, plus bias, added to the residual in place.
cudaError_t decode_proj_add(void* residual, const void* x, const void* weight, const void* bias,
                            DType dtype, const ProjAddShape& shape, int num_sms, bool programmatic,
                            cudaStream_t stream);

}  // namespace vpit::cuda
