#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../cuda/decode_attention.h"
#include "checks.h"
#include "cuda_device.h"
#include "cuda_dtype.h"
#include "decode_attention.h"

namespace vpit {
namespace {

// Row starts of t ([..., D] with unit last stride) are 16-byte aligned.
bool rows_aligned(const at::Tensor& t) {
  if (!cuda::is_aligned(t.data_ptr(), 16)) return false;
  const int64_t elem = int64_t(t.element_size());
  for (int64_t d = 0; d + 1 < t.dim(); ++d)
    if (t.size(d) > 1 && (t.stride(d) * elem) % 16 != 0) return false;
  return true;
}

}  // namespace

at::Tensor decode_attention_cuda(const at::Tensor& query, const at::Tensor& key,
                                 const at::Tensor& value, const at::Tensor& key_valid,
                                 double scale) {
  const DecodeAttentionArgs a = check_decode_attention(query, key, value, key_valid, scale);
  const DecodeAttentionShape& s = a.shape;
  VPIT_CHECK_ARG("decode_attention", s.batch < 65536, "batch must be below 65536 on CUDA, got ",
                 s.batch);
  const c10::cuda::CUDAGuard guard(query.device());
  const int num_sms = current_num_sms();
  at::Tensor out = at::empty({s.batch, s.heads, s.head_dim}, query.options());
  at::Tensor scratch = at::empty({cuda::decode_attention_scratch_floats(s, num_sms)},
                                 query.options().dtype(at::kFloat));
  const bool vectorized = rows_aligned(a.query) && rows_aligned(a.key) && rows_aligned(a.value);
  const cudaError_t err = cuda::decode_attention(
      a.query.data_ptr(), a.key.data_ptr(), a.value.data_ptr(), a.key_valid.data_ptr<bool>(),
      out.data_ptr(), scratch.data_ptr<float>(), cuda_dtype(query), s, num_sms, vectorized,
      current_supports_programmatic_launch(), at::cuda::getCurrentCUDAStream());
  VPIT_CHECK(err == cudaSuccess, "vpit_fast.decode_attention: CUDA error: ",
             cudaGetErrorString(err));
  return out;
}

}  // namespace vpit
