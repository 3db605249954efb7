// Torch adapters of the decode-step dispatch: check the arguments, then launch the CPU or CUDA
// kernel. Inference only: no backward exists (vpit_fast/ops/decode_dispatch.py says so).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "../kernels/decode_step.h"

namespace vpit {

using DecodePrepared = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Validates the state vectors ([B] int64), visual_pred ([B, Dv] floating), eos_ids ([E] int64),
// all on one device, and n >= 0; returns the ids for the kernels.
DecodeIds check_decode_dispatch_prepare(const at::Tensor& mode, const at::Tensor& visual_count,
                                        const at::Tensor& images_left, const at::Tensor& text_ids,
                                        const at::Tensor& visual_pred, const at::Tensor& eos_ids,
                                        int64_t num_visual_tokens, int64_t image_start_id,
                                        int64_t image_end_id, int64_t image_token_id,
                                        int64_t pad_id);
// Validates next_ids ([B] int64), emits_visual ([B] bool), adapted ([B, H]) and
// token_embedding ([V, H], adapted's dtype), all on one device.
void check_decode_dispatch_assemble(const at::Tensor& next_ids, const at::Tensor& emits_visual,
                                    const at::Tensor& adapted, const at::Tensor& token_embedding);

// Returns (next_ids [B] int64, visual [B, Dv] visual_pred's dtype, emits_visual [B] bool,
// mode, visual_count, images_left [B] int64).
DecodePrepared decode_dispatch_prepare_cpu(const at::Tensor& mode, const at::Tensor& visual_count,
                                           const at::Tensor& images_left,
                                           const at::Tensor& text_ids,
                                           const at::Tensor& visual_pred,
                                           const at::Tensor& eos_ids, int64_t num_visual_tokens,
                                           int64_t image_start_id, int64_t image_end_id,
                                           int64_t image_token_id, int64_t pad_id, bool normalize);
// Returns next_embeds [B, H] in token_embedding's dtype.
at::Tensor decode_dispatch_assemble_cpu(const at::Tensor& next_ids, const at::Tensor& emits_visual,
                                        const at::Tensor& adapted,
                                        const at::Tensor& token_embedding);
#ifdef VPIT_FAST_WITH_CUDA
DecodePrepared decode_dispatch_prepare_cuda(const at::Tensor& mode, const at::Tensor& visual_count,
                                            const at::Tensor& images_left,
                                            const at::Tensor& text_ids,
                                            const at::Tensor& visual_pred,
                                            const at::Tensor& eos_ids, int64_t num_visual_tokens,
                                            int64_t image_start_id, int64_t image_end_id,
                                            int64_t image_token_id, int64_t pad_id, bool normalize);
at::Tensor decode_dispatch_assemble_cuda(const at::Tensor& next_ids,
                                         const at::Tensor& emits_visual, const at::Tensor& adapted,
                                         const at::Tensor& token_embedding);
#endif

// The state vectors of one prepare call, shared by the CPU and CUDA adapters: the inputs made
// contiguous, the five fresh [B] outputs, and the kernels' views of both.
struct DecodeStateTensors {
  at::Tensor mode, visual_count, images_left, text_ids;              // inputs
  at::Tensor next_ids, emits_visual, new_mode, new_count, new_left;  // outputs
  DecodeStateIn in() const;
  DecodeStateOut out() const;
};
DecodeStateTensors decode_state_tensors(const at::Tensor& mode, const at::Tensor& visual_count,
                                        const at::Tensor& images_left, const at::Tensor& text_ids);

// token_embedding as the kernels read it: rows of contiguous elements (any row stride), so the
// [V, H] table is never copied; other layouts are made contiguous.
at::Tensor embedding_rows(const at::Tensor& token_embedding);

}  // namespace vpit
