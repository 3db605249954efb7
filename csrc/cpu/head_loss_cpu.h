// CPU row passes of the fused head loss. Framework-free, fp32, one row range per call.
#pragma once
#include <cstdint>

namespace vpit::cpu {

// Cross-entropy rows in place. logits: rows of `ld` floats, the first `vocab` valid. Row r's loss
// (log-sum-exp minus the target logit) goes to row_loss[r]; its logits become
// grad_scale * (softmax - onehot(target)).
void cross_entropy_rows(float* logits, int64_t ld, int64_t vocab, const int64_t* targets,
                        int64_t row_begin, int64_t row_end, float grad_scale, float* row_loss);

// Cosine rows: row_loss[r] = 1 - cos(pred_r, target_r) with norms clamped at 1e-8 (as
// F.cosine_similarity); grad_pred_r = grad_scale * d row_loss / d pred_r.
void cosine_rows(const float* pred, const float* target, float* grad_pred, int64_t dim,
                 int64_t row_begin, int64_t row_end, float grad_scale, float* row_loss);

}  // namespace vpit::cpu
