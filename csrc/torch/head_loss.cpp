// The orchestration of the fused head loss, shared by CPU and CUDA: one validation pass (one host
// sync), compaction of text and visual rows, chunked LM-head GEMMs into a padded logits buffer,
// the in-place cross-entropy row pass, the vision head and its cosine row pass, and every
// gradient computed here so backward only scales. The row passes are the device-specific parts.
#include "head_loss.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>

#include "../cpu/head_loss_cpu.h"
#include "checks.h"

namespace vpit {
namespace {

#define HL_CHECK(cond, ...) VPIT_CHECK_ARG("head_loss", cond, __VA_ARGS__)

// Logits rows are padded to this many elements: cuBLAS runs unaligned leading dimensions (e.g.
// LLaMA-3's 128258 + 2) several times slower.
constexpr int64_t kVocabAlign = 128;
// The LM-head gradient accumulates over chunks in fp32 while that buffer fits here; beyond it
// (LLaMA-3-8B: 2 GiB) it accumulates in the weight's dtype, one rounding per chunk.
constexpr int64_t kFp32AccumulatorBytes = int64_t(512) << 20;

void check_same(const at::Tensor& t, const at::Tensor& hidden, const char* name) {
  HL_CHECK(t.device() == hidden.device(), name, " is on ", t.device(), " but hidden is on ",
           hidden.device());
  HL_CHECK(t.scalar_type() == hidden.scalar_type(), name, " is ", t.scalar_type(),
           " but hidden is ", hidden.scalar_type());
}

void check_shapes(const at::Tensor& hidden, const at::Tensor& lm_weight, const at::Tensor& labels,
                  const at::Tensor& visual_rows, const at::Tensor& visual_targets,
                  at::TensorList vp) {
  HL_CHECK(hidden.dim() == 2, "hidden must be [rows, hidden_size], got shape ", hidden.sizes());
  HL_CHECK(is_float_kind(hidden), "hidden must be float32, bfloat16 or float16, got ",
           hidden.scalar_type());
  const int64_t n = hidden.size(0), h = hidden.size(1);
  HL_CHECK(lm_weight.dim() == 2 && lm_weight.size(1) == h, "lm_weight must be [vocab, ", h,
           "], got shape ", lm_weight.sizes());
  HL_CHECK(lm_weight.size(0) > 0, "lm_weight has an empty vocabulary");
  check_same(lm_weight, hidden, "lm_weight");
  HL_CHECK(labels.dim() == 1 && labels.size(0) == n, "labels must be [", n, "], got shape ",
           labels.sizes());
  HL_CHECK(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  HL_CHECK(labels.device() == hidden.device(), "labels is on ", labels.device(),
           " but hidden is on ", hidden.device());
  HL_CHECK(visual_rows.dim() == 1 && visual_rows.scalar_type() == at::kLong,
           "visual_rows must be a 1-D int64 tensor, got ", visual_rows.scalar_type(), " of shape ",
           visual_rows.sizes());
  HL_CHECK(visual_rows.device() == hidden.device(), "visual_rows is on ", visual_rows.device(),
           " but hidden is on ", hidden.device());
  HL_CHECK(vp.size() == 2 || vp.size() == 4,
           "vision head must be {weight, bias} or {w1, b1, w2, b2}, got ", vp.size(), " tensors");
  for (const at::Tensor& p : vp) check_same(p, hidden, "a vision head parameter");
  const at::Tensor& first = vp[0];
  HL_CHECK(first.dim() == 2 && first.size(1) == h, "the vision head's first weight must be [*, ",
           h, "], got shape ", first.sizes());
  HL_CHECK(vp[1].dim() == 1 && vp[1].size(0) == first.size(0),
           "the vision head's first bias must be [", first.size(0), "], got ", vp[1].sizes());
  if (vp.size() == 4) {
    HL_CHECK(vp[2].dim() == 2 && vp[2].size(1) == first.size(0),
             "the vision head's second weight must be [*, ", first.size(0), "], got ",
             vp[2].sizes());
    HL_CHECK(vp[3].dim() == 1 && vp[3].size(0) == vp[2].size(0),
             "the vision head's second bias must be [", vp[2].size(0), "], got ", vp[3].sizes());
  }
  const int64_t dv = vp.back().size(0);
  HL_CHECK(visual_targets.dim() == 2 && visual_targets.size(1) == dv,
           "visual_targets must be [visual rows, ", dv, "], got shape ", visual_targets.sizes());
  HL_CHECK(visual_targets.size(0) == visual_rows.size(0), "visual_targets has ",
           visual_targets.size(0), " rows but visual_rows lists ", visual_rows.size(0));
  check_same(visual_targets, hidden, "visual_targets");
}

// Index checks that need the data, folded into one device->host copy. Returns the text-row count.
int64_t check_indices(const at::Tensor& labels, const at::Tensor& visual_rows, int64_t n,
                      int64_t vocab, int64_t ignore_index) {
  const at::Tensor is_text = labels != ignore_index;
  const at::Tensor bad_label = is_text & ((labels < 0) | (labels >= vocab));
  const at::Tensor in_range = (visual_rows >= 0) & (visual_rows < n);
  const at::Tensor marks = at::zeros({n}, labels.options().dtype(at::kInt))
                               .index_add_(0, visual_rows.masked_fill(~in_range, 0),
                                           in_range.to(at::kInt));
  const at::Tensor stats = at::stack({is_text.sum(), bad_label.sum(), (~in_range).sum(),
                                      (marks > 1).sum(), ((marks > 0) & is_text).sum()})
                               .cpu();
  const int64_t* s = stats.data_ptr<int64_t>();
  HL_CHECK(s[1] == 0, "labels holds ", s[1], " values outside [0, ", vocab,
           ") that are not ignore_index (", ignore_index, ")");
  HL_CHECK(s[2] == 0, "visual_rows holds ", s[2], " indices outside [0, ", n, ")");
  HL_CHECK(s[3] == 0, "visual_rows lists ", s[3], " rows more than once");
  HL_CHECK(s[4] == 0, s[4], " rows are both in visual_rows and have a text target in labels; ",
           "a row has at most one target (set its label to ignore_index)");
  return s[0];
}

// The vision head's forward, its cosine loss and every gradient (of visual_weight * the loss).
struct VisualPart {
  at::Tensor loss_sum;
  at::Tensor grad_rows;  // [Nv, H] gradient of the selected hidden rows
  std::vector<at::Tensor> grad_params;
};

VisualPart visual_part(const at::Tensor& hv, const at::Tensor& targets,
                       const std::vector<at::Tensor>& p, double grad_scale, bool need_grads) {
  const bool mlp = p.size() == 4;
  at::Tensor act, gelu;
  at::Tensor pred;
  if (mlp) {
    act = at::addmm(p[1], hv, p[0].t());
    gelu = at::gelu(act);
    pred = at::addmm(p[3], gelu, p[2].t());
  } else {
    pred = at::addmm(p[1], hv, p[0].t());
  }
  at::Tensor grad_pred = at::empty_like(pred);
  at::Tensor row_loss = at::empty({pred.size(0)}, pred.options().dtype(at::kFloat));
  cosine_rows(pred, targets, need_grads ? grad_scale : 0.0, grad_pred, row_loss);
  VisualPart out{row_loss.sum(), {}, {}};
  if (!need_grads) return out;
  auto bias_grad = [](const at::Tensor& g) { return g.sum(0, false, at::kFloat); };
  // Parameter gradients leave the GEMM in fp32: a bf16 result would be rounded again when
  // backward scales it by the incoming gradient.
  auto weight_grad = [](const at::Tensor& a, const at::Tensor& b) {
    const bool reduced = a.scalar_type() != at::kFloat && a.scalar_type() != at::kDouble;
    return reduced && a.is_cuda() ? at::mm(a, b, at::kFloat) : a.mm(b).to(at::kFloat);
  };
  if (mlp) {
    const at::Tensor grad_act = at::gelu_backward(grad_pred.mm(p[2]), act);
    out.grad_params = {weight_grad(grad_act.t(), hv), bias_grad(grad_act),
                       weight_grad(grad_pred.t(), gelu), bias_grad(grad_pred)};
    out.grad_rows = grad_act.mm(p[0]);
  } else {
    out.grad_params = {weight_grad(grad_pred.t(), hv), bias_grad(grad_pred)};
    out.grad_rows = grad_pred.mm(p[0]);
  }
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, std::vector<at::Tensor>> head_loss(
    const at::Tensor& hidden_in, const at::Tensor& lm_weight_in, const at::Tensor& labels_in,
    const at::Tensor& visual_rows_in, const at::Tensor& visual_targets_in,
    at::TensorList vision_params, double text_weight, double visual_weight, int64_t ignore_index,
    bool sum_reduction, int64_t max_chunk_bytes, bool need_grads, int64_t text_count) {
  check_shapes(hidden_in, lm_weight_in, labels_in, visual_rows_in, visual_targets_in,
               vision_params);
  HL_CHECK(max_chunk_bytes > 0, "max_chunk_bytes must be positive, got ", max_chunk_bytes);
  const at::Tensor hidden = hidden_in.contiguous(), labels = labels_in.contiguous();
  const at::Tensor visual_rows = visual_rows_in.contiguous();
  const int64_t n = hidden.size(0), vocab = lm_weight_in.size(0), h = hidden.size(1);
  HL_CHECK(text_count >= -1 && text_count <= n, "text_count must be -1 (count here) or in [0, ", n,
           "], got ", text_count);
  const int64_t n_text =
      text_count >= 0 ? text_count : check_indices(labels, visual_rows, n, vocab, ignore_index);
  const int64_t n_visual = visual_rows.size(0);

  // CPU math runs in fp32 throughout; CUDA keeps the input dtype for the GEMMs (cuBLAS
  // accumulates in fp32) and does the row passes in fp32 registers.
  const auto math = hidden.is_cuda() ? hidden.scalar_type() : at::kFloat;
  const auto f32 = hidden.options().dtype(at::kFloat);
  const at::Tensor lm_weight = lm_weight_in.to(math).contiguous();
  at::Tensor grad_hidden = need_grads ? at::zeros_like(hidden) : at::Tensor();
  at::Tensor grad_lm;
  at::Tensor text_sum = at::zeros({}, f32);

  if (n_text > 0) {
    const double scale = text_weight / (sum_reduction ? 1.0 : double(n_text));
    const at::Tensor text_rows = at::nonzero_static(labels != ignore_index, n_text).flatten();
    const at::Tensor targets = labels.index_select(0, text_rows);
    const int64_t padded = (vocab + kVocabAlign - 1) / kVocabAlign * kVocabAlign;
    // Per chunk row: its logits row, its hidden row and its hidden-gradient row (the two [rows, H]
    // tensors live beside the logits), so the whole chunk stays within max_chunk_bytes.
    const int64_t row_bytes = (padded + 2 * h) * int64_t(c10::elementSize(math));
    const int64_t chunk = std::clamp<int64_t>(max_chunk_bytes / row_bytes, 1, n_text);
    at::Tensor buffer = at::empty({chunk, padded}, hidden.options().dtype(math));
    // The vocabulary splits into a 128-aligned part and a tail of under 128 rows: with M = V not
    // a multiple of 8 (LLaMA-3's 128258) cuBLAS falls back to Ampere "align2" kernels, 2.7x
    // slower on the H100 than the Hopper kernels it picks for the aligned part.
    const int64_t main_v = vocab / kVocabAlign * kVocabAlign;
    const std::vector<std::pair<int64_t, int64_t>> parts =
        main_v == 0 || main_v == vocab
            ? std::vector<std::pair<int64_t, int64_t>>{{0, vocab}}
            : std::vector<std::pair<int64_t, int64_t>>{{0, main_v}, {main_v, vocab - main_v}};
    const bool fp32_accumulator =
        math == at::kFloat || vocab * h * int64_t(sizeof(float)) <= kFp32AccumulatorBytes;
    at::Tensor grad_w;  // every row is written by the first chunk's GEMM (beta = 0): no zero fill
    if (need_grads) grad_w = at::empty({vocab, h}, f32.dtype(fp32_accumulator ? at::kFloat : math));
    at::Tensor row_loss = at::empty({n_text}, f32);
    for (int64_t start = 0; start < n_text; start += chunk) {
      const int64_t rows = std::min(chunk, n_text - start);
      const at::Tensor index = text_rows.narrow(0, start, rows);
      const at::Tensor h_rows = hidden.index_select(0, index).to(math);
      const at::Tensor block = buffer.narrow(0, 0, rows);
      for (const auto& [first, count] : parts) {
        at::Tensor logits = block.narrow(1, first, count);
        at::mm_out(logits, h_rows, lm_weight.narrow(0, first, count).t());
      }
      at::Tensor logits = block.narrow(1, 0, vocab);
      at::Tensor chunk_loss = row_loss.narrow(0, start, rows);
      cross_entropy_rows(logits, targets.narrow(0, start, rows), need_grads ? scale : 0.0,
                         chunk_loss);
      if (!need_grads) continue;
      // The logits now hold the gradient of the loss with respect to the logits.
      at::Tensor grad_rows;
      for (const auto& [first, count] : parts) {
        const at::Tensor g = block.narrow(1, first, count);
        const at::Tensor w = lm_weight.narrow(0, first, count);
        grad_rows = grad_rows.defined() ? grad_rows.addmm_(g, w) : g.mm(w);
        at::Tensor gw = grad_w.narrow(0, first, count);
        const int beta = start == 0 ? 0 : 1;
        if (gw.scalar_type() == math) {
          gw.addmm_(g.t(), h_rows, beta);
        } else {  // bf16/fp16 operands, fp32 accumulator
          at::addmm_out(gw, gw, g.t(), h_rows, at::kFloat, beta, 1);
        }
      }
      grad_hidden.index_copy_(0, index, grad_rows.to(hidden.scalar_type()));
    }
    text_sum = row_loss.sum();
    if (need_grads) grad_lm = grad_w.to(lm_weight_in.scalar_type());
  } else if (need_grads) {
    grad_lm = at::zeros_like(lm_weight_in);
  }

  std::vector<at::Tensor> params;
  for (const at::Tensor& p : vision_params) params.push_back(p.to(math).contiguous());
  at::Tensor visual_sum = at::zeros({}, f32);
  std::vector<at::Tensor> grad_vision;
  if (n_visual > 0) {
    const double scale = visual_weight / (sum_reduction ? 1.0 : double(n_visual));
    const at::Tensor hv = hidden.index_select(0, visual_rows).to(math);
    VisualPart part = visual_part(hv, visual_targets_in.to(math).contiguous(), params, scale,
                                  need_grads);
    visual_sum = part.loss_sum;
    if (need_grads) {
      grad_hidden.index_copy_(0, visual_rows, part.grad_rows.to(hidden.scalar_type()));
      for (size_t i = 0; i < params.size(); ++i) {
        grad_vision.push_back(part.grad_params[i]);
      }
    }
  } else if (need_grads) {
    for (const at::Tensor& p : vision_params) grad_vision.push_back(at::zeros_like(p, f32));
  }

  const at::Tensor text_loss = sum_reduction || n_text == 0 ? text_sum : text_sum / double(n_text);
  const at::Tensor visual_loss =
      sum_reduction || n_visual == 0 ? visual_sum : visual_sum / double(n_visual);
  const at::Tensor total = text_loss * text_weight + visual_loss * visual_weight;
  const at::Tensor losses = at::stack({total, text_loss, visual_loss});
  // Filled on the device: a host tensor copied over would be a pageable copy, which waits for
  // the stream (a GPU bubble each step).
  const at::Tensor counts = at::empty({2}, hidden.options().dtype(at::kLong));
  counts.select(0, 0).fill_(n_text);
  counts.select(0, 1).fill_(n_visual);
  if (!need_grads) {
    grad_hidden = at::empty({0}, hidden.options());
    grad_lm = at::empty({0}, hidden.options());
  }
  return {losses, counts, grad_hidden, grad_lm, grad_vision};
}

void cross_entropy_rows(at::Tensor& logits, const at::Tensor& targets, double grad_scale,
                        at::Tensor& row_loss) {
#ifdef VPIT_FAST_WITH_CUDA
  if (logits.is_cuda()) return cross_entropy_rows_cuda(logits, targets, grad_scale, row_loss);
#endif
  TORCH_INTERNAL_ASSERT(logits.scalar_type() == at::kFloat && logits.stride(1) == 1);
  float* z = logits.data_ptr<float>();
  const int64_t* t = targets.data_ptr<int64_t>();
  float* loss = row_loss.data_ptr<float>();
  const int64_t ld = logits.stride(0), vocab = logits.size(1);
  at::parallel_for(0, logits.size(0), 1, [&](int64_t begin, int64_t end) {
    cpu::cross_entropy_rows(z, ld, vocab, t, begin, end, float(grad_scale), loss);
  });
}

void cosine_rows(const at::Tensor& pred, const at::Tensor& target, double grad_scale,
                 at::Tensor& grad_pred, at::Tensor& row_loss) {
#ifdef VPIT_FAST_WITH_CUDA
  if (pred.is_cuda()) return cosine_rows_cuda(pred, target, grad_scale, grad_pred, row_loss);
#endif
  TORCH_INTERNAL_ASSERT(pred.scalar_type() == at::kFloat && pred.is_contiguous());
  const float* p = pred.data_ptr<float>();
  const float* t = target.data_ptr<float>();
  float* g = grad_pred.data_ptr<float>();
  float* loss = row_loss.data_ptr<float>();
  const int64_t dim = pred.size(1);
  at::parallel_for(0, pred.size(0), 1, [&](int64_t begin, int64_t end) {
    cpu::cosine_rows(p, t, g, dim, begin, end, float(grad_scale), loss);
  });
}

}  // namespace vpit
