#include "decode_dispatch.h"

#include <ATen/Parallel.h>

#include "../cpu/decode_dispatch_cpu.h"
#include "checks.h"

namespace vpit {
namespace {

// A [batch] vector of `dtype` on first's device.
void check_vector(const char* op, const at::Tensor& t, const char* name, at::ScalarType dtype,
                  int64_t batch, const at::Tensor& first, const char* first_name) {
  VPIT_CHECK(t.device() == first.device(), "vpit_fast.", op, ": ", name, " is on ", t.device(),
             " but ", first_name, " is on ", first.device());
  VPIT_CHECK(t.scalar_type() == dtype, "vpit_fast.", op, ": ", name, " must be ", dtype,
             ", got ", t.scalar_type());
  VPIT_CHECK(t.dim() == 1 && t.size(0) == batch, "vpit_fast.", op, ": ", name, " must be [",
             batch, "], got shape ", t.sizes());
}

}  // namespace

DecodeIds check_decode_dispatch_prepare(const at::Tensor& mode, const at::Tensor& visual_count,
                                        const at::Tensor& images_left, const at::Tensor& text_ids,
                                        const at::Tensor& visual_pred, const at::Tensor& eos_ids,
                                        int64_t num_visual_tokens, int64_t image_start_id,
                                        int64_t image_end_id, int64_t image_token_id,
                                        int64_t pad_id) {
  constexpr const char* op = "decode_dispatch_prepare";
  VPIT_CHECK_ARG("decode_dispatch_prepare", mode.dim() == 1,
                 "mode must be [batch], got shape ", mode.sizes());
  const int64_t batch = mode.size(0);
  check_vector(op, mode, "mode", at::kLong, batch, mode, "mode");
  check_vector(op, visual_count, "visual_count", at::kLong, batch, mode, "mode");
  check_vector(op, images_left, "images_left", at::kLong, batch, mode, "mode");
  check_vector(op, text_ids, "text_ids", at::kLong, batch, mode, "mode");
  VPIT_CHECK_ARG("decode_dispatch_prepare", visual_pred.device() == mode.device(),
                 "visual_pred is on ", visual_pred.device(), " but mode is on ", mode.device());
  VPIT_CHECK_ARG("decode_dispatch_prepare", is_float_kind(visual_pred),
                 "visual_pred must be float32, bfloat16 or float16, got ",
                 visual_pred.scalar_type());
  VPIT_CHECK_ARG("decode_dispatch_prepare", visual_pred.dim() == 2 && visual_pred.size(0) == batch,
                 "visual_pred must be [", batch, ", Dv], got shape ", visual_pred.sizes());
  VPIT_CHECK_ARG("decode_dispatch_prepare", visual_pred.size(1) > 0,
                 "visual_pred has no channels (shape ", visual_pred.sizes(), ")");
  VPIT_CHECK_ARG("decode_dispatch_prepare", eos_ids.dim() == 1,
                 "eos_ids must be [E], got shape ", eos_ids.sizes());
  check_vector(op, eos_ids, "eos_ids", at::kLong, eos_ids.size(0), mode, "mode");
  VPIT_CHECK_ARG("decode_dispatch_prepare", num_visual_tokens >= 0,
                 "num_visual_tokens must be >= 0, got ", num_visual_tokens);
  return DecodeIds{num_visual_tokens, image_start_id, image_end_id, image_token_id, pad_id};
}

void check_decode_dispatch_assemble(const at::Tensor& next_ids, const at::Tensor& emits_visual,
                                    const at::Tensor& adapted, const at::Tensor& token_embedding) {
  constexpr const char* op = "decode_dispatch_assemble";
  VPIT_CHECK_ARG("decode_dispatch_assemble", next_ids.dim() == 1,
                 "next_ids must be [batch], got shape ", next_ids.sizes());
  const int64_t batch = next_ids.size(0);
  check_vector(op, next_ids, "next_ids", at::kLong, batch, next_ids, "next_ids");
  check_vector(op, emits_visual, "emits_visual", at::kBool, batch, next_ids, "next_ids");
  VPIT_CHECK_ARG("decode_dispatch_assemble", token_embedding.device() == next_ids.device(),
                 "token_embedding is on ", token_embedding.device(), " but next_ids is on ",
                 next_ids.device());
  VPIT_CHECK_ARG("decode_dispatch_assemble", is_float_kind(token_embedding),
                 "token_embedding must be float32, bfloat16 or float16, got ",
                 token_embedding.scalar_type());
  VPIT_CHECK_ARG("decode_dispatch_assemble", token_embedding.dim() == 2,
                 "token_embedding must be [V, H], got shape ", token_embedding.sizes());
  VPIT_CHECK_ARG("decode_dispatch_assemble", adapted.device() == next_ids.device(),
                 "adapted is on ", adapted.device(), " but next_ids is on ", next_ids.device());
  VPIT_CHECK_ARG("decode_dispatch_assemble",
                 adapted.scalar_type() == token_embedding.scalar_type(), "adapted is ",
                 adapted.scalar_type(), " but token_embedding is ", token_embedding.scalar_type(),
                 " (cast adapted to token_embedding's dtype)");
  VPIT_CHECK_ARG("decode_dispatch_assemble",
                 adapted.dim() == 2 && adapted.size(0) == batch &&
                     adapted.size(1) == token_embedding.size(1),
                 "adapted must be [", batch, ", ", token_embedding.size(1), "], got shape ",
                 adapted.sizes());
}

DecodeStateTensors decode_state_tensors(const at::Tensor& mode, const at::Tensor& visual_count,
                                        const at::Tensor& images_left, const at::Tensor& text_ids) {
  const int64_t batch = mode.size(0);
  const auto fresh = [&](at::ScalarType dtype) {
    return at::empty({batch}, mode.options().dtype(dtype));
  };
  return {mode.contiguous(),       visual_count.contiguous(), images_left.contiguous(),
          text_ids.contiguous(),   fresh(at::kLong),          fresh(at::kBool),
          fresh(at::kLong),        fresh(at::kLong),          fresh(at::kLong)};
}

DecodeStateIn DecodeStateTensors::in() const {
  return {mode.data_ptr<int64_t>(), visual_count.data_ptr<int64_t>(),
          images_left.data_ptr<int64_t>(), text_ids.data_ptr<int64_t>()};
}

DecodeStateOut DecodeStateTensors::out() const {
  return {next_ids.data_ptr<int64_t>(), emits_visual.data_ptr<bool>(),
          new_mode.data_ptr<int64_t>(), new_count.data_ptr<int64_t>(),
          new_left.data_ptr<int64_t>()};
}

at::Tensor embedding_rows(const at::Tensor& token_embedding) {
  const bool rows_contiguous =
      token_embedding.stride(1) == 1 && token_embedding.stride(0) >= token_embedding.size(1);
  return rows_contiguous ? token_embedding : token_embedding.contiguous();
}

// The CPU kernel works in fp32: one upcast in and one cast out round as the reference does
// (fp32 math, then a cast to visual_pred's dtype).
DecodePrepared decode_dispatch_prepare_cpu(const at::Tensor& mode, const at::Tensor& visual_count,
                                           const at::Tensor& images_left,
                                           const at::Tensor& text_ids,
                                           const at::Tensor& visual_pred,
                                           const at::Tensor& eos_ids, int64_t num_visual_tokens,
                                           int64_t image_start_id, int64_t image_end_id,
                                           int64_t image_token_id, int64_t pad_id, bool normalize) {
  const DecodeIds ids =
      check_decode_dispatch_prepare(mode, visual_count, images_left, text_ids, visual_pred,
                                    eos_ids, num_visual_tokens, image_start_id, image_end_id,
                                    image_token_id, pad_id);
  const DecodeStateTensors state = decode_state_tensors(mode, visual_count, images_left, text_ids);
  const at::Tensor eos_c = eos_ids.contiguous();
  const at::Tensor pred32 = visual_pred.to(at::kFloat).contiguous();
  const int64_t batch = mode.size(0), dim = visual_pred.size(1);
  at::Tensor visual = at::empty({batch, dim}, pred32.options());

  const DecodeStateIn in = state.in();
  const DecodeStateOut out = state.out();
  const float* src = pred32.data_ptr<float>();
  float* dst = visual.data_ptr<float>();
  const int64_t* eos = eos_c.data_ptr<int64_t>();
  const int64_t num_eos = eos_c.numel();
  // Rows are cheap (Dv ~ 1k floats): spread them over threads only in bigger batches.
  at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
    cpu::decode_dispatch_prepare(in, src, eos, num_eos, out, dst, begin, end, dim, ids, normalize);
  });
  return {state.next_ids, visual.to(visual_pred.scalar_type()), state.emits_visual, state.new_mode,
          state.new_count, state.new_left};
}

at::Tensor decode_dispatch_assemble_cpu(const at::Tensor& next_ids, const at::Tensor& emits_visual,
                                        const at::Tensor& adapted,
                                        const at::Tensor& token_embedding) {
  check_decode_dispatch_assemble(next_ids, emits_visual, adapted, token_embedding);
  const at::Tensor ids_c = next_ids.contiguous(), emits_c = emits_visual.contiguous();
  const at::Tensor adapted_c = adapted.contiguous();
  const at::Tensor table = embedding_rows(token_embedding);
  const int64_t batch = next_ids.size(0), hidden = table.size(1), vocab = table.size(0);
  const int64_t* ids = ids_c.data_ptr<int64_t>();
  const bool* emits = emits_c.data_ptr<bool>();
  // Checked here, on the host, where it is free: a bad id must never be read.
  for (int64_t row = 0; row < batch; ++row) {
    VPIT_CHECK_ARG("decode_dispatch_assemble", emits[row] || (ids[row] >= 0 && ids[row] < vocab),
                   "next_ids[", row, "] = ", ids[row], " is outside token_embedding's ", vocab,
                   " rows");
  }
  at::Tensor out = at::empty({batch, hidden}, table.options());
  const int64_t elem = int64_t(table.element_size());
  const int64_t row_bytes = hidden * elem, stride_bytes = table.stride(0) * elem;
  const void* adapted_ptr = adapted_c.data_ptr();
  const void* table_ptr = table.data_ptr();
  void* out_ptr = out.data_ptr();
  at::parallel_for(0, batch, 16, [&](int64_t begin, int64_t end) {
    cpu::decode_dispatch_assemble(ids, emits, adapted_ptr, table_ptr, stride_bytes, out_ptr,
                                  row_bytes, begin, end);
  });
  return out;
}

}  // namespace vpit
