// Launchers of the CUDA decode-step dispatch kernels. Framework-free: plain pointers, a stream,
// an error code. Includable by host-only C++ (the torch adapter) and by nvcc. Neither launcher
// synchronises or reads device memory on the host, so both can be captured in a CUDA graph.
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>

#include "../kernels/decode_step.h"
#include "dtype.h"

namespace vpit::cuda {

// One warp per row: the state transition (decode_row_step) and the emitted visual token
// (visual_pred's row, L2-normalised in fp32 with `normalize`, zeros on rows that emit none).
// visual_pred, visual: [batch, dim] contiguous of `dtype`; eos_ids: [num_eos]; state: [batch].
cudaError_t decode_dispatch_prepare(const DecodeStateIn& in, const void* visual_pred,
                                    const int64_t* eos_ids, int64_t num_eos,
                                    const DecodeStateOut& out, void* visual, DType dtype,
                                    int64_t batch, int64_t dim, const DecodeIds& ids,
                                    bool normalize, cudaStream_t stream);

// out[row] = emits_visual[row] ? adapted[row] : table[next_ids[row]], copied as raw bytes in the
// widest aligned words (up to 16 bytes). adapted, out: [batch, row_bytes] contiguous; table:
// table_rows rows, table_row_stride_bytes apart.
//
// Ids are not checked on the host (that would need a sync). A gathered id outside
// [0, table_rows) is never read: the kernel raises a device-side assertion instead, as PyTorch's
// own index_select does, so the launch fails loudly (cudaErrorAssert at the next sync).
cudaError_t decode_dispatch_assemble(const int64_t* next_ids, const bool* emits_visual,
                                     const void* adapted, const void* table, int64_t table_rows,
                                     int64_t table_row_stride_bytes, void* out, int64_t batch,
                                     int64_t row_bytes, cudaStream_t stream);

}  // namespace vpit::cuda
