"""AdamW for bf16 / fp16 parameters with fp32 master weights (one GPU without FSDP).

The model computes in its low-precision parameters, so forward and backward cast no weights and
produce low-precision gradients; the optimizer keeps an fp32 master copy of every parameter
next to AdamW's moments, updates the masters, then writes them back into the parameters. This is
what FSDP2's mixed precision does per rank, without FSDP's all-gather / reduce-scatter copies that
a single GPU does not need.

Two implementations of the same update (``impl``):

- ``"vpit"``: `vpit_fast.ops.master_adamw.master_adamw_`, one fused pass (CUDA kernel: reads the
  bf16 gradient and the fp32 master and moments once, writes them and the bf16 parameter once).
- ``"torch"``: the gradients cast into fp32 buffers, torch's AdamW on the masters (fused on CUDA,
  foreach on the CPU), the masters copied back: three passes and an fp32 gradient copy.

The masters live in the optimizer state (``state[p]["master"]``), so ``state_dict()`` and
torch.distributed.checkpoint save and restore them: a resumed run continues from the exact fp32
weights, not from their bf16 rounding.
"""

import torch
from torch.optim.adamw import adamw

from vpit_fast import _extension
from vpit_fast.ops.master_adamw import master_adamw_

__all__ = ["MasterWeightAdamW"]

LOW_PRECISION = (torch.bfloat16, torch.float16)
IMPLS = ("auto", "vpit", "torch")


class MasterWeightAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) over low-precision parameters with fp32 masters.

    Args:
        params: parameters or parameter groups (each group may set ``lr``, ``weight_decay``);
            bf16, fp16 or fp32 (each gets an fp32 master), all on one device type.
        lr, betas, eps, weight_decay: as `torch.optim.AdamW`.
        impl: ``"vpit"`` (the fused op), ``"torch"`` (torch's AdamW between casts) or ``"auto"``
            (``"vpit"`` when vpit_fast's kernels are built for the parameters' device, else
            ``"torch"``).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, impl="auto"):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        devices = {p.device.type for g in self.param_groups for p in g["params"]}
        if len(devices) != 1:
            raise ValueError(f"params must all be on one device type, got {sorted(devices)}")
        for group in self.param_groups:
            for p in group["params"]:
                if p.dtype not in LOW_PRECISION + (torch.float32,):
                    raise TypeError(f"params must be bfloat16, float16 or float32, got {p.dtype}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if impl == "auto":
            (device,) = devices
            cuda_built = device == "cuda" and _extension._C is not None and _extension.build_info()["cuda"]
            built = cuda_built or (device == "cpu" and _extension._C is not None)
            impl = "vpit" if built else "torch"
        elif impl == "vpit":
            _extension.extension()  # raises with how to build the kernels
        self.impl = impl
        self.fused = devices == {"cuda"}  # torch's fused AdamW on CUDA, its foreach one on the CPU ("torch")
        self.implementation = ("vpit_fast.MasterWeightAdamW(fp32 masters, fused vpit_fast kernel)" if impl == "vpit" else
                               f"vpit_fast.MasterWeightAdamW(fp32 masters, torch {'fused' if self.fused else 'foreach'} "
                               "AdamW)")
        self._grad32 = {}  # impl "torch": fp32 gradient buffers, reused every step; not state (never saved)

    def load_state_dict(self, state_dict):
        # torch's loader casts every floating-point state to its parameter's dtype, which would
        # round the masters and moments to bf16: put the saved fp32 values back afterwards.
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for key, value in saved.get(i, {}).items():
                if torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)

    def _state(self, p):
        state = self.state[p]
        if not state:
            # contiguous whatever p's strides: the fused op reads masters as flat arrays
            master = torch.empty(p.shape, dtype=torch.float32, device=p.device).copy_(p.detach())
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["master"] = master
            state["exp_avg"] = torch.zeros_like(master)
            state["exp_avg_sq"] = torch.zeros_like(master)
        return state

    def _fp32_grads(self, params):
        grads = []
        for p in params:
            buffer = self._grad32.get(p)
            if buffer is None or buffer.shape != p.shape:
                buffer = self._grad32[p] = torch.empty(p.shape, dtype=torch.float32, device=p.device)
            grads.append(buffer)
        torch._foreach_copy_(grads, [p.grad for p in params])
        return grads

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._state(p) for p in params]
            masters = [s["master"] for s in states]
            beta1, beta2 = group["betas"]
            if self.impl == "vpit":
                master_adamw_(params, [p.grad for p in params], masters, [s["exp_avg"] for s in states],
                              [s["exp_avg_sq"] for s in states], [s["step"] for s in states], lr=group["lr"],
                              beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
                continue
            adamw(
                masters, self._fp32_grads(params), [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                [], [s["step"] for s in states], foreach=not self.fused, fused=self.fused or None, amsgrad=False,
                beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
                maximize=False)
            torch._foreach_copy_(params, masters)
        return loss

    def master_of(self, p):
        """The fp32 master of parameter ``p`` (None before its first step or when not optimised)."""
        state = self.state.get(p)
        return state.get("master") if state else None
