#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../cuda/decode_layer.h"
#include "checks.h"
#include "cuda_device.h"
#include "cuda_dtype.h"
#include "decode_layer.h"

namespace vpit {
namespace {

// Whole 16-byte packs: the tensor's start and every row start (stride(0)) are 16-byte aligned
// and its last dimension is contiguous.
bool packed_rows(const at::Tensor& t) {
  const int64_t elem = int64_t(t.element_size());
  return cuda::is_aligned(t.data_ptr(), 16) && (t.size(-1) <= 1 || t.stride(-1) == 1) &&
         (t.size(0) <= 1 || (t.stride(0) * elem) % 16 == 0) && (t.size(-1) * elem) % 16 == 0;
}

// A weight the kernels read as dense rows.
bool dense_weight(const at::Tensor& w) { return w.is_contiguous() && packed_rows(w); }

bool contiguous_or_none(const OptionalTensor& t) { return !t.has_value() || t->is_contiguous(); }

const void* ptr_or_null(const OptionalTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }


// The kernels' shared memory (weight ring + staged rows) within what a block may opt in to.
bool stage_fits(const at::Tensor& hidden) {
  const int64_t stage = hidden.size(0) * hidden.size(1) * int64_t(hidden.element_size());
  const int64_t limit = int64_t(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  return cuda::kDecodeLayerRingBytes + stage <= limit;
}

void check_launch(const char* op, cudaError_t err) {
  VPIT_CHECK(err == cudaSuccess, "vpit_fast.", op, ": CUDA error: ", cudaGetErrorString(err));
}

}  // namespace

bool decode_qkv_rope_cuda(const at::Tensor& hidden, const at::Tensor& norm_weight, double eps,
                          const at::Tensor& wq, const at::Tensor& wk, const at::Tensor& wv,
                          const OptionalTensor& bq, const OptionalTensor& bk,
                          const OptionalTensor& bv, const at::Tensor& inv_freq, double rope_scale,
                          const at::Tensor& positions, const at::Tensor& cursor,
                          at::Tensor& key_cache, at::Tensor& value_cache, at::Tensor& query) {
  const int64_t R = hidden.size(0);
  if (R > kDecodeLayerMaxRows || !packed_rows(hidden) || !stage_fits(hidden) || !dense_weight(wq) ||
      !dense_weight(wk) || !dense_weight(wv) || !norm_weight.is_contiguous() || !contiguous_or_none(bq) ||
      !contiguous_or_none(bk) || !contiguous_or_none(bv) || !inv_freq.is_contiguous() ||
      !positions.is_contiguous() || key_cache.strides() != value_cache.strides())
    return false;
  const c10::cuda::CUDAGuard guard(hidden.device());
  QkvRopeShape s{};
  s.rows = R;
  s.hidden = hidden.size(1);
  s.heads = query.size(1);
  s.kv_heads = key_cache.size(1);
  s.head_dim = key_cache.size(3);
  s.x_stride = hidden.stride(0);
  s.cache_stride_r = key_cache.stride(0);
  s.cache_stride_h = key_cache.stride(1);
  s.cache_stride_l = key_cache.stride(2);
  s.eps = static_cast<float>(eps);
  s.rope_scale = static_cast<float>(rope_scale);
  check_launch("decode_qkv_rope",
               cuda::decode_qkv_rope(hidden.data_ptr(), norm_weight.data_ptr(), wq.data_ptr(), wk.data_ptr(),
                                     wv.data_ptr(), ptr_or_null(bq), ptr_or_null(bk), ptr_or_null(bv),
                                     inv_freq.data_ptr<float>(), positions.data_ptr<int64_t>(),
                                     cursor.data_ptr<int64_t>(), query.data_ptr(), key_cache.data_ptr(),
                                     value_cache.data_ptr(), cuda_dtype(hidden), s, current_num_sms(),
                                     current_supports_programmatic_launch(), at::cuda::getCurrentCUDAStream()));
  return true;
}

bool decode_gate_up_cuda(const at::Tensor& hidden, const at::Tensor& norm_weight, double eps,
                         const at::Tensor& w_gate, const at::Tensor& w_up,
                         const OptionalTensor& b_gate, const OptionalTensor& b_up, at::Tensor& out) {
  const int64_t R = hidden.size(0);
  if (R > kDecodeLayerMaxRows || !packed_rows(hidden) || !stage_fits(hidden) || !dense_weight(w_gate) ||
      !dense_weight(w_up) || !norm_weight.is_contiguous() || !contiguous_or_none(b_gate) ||
      !contiguous_or_none(b_up))
    return false;
  const c10::cuda::CUDAGuard guard(hidden.device());
  GateUpShape s{};
  s.rows = R;
  s.hidden = hidden.size(1);
  s.intermediate = w_gate.size(0);
  s.x_stride = hidden.stride(0);
  s.eps = static_cast<float>(eps);
  check_launch("decode_gate_up",
               cuda::decode_gate_up(hidden.data_ptr(), norm_weight.data_ptr(), w_gate.data_ptr(),
                                    w_up.data_ptr(), ptr_or_null(b_gate), ptr_or_null(b_up), out.data_ptr(),
                                    cuda_dtype(hidden), s, current_num_sms(),
                                    current_supports_programmatic_launch(), at::cuda::getCurrentCUDAStream()));
  return true;
}

bool decode_proj_add_cuda(at::Tensor& residual, const at::Tensor& x, const at::Tensor& weight,
                          const OptionalTensor& bias) {
  const int64_t R = residual.size(0);
  if (R > kDecodeLayerMaxRows || !packed_rows(x) || !dense_weight(weight) || !contiguous_or_none(bias) ||
      (residual.size(1) > 1 && residual.stride(1) != 1))
    return false;
  const c10::cuda::CUDAGuard guard(residual.device());
  ProjAddShape s{};
  s.rows = R;
  s.in_features = x.size(1);
  s.out_features = residual.size(1);
  s.x_stride = x.stride(0);
  s.residual_stride = residual.stride(0);
  check_launch("decode_proj_add_",
               cuda::decode_proj_add(residual.data_ptr(), x.data_ptr(), weight.data_ptr(), ptr_or_null(bias),
                                     cuda_dtype(residual), s, current_num_sms(),
                                     current_supports_programmatic_launch(), at::cuda::getCurrentCUDAStream()));
  return true;
}

}  // namespace vpit
