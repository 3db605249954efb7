#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../cuda/decode_dispatch.h"
#include "checks.h"
#include "cuda_dtype.h"
#include "decode_dispatch.h"

namespace vpit {

DecodePrepared decode_dispatch_prepare_cuda(const at::Tensor& mode, const at::Tensor& visual_count,
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
  const c10::cuda::CUDAGuard guard(mode.device());
  const DecodeStateTensors state = decode_state_tensors(mode, visual_count, images_left, text_ids);
  const at::Tensor eos_c = eos_ids.contiguous(), pred_c = visual_pred.contiguous();
  const int64_t batch = mode.size(0), dim = visual_pred.size(1);
  at::Tensor visual = at::empty({batch, dim}, visual_pred.options());

  const cudaError_t err = cuda::decode_dispatch_prepare(
      state.in(), pred_c.data_ptr(), eos_c.data_ptr<int64_t>(), eos_c.numel(), state.out(),
      visual.data_ptr(), cuda_dtype(visual_pred), batch, dim, ids, normalize,
      at::cuda::getCurrentCUDAStream());
  VPIT_CHECK(err == cudaSuccess, "vpit_fast.decode_dispatch_prepare: CUDA error: ",
             cudaGetErrorString(err));
  return {state.next_ids,  visual,          state.emits_visual,
          state.new_mode,  state.new_count, state.new_left};
}

// No host-side id check here: it would need a sync. The kernel asserts on the device instead
// (see csrc/cuda/decode_dispatch.h); in generation the ids come from the sampler, which never
// produces one outside the table, and the fixed ids are checked in Python before the launch.
at::Tensor decode_dispatch_assemble_cuda(const at::Tensor& next_ids,
                                         const at::Tensor& emits_visual, const at::Tensor& adapted,
                                         const at::Tensor& token_embedding) {
  check_decode_dispatch_assemble(next_ids, emits_visual, adapted, token_embedding);
  const c10::cuda::CUDAGuard guard(next_ids.device());
  const at::Tensor ids_c = next_ids.contiguous(), emits_c = emits_visual.contiguous();
  const at::Tensor adapted_c = adapted.contiguous();
  const at::Tensor table = embedding_rows(token_embedding);
  const int64_t batch = next_ids.size(0), hidden = table.size(1);
  at::Tensor out = at::empty({batch, hidden}, table.options());
  const int64_t elem = int64_t(table.element_size());
  const cudaError_t err = cuda::decode_dispatch_assemble(
      ids_c.data_ptr<int64_t>(), emits_c.data_ptr<bool>(), adapted_c.data_ptr(), table.data_ptr(),
      table.size(0), table.stride(0) * elem, out.data_ptr(), batch, hidden * elem,
      at::cuda::getCurrentCUDAStream());
  VPIT_CHECK(err == cudaSuccess, "vpit_fast.decode_dispatch_assemble: CUDA error: ",
             cudaGetErrorString(err));
  return out;
}

}  // namespace vpit
