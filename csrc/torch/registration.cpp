// The vpit_fast operator library: schemas, and the CPU and CUDA implementation of each.
// Fake (meta) implementations and autograd are registered from Python (vpit_fast/ops/).
#include <torch/library.h>

#include "decode_attention.h"
#include "decode_dispatch.h"
#include "decode_layer.h"
#include "head_loss.h"
#include "interpolate_tokens.h"
#include "master_adamw.h"
#include "rms_norm.h"
#include "scale_inplace.h"
#include "segment_attention.h"

TORCH_LIBRARY(vpit_fast, m) {
  m.def("interpolate_tokens(Tensor x, int in_h, int in_w, int out_h, int out_w, bool normalize) -> Tensor");
  m.def("interpolate_tokens_backward(Tensor grad_out, Tensor x, int in_h, int in_w, int out_h, "
        "int out_w, bool normalize) -> Tensor");
  m.def("head_loss(Tensor hidden, Tensor lm_weight, Tensor labels, Tensor visual_rows, "
        "Tensor visual_targets, Tensor[] vision_params, float text_weight, float visual_weight, "
        "int ignore_index, bool sum_reduction, int max_chunk_bytes, bool need_grads, int text_count=-1) -> "
        "(Tensor losses, Tensor counts, Tensor grad_hidden, Tensor grad_lm_weight, "
        "Tensor[] grad_vision_params)");
  m.def("scale_(Tensor(a!) t, Tensor factor) -> ()");
  m.def("decode_dispatch_prepare(Tensor mode, Tensor visual_count, Tensor images_left, "
        "Tensor text_ids, Tensor visual_pred, Tensor eos_ids, int num_visual_tokens, "
        "int image_start_id, int image_end_id, int image_token_id, int pad_id, bool normalize) -> "
        "(Tensor next_ids, Tensor visual, Tensor emits_visual, Tensor new_mode, "
        "Tensor new_visual_count, Tensor new_images_left)");
  m.def("decode_dispatch_assemble(Tensor next_ids, Tensor emits_visual, Tensor adapted, "
        "Tensor token_embedding) -> Tensor");
  m.def("decode_attention(Tensor query, Tensor key, Tensor value, Tensor key_valid, float scale) "
        "-> Tensor");
  m.def("decode_qkv_rope(Tensor hidden, Tensor norm_weight, float eps, Tensor wq, Tensor wk, Tensor wv, "
        "Tensor? bq, Tensor? bk, Tensor? bv, Tensor inv_freq, float rope_scale, Tensor positions, "
        "Tensor cursor, Tensor(a!) key_cache, Tensor(b!) value_cache) -> Tensor");
  m.def("decode_gate_up(Tensor hidden, Tensor norm_weight, float eps, Tensor w_gate, Tensor w_up, "
        "Tensor? b_gate, Tensor? b_up) -> Tensor");
  m.def("decode_proj_add_(Tensor(a!) residual, Tensor x, Tensor weight, Tensor? bias) -> ()");
  m.def("master_adamw_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] masters, Tensor(c!)[] exp_avgs, "
        "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] steps, float lr, float beta1, float beta2, float eps, "
        "float weight_decay) -> ()");
  // max_seqlen is a SymInt so torch.compile keeps it symbolic: as an int, every new longest segment
  // would compile the decoder block again until the recompile limit sends it back to eager.
  m.def("segment_attention(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens, SymInt max_seqlen, "
        "float scale) -> (Tensor out, Tensor lse)");
  m.def("segment_attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
        "Tensor lse, Tensor cu_seqlens, SymInt max_seqlen, float scale) -> (Tensor grad_query, Tensor grad_key, "
        "Tensor grad_value)");
  m.def("rms_norm_backward(Tensor grad_out, Tensor? grad_direct, Tensor h, Tensor rstd, Tensor weight) -> "
        "(Tensor grad_input, Tensor grad_weight)");
}

TORCH_LIBRARY_IMPL(vpit_fast, CPU, m) {
  m.impl("interpolate_tokens", &vpit::interpolate_tokens_cpu);
  m.impl("interpolate_tokens_backward", &vpit::interpolate_tokens_backward_cpu);
  m.impl("head_loss", &vpit::head_loss);
  m.impl("scale_", &vpit::scale_inplace_cpu);
  m.impl("decode_dispatch_prepare", &vpit::decode_dispatch_prepare_cpu);
  m.impl("decode_dispatch_assemble", &vpit::decode_dispatch_assemble_cpu);
  m.impl("decode_attention", &vpit::decode_attention_cpu);
  m.impl("decode_qkv_rope", &vpit::decode_qkv_rope);
  m.impl("decode_gate_up", &vpit::decode_gate_up);
  m.impl("decode_proj_add_", &vpit::decode_proj_add_);
  m.impl("master_adamw_", &vpit::master_adamw_cpu);
  m.impl("rms_norm_backward", &vpit::rms_norm_backward_cpu);
}

#ifdef VPIT_FAST_WITH_CUDA
TORCH_LIBRARY_IMPL(vpit_fast, CUDA, m) {
  m.impl("interpolate_tokens", &vpit::interpolate_tokens_cuda);
  m.impl("interpolate_tokens_backward", &vpit::interpolate_tokens_backward_cuda);
  m.impl("head_loss", &vpit::head_loss);  // shared orchestration; CUDA row passes inside
  m.impl("scale_", &vpit::scale_inplace_cuda);
  m.impl("decode_dispatch_prepare", &vpit::decode_dispatch_prepare_cuda);
  m.impl("decode_dispatch_assemble", &vpit::decode_dispatch_assemble_cuda);
  m.impl("decode_attention", &vpit::decode_attention_cuda);
  // Shared with the CPU: ATen ops where the kernels do not take the arguments.
  m.impl("decode_qkv_rope", &vpit::decode_qkv_rope);
  m.impl("decode_gate_up", &vpit::decode_gate_up);
  m.impl("decode_proj_add_", &vpit::decode_proj_add_);
  m.impl("master_adamw_", &vpit::master_adamw_cuda);
  m.impl("segment_attention", &vpit::segment_attention_cuda);  // CUDA only
  m.impl("segment_attention_backward", &vpit::segment_attention_backward_cuda);
  m.impl("rms_norm_backward", &vpit::rms_norm_backward_cuda);
}
#endif
