"""One AdamW step on fp32 master weights, written back into low-precision parameters, fused.

The one-GPU training path keeps bf16 parameters (so forward and backward cast no weights) and fp32
masters in the optimizer. Done with torch's ops, a step casts every bf16 gradient into an fp32
buffer, runs fused AdamW on the masters, and copies the masters back into the parameters: 40
bytes moved per parameter. The CUDA kernel (csrc/cuda/master_adamw.cu) reads the bf16 gradient
and the three fp32 states once and writes the states and the bf16 parameter once: 28 bytes, one
launch per 48 tensors, no host sync (CUDA-graph capturable), and no fp32 gradient buffers (4 bytes
per parameter of memory). The CPU implementation (and CUDA's for non-contiguous tensors) runs the
same formula in ATen ops.
"""

import torch

from vpit_fast import _extension

__all__ = ["master_adamw_"]

if _extension._C is not None:

    @torch.library.register_fake("vpit_fast::master_adamw_")
    def _(params, grads, masters, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay):
        return None


def master_adamw_(params, grads, masters, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay):
    """Advances each step count by one, then applies AdamW (decoupled weight decay, bias
    correction: torch's ``AdamW`` formula) to each master and rounds it into its parameter.

    Args:
        params: list of float32 / bfloat16 / float16 tensors, all on one device; written.
        grads: their gradients (same dtype, device and shape each).
        masters, exp_avgs, exp_avg_sqs: float32 contiguous tensors of each param's numel; written.
        steps: one-element float32 tensors on the device, each param's step count; advanced.
        lr, beta1, beta2, eps, weight_decay: floats, shared by every entry.

    Returns None. Bad arguments raise RuntimeError naming the list entry and what was expected.
    """
    lists = dict(params=params, grads=grads, masters=masters, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, steps=steps)
    for name, items in lists.items():
        if not isinstance(items, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in items):
            raise TypeError(f"{name} must be a list of tensors")
    if len({len(items) for items in lists.values()}) != 1:
        raise ValueError("params, grads, masters, exp_avgs, exp_avg_sqs and steps must have one length, got "
                         + ", ".join(str(len(items)) for items in lists.values()))
    if not params:
        return None
    _extension.extension()
    torch.ops.vpit_fast.master_adamw_(list(params), list(grads), list(masters), list(exp_avgs), list(exp_avg_sqs),
                                      list(steps), float(lr), float(beta1), float(beta2), float(eps),
                                      float(weight_decay))
    return None
