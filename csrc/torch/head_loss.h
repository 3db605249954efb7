// The fused response-only heads + loss: LM head with cross-entropy on text rows, vision head with
// cosine loss on visual rows, gradients computed during the forward pass.
#pragma once
#include <ATen/ATen.h>

#include <tuple>
#include <vector>

namespace vpit {

// Returns (losses [3] fp32: total, text, visual; counts [2] int64: text, visual; grad_hidden;
// grad_lm_weight; grad_vision_params in fp32: small, and scaled in backward before the one cast).
// Gradients are of `total` and are empty tensors when need_grads is false. vision_params: {w, b} (linear) or {w1, b1, w2, b2} (MLP with GELU).
// text_count >= 0: the number of text rows, counted by a caller that has also checked the labels
// and visual rows on the host; the index checks and their one device-to-host read are skipped.
// -1: checked and counted here.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> head_loss(
    const at::Tensor& hidden, const at::Tensor& lm_weight, const at::Tensor& labels,
    const at::Tensor& visual_rows, const at::Tensor& visual_targets,
    at::TensorList vision_params, double text_weight, double visual_weight, int64_t ignore_index,
    bool sum_reduction, int64_t max_chunk_bytes, bool need_grads, int64_t text_count);

// The device-specific row passes (CPU here, CUDA in head_loss_cuda.cpp). logits is a [rows, V]
// view whose rows may be padded (stride(0) >= V); both write fp32 row losses.
void cross_entropy_rows(at::Tensor& logits, const at::Tensor& targets, double grad_scale,
                        at::Tensor& row_loss);
void cosine_rows(const at::Tensor& pred, const at::Tensor& target, double grad_scale,
                 at::Tensor& grad_pred, at::Tensor& row_loss);
#ifdef VPIT_FAST_WITH_CUDA
void cross_entropy_rows_cuda(at::Tensor& logits, const at::Tensor& targets, double grad_scale,
                             at::Tensor& row_loss);
void cosine_rows_cuda(const at::Tensor& pred, const at::Tensor& target, double grad_scale,
                      at::Tensor& grad_pred, at::Tensor& row_loss);
#endif

}  // namespace vpit
