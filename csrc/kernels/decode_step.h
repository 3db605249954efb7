// The per-row state machine of one decode step (modality dispatch of MetaMorph generation).
// Framework-free: included by the CPU kernel, the CUDA kernel and their unit tests, so the two
// devices cannot disagree on a transition. The contract is vpit_fast.ops.reference.dispatch_next_inputs.
#pragma once
#include <cstdint>

#if !defined(VPIT_HOST_DEVICE)
#if defined(__CUDACC__)
#define VPIT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define VPIT_HOST_DEVICE inline
#endif
#endif

namespace vpit {

// Row modes (int64 in the state tensors). Any other value behaves as done: it emits pad_id and
// keeps its state, as the reference does.
constexpr int64_t kTextMode = 0;
constexpr int64_t kImageMode = 1;
constexpr int64_t kDoneMode = 2;

// F.normalize's eps: emitted visual tokens are divided by max(||v||, kVisualNormEps).
constexpr float kVisualNormEps = 1e-12f;

// The token ids and image length the step needs.
struct DecodeIds {
  int64_t num_visual_tokens;  // n: visual tokens per image
  int64_t image_start_id;
  int64_t image_end_id;
  int64_t image_token_id;
  int64_t pad_id;
};

// The [B] int64 state and sampled ids a step reads.
struct DecodeStateIn {
  const int64_t* mode;
  const int64_t* visual_count;
  const int64_t* images_left;
  const int64_t* text_ids;
};

// What a step writes per row ([B] each).
struct DecodeStateOut {
  int64_t* next_ids;
  bool* emits_visual;
  int64_t* mode;
  int64_t* visual_count;
  int64_t* images_left;
};

struct RowStep {
  int64_t next_id;
  int64_t mode;
  int64_t visual_count;
  int64_t images_left;
  bool emits_visual;
};

// One row's transition. The updates are applied in the reference's order, so a text id that is
// both <image_start> and an end-of-turn id ends the turn (mode done) yet still counts the image.
VPIT_HOST_DEVICE RowStep decode_row_step(int64_t mode, int64_t visual_count, int64_t images_left,
                                         int64_t text_id, bool text_id_is_eos, const DecodeIds& ids) {
  const bool in_text = mode == kTextMode;
  const bool in_image = mode == kImageMode;
  const bool emits_visual = in_image && visual_count < ids.num_visual_tokens;
  const bool emits_end = in_image && visual_count >= ids.num_visual_tokens;
  const bool starts_image = in_text && text_id == ids.image_start_id;
  const bool ends_turn = in_text && text_id_is_eos;

  RowStep s;
  s.emits_visual = emits_visual;
  s.next_id = in_text ? text_id : ids.pad_id;
  if (emits_visual) s.next_id = ids.image_token_id;
  if (emits_end) s.next_id = ids.image_end_id;

  s.mode = starts_image ? kImageMode : mode;
  if (emits_end) s.mode = kTextMode;
  if (ends_turn) s.mode = kDoneMode;

  s.visual_count = emits_visual ? visual_count + 1 : visual_count;
  if (emits_end || starts_image) s.visual_count = 0;

  s.images_left = images_left - (starts_image ? 1 : 0);
  return s;
}

// Writes row `row` of a step's outputs (shared by the CPU and CUDA kernels).
VPIT_HOST_DEVICE void store_row_step(const DecodeStateOut& out, int64_t row, const RowStep& s) {
  out.next_ids[row] = s.next_id;
  out.emits_visual[row] = s.emits_visual;
  out.mode[row] = s.mode;
  out.visual_count[row] = s.visual_count;
  out.images_left[row] = s.images_left;
}

}  // namespace vpit
