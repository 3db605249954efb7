#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

#include "../cuda/master_adamw.h"
#include "checks.h"
#include "cuda_device.h"
#include "cuda_dtype.h"
#include "master_adamw.h"

namespace vpit {

void master_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList masters,
                       at::TensorList exp_avgs, at::TensorList exp_avg_sqs, at::TensorList steps, double lr,
                       double beta1, double beta2, double eps, double weight_decay) {
  check_master_adamw_args(params, grads, masters, exp_avgs, exp_avg_sqs, steps);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  at::_foreach_add_(steps, 1);
  // The kernel takes contiguous parameters and gradients, one dtype per launch.
  std::vector<cuda::MasterAdamWTensor> by_dtype[3];
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (!p.is_contiguous() || !grads[i].is_contiguous()) {
      master_adamw_aten(p, grads[i], masters[i], exp_avgs[i], exp_avg_sqs[i], steps[i], lr, beta1, beta2, eps,
                        weight_decay);
      continue;
    }
    by_dtype[static_cast<int>(cuda_dtype(p))].push_back(
        {p.data_ptr(), grads[i].data_ptr(), masters[i].data_ptr<float>(), exp_avgs[i].data_ptr<float>(),
         exp_avg_sqs[i].data_ptr<float>(), steps[i].data_ptr<float>(), p.numel()});
  }
  const cuda::AdamWHyper hyper{float(lr), float(beta1), float(beta2), float(eps), float(weight_decay)};
  for (int d = 0; d < 3; ++d) {
    if (by_dtype[d].empty()) continue;
    const cudaError_t err = cuda::master_adamw_step(by_dtype[d].data(), int64_t(by_dtype[d].size()),
                                                    static_cast<cuda::DType>(d), hyper, current_num_sms(),
                                                    at::cuda::getCurrentCUDAStream());
    VPIT_CHECK(err == cudaSuccess, "vpit_fast.master_adamw_: CUDA error: ", cudaGetErrorString(err));
  }
}

}  // namespace vpit
