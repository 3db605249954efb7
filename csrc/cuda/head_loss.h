// Launchers of the CUDA row passes of the fused head loss. Framework-free, host-includable.
#pragma once
#include <cuda_runtime_api.h>
#include <cstdint>

#include "dtype.h"

namespace vpit::cuda {

// Cross-entropy rows in place, one block per row: logits rows of `ld` elements (16-byte aligned
// rows when ld is a multiple of 8), `vocab` valid. row_loss[r] = lse - z[target] (fp32); the row
// becomes grad_scale * (softmax - onehot) in the same dtype.
cudaError_t cross_entropy_rows(void* logits, DType dtype, int64_t rows, int64_t ld, int64_t vocab,
                               const int64_t* targets, float grad_scale, float* row_loss,
                               cudaStream_t stream);

// Cosine rows, one warp per row: row_loss[r] = 1 - cos(pred_r, target_r) (norms clamped at
// 1e-8), grad_pred = grad_scale * d row_loss / d pred, in pred's dtype.
cudaError_t cosine_rows(const void* pred, const void* target, void* grad_pred, DType dtype,
                        int64_t rows, int64_t dim, float grad_scale, float* row_loss,
                        cudaStream_t stream);

}  // namespace vpit::cuda
