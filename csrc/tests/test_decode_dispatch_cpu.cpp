// Unit tests of the framework-free decode-step pieces: every transition of the row state
// machine, and the CPU kernels' visual tokens and embedding gather.
#include <cmath>
#include <cstring>
#include <vector>

#include "check.h"
#include "cpu/decode_dispatch_cpu.h"

using vpit::kDoneMode;
using vpit::kImageMode;
using vpit::kTextMode;

static const vpit::DecodeIds kIds{4, /*start*/ 11, /*end*/ 12, /*image token*/ 10, /*pad*/ 0};

static void check_step(int64_t mode, int64_t count, int64_t left, int64_t text_id, bool eos,
                       int64_t next_id, int64_t new_mode, int64_t new_count, int64_t new_left,
                       bool emits_visual) {
  const vpit::RowStep s = vpit::decode_row_step(mode, count, left, text_id, eos, kIds);
  CHECK(s.next_id == next_id && s.mode == new_mode && s.visual_count == new_count &&
            s.images_left == new_left && s.emits_visual == emits_visual,
        "mode %lld count %lld left %lld id %lld eos %d -> id %lld mode %lld count %lld left %lld visual %d",
        (long long)mode, (long long)count, (long long)left, (long long)text_id, int(eos),
        (long long)s.next_id, (long long)s.mode, (long long)s.visual_count,
        (long long)s.images_left, int(s.emits_visual));
}

static void test_transitions() {
  check_step(kTextMode, 0, 2, 5, false, 5, kTextMode, 0, 2, false);       // a word
  check_step(kTextMode, 0, 2, 11, false, 11, kImageMode, 0, 1, false);    // <image_start>
  check_step(kTextMode, 0, 2, 13, true, 13, kDoneMode, 0, 2, false);      // end of turn
  check_step(kTextMode, 0, 2, 11, true, 11, kDoneMode, 0, 1, false);      // both: done wins
  check_step(kImageMode, 0, 1, 7, false, 10, kImageMode, 1, 1, true);     // first visual token
  check_step(kImageMode, 3, 1, 11, true, 10, kImageMode, 4, 1, true);     // last; text id ignored
  check_step(kImageMode, 4, 1, 7, false, 12, kTextMode, 0, 1, false);     // <image_end>
  check_step(kDoneMode, 0, 0, 11, true, 0, kDoneMode, 0, 0, false);       // done stays done
  check_step(7, 3, 5, 11, false, 0, 7, 3, 5, false);                      // unknown mode: as done
}

static void test_prepare_and_assemble() {
  const int64_t dim = 3;
  const std::vector<int64_t> mode{kTextMode, kImageMode, kImageMode}, count{0, 1, 4}, left{1, 1, 1},
      text{11, 5, 5}, eos{13};
  const std::vector<float> pred{1, 2, 3, 3, 0, 4, 5, 6, 7};
  std::vector<int64_t> next_ids(3), new_mode(3), new_count(3), new_left(3);
  bool emits[3];
  std::vector<float> visual(9, -1.f);
  const vpit::DecodeStateIn in{mode.data(), count.data(), left.data(), text.data()};
  const vpit::DecodeStateOut out{next_ids.data(), emits, new_mode.data(), new_count.data(),
                                 new_left.data()};
  vpit::cpu::decode_dispatch_prepare(in, pred.data(), eos.data(), 1, out, visual.data(), 0, 3, dim,
                                     kIds, true);
  CHECK(next_ids[0] == 11 && next_ids[1] == 10 && next_ids[2] == 12, "ids %lld %lld %lld",
        (long long)next_ids[0], (long long)next_ids[1], (long long)next_ids[2]);
  CHECK(!emits[0] && emits[1] && !emits[2], "emits %d %d %d", emits[0], emits[1], emits[2]);
  // Row 1 is (3, 0, 4) / 5; the others are zero.
  const float expected[9] = {0, 0, 0, 0.6f, 0, 0.8f, 0, 0, 0};
  for (int i = 0; i < 9; ++i) CHECK(std::fabs(visual[i] - expected[i]) < 1e-7f, "visual[%d] = %f", i, visual[i]);

  // Gather: row 1 takes the adapter output, rows 0 and 2 table rows 11 and 12 (stride 5 floats).
  const int64_t hidden = 2, stride = 5;
  std::vector<float> table(13 * stride), adapted{-1, -2, -3, -4, -5, -6}, embeds(6);
  for (size_t i = 0; i < table.size(); ++i) table[i] = float(i);
  vpit::cpu::decode_dispatch_assemble(next_ids.data(), emits, adapted.data(), table.data(),
                                      stride * sizeof(float), embeds.data(), hidden * sizeof(float), 0, 3);
  const float gathered[6] = {55, 56, -3, -4, 60, 61};
  for (int i = 0; i < 6; ++i) CHECK(embeds[i] == gathered[i], "embeds[%d] = %f", i, embeds[i]);
}

int main() {
  test_transitions();
  test_prepare_and_assemble();
  return TEST_MAIN_RESULT();
}
