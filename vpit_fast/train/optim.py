"""AdamW with decoupled weight decay only where it belongs, the fastest available implementation,
and a warm-up-then-decay learning-rate schedule.

Implementation choice (`build_optimizer`, ``fused="auto"``): apex ``FusedAdam(adam_w_mode=True)``
when the real NVIDIA apex with its CUDA extension is importable, every parameter is on a GPU and
none is an FSDP2 DTensor (apex's multi-tensor kernels read raw storage, which a DTensor wrapper
does not have); else ``torch.optim.AdamW(fused=True)`` when every parameter is on a GPU (it accepts
DTensors); else ``torch.optim.AdamW(foreach=True)``. The registry package named ``apex`` is an
unrelated web toolkit: it is detected as absent because it has no ``apex.optimizers.FusedAdam``.
Plain (not FSDP-sharded) bf16 / fp16 parameters, the one-GPU path, always get
`vpit_fast.train.master_adamw.MasterWeightAdamW`: AdamW on fp32 master weights.
"""

import importlib
import importlib.util
import math

import torch

from vpit_fast.train.master_adamw import LOW_PRECISION, MasterWeightAdamW

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = ()

OPTIMIZER_IMPLS = ("auto", "apex", "torch", "foreach")
DECAYS = ("cosine", "linear", "constant")


def apex_fused_adam():
    """apex's ``FusedAdam`` class when NVIDIA apex and its compiled CUDA extension (``amp_C``) are
    importable, else None. Never imports the unrelated registry package beyond its top level."""
    if importlib.util.find_spec("apex") is None or importlib.util.find_spec("amp_C") is None:
        return None
    try:
        return importlib.import_module("apex.optimizers").FusedAdam
    except (ImportError, AttributeError):
        return None


def no_decay_parameter_names(model, exclude_embeddings=False):
    """Names (as in ``model.named_parameters()``) of the trainable parameters that take no weight
    decay: biases and every other 1-D parameter, all parameters of modules whose class name
    contains "Norm" (LayerNorm, RMSNorm, LlamaRMSNorm, ... and their FSDP wrappers), and with
    ``exclude_embeddings`` those of ``nn.Embedding`` modules. A parameter shared by several modules
    (tied weights) takes no decay when any owner says so."""
    no_decay_ids = set()
    for _, module in model.named_modules(remove_duplicate=False):
        is_norm = "Norm" in type(module).__name__
        is_embedding = exclude_embeddings and isinstance(module, torch.nn.Embedding)
        for param in module.parameters(recurse=False):
            if param.ndim <= 1 or is_norm or is_embedding:
                no_decay_ids.add(id(param))
    return {name for name, p in model.named_parameters() if p.requires_grad and id(p) in no_decay_ids}


def param_groups(model, weight_decay, exclude_embeddings=False):
    """Optimizer parameter groups for the trainable parameters of ``model``:
    ``[{"params": [...], "weight_decay": weight_decay}, {"params": [...], "weight_decay": 0.0}]``,
    decayed group first, an empty group left out. Frozen parameters are not included. See
    `no_decay_parameter_names` for which parameters are not decayed."""
    if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
    skip = no_decay_parameter_names(model, exclude_embeddings)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused="auto",
                    exclude_embeddings=False):
    """AdamW over ``param_groups(model, weight_decay, exclude_embeddings)``.

    fused: "auto" (see the module docstring), "apex" (apex FusedAdam; ImportError when missing,
        ValueError for CPU or DTensor parameters), "torch" (``AdamW(fused=True)``, any device) or
        "foreach" (``AdamW(foreach=True)``).
    Plain bf16 / fp16 parameters get `MasterWeightAdamW` whatever ``fused`` says (its ``"auto"``
    implementation, or torch's AdamW between casts with ``fused="foreach"``).
    Returns the optimizer with an ``implementation`` attribute: "apex.FusedAdam",
    "torch.AdamW(fused)", "torch.AdamW(foreach)" or "vpit_fast.MasterWeightAdamW(...)".
    """
    if fused not in OPTIMIZER_IMPLS:
        raise ValueError(f"fused must be one of {OPTIMIZER_IMPLS}, got {fused!r}")
    if not (isinstance(lr, (int, float)) and lr >= 0):
        raise ValueError(f"lr must be a non-negative number, got {lr!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    groups = param_groups(model, weight_decay, exclude_embeddings)
    params = [p for g in groups for p in g["params"]]
    if not params:
        raise ValueError("model has no trainable parameters (every parameter has requires_grad=False)")
    all_cuda = all(p.device.type == "cuda" for p in params)
    any_dtensor = any(isinstance(p, DTensor) for p in params) if DTensor else False
    fused_adam = apex_fused_adam()
    kwargs = dict(lr=lr, betas=tuple(betas), eps=eps)
    if any(p.dtype in LOW_PRECISION for p in params) and not any_dtensor:
        # Updating bf16 weights in place would lose every step smaller than their rounding.
        return MasterWeightAdamW(groups, impl="torch" if fused == "foreach" else "auto", **kwargs)

    if fused == "auto":
        fused = "apex" if fused_adam and all_cuda and not any_dtensor else "torch" if all_cuda else "foreach"
    if fused == "apex":
        if fused_adam is None:
            raise ImportError("fused='apex' needs NVIDIA apex built with its CUDA extensions "
                              "(apex.optimizers.FusedAdam and amp_C importable)")
        if not all_cuda or any_dtensor:
            raise ValueError("fused='apex' needs plain CUDA parameters (no CPU, no FSDP2 DTensor); "
                             "use fused='torch' instead")
        optimizer = fused_adam(groups, adam_w_mode=True, **kwargs)
        optimizer.implementation = "apex.FusedAdam"
    elif fused == "torch":
        optimizer = torch.optim.AdamW(groups, fused=True, **kwargs)
        optimizer.implementation = "torch.AdamW(fused)"
    else:
        optimizer = torch.optim.AdamW(groups, foreach=True, **kwargs)
        optimizer.implementation = "torch.AdamW(foreach)"
    return optimizer


class WarmupDecay:
    """The learning-rate multiplier at scheduler step ``s`` (0-based; step s sets the lr of the
    (s+1)-th optimizer step):

    - warm-up, ``s < warmup_steps``: ``(s + 1) / warmup_steps`` (never 0, full at the last one);
    - then with ``p = (s - warmup_steps) / (total_steps - warmup_steps)`` clamped to [0, 1]:
      cosine ``m + (1 - m) * (1 + cos(pi p)) / 2``, linear ``m + (1 - m) * (1 - p)``, constant 1,
      where ``m = min_lr_ratio``; past ``total_steps`` it stays at ``m`` (1 for constant).

    A callable object rather than a closure so that ``LambdaLR.state_dict()`` carries the schedule's
    parameters (and a pickled scheduler works).
    """

    def __init__(self, warmup_steps, total_steps, decay="cosine", min_lr_ratio=0.0):
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
        if not isinstance(total_steps, int) or total_steps < max(warmup_steps, 1):
            raise ValueError(f"total_steps must be an int >= max(warmup_steps, 1) = {max(warmup_steps, 1)}, "
                             f"got {total_steps!r}")
        if decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
        if not (0.0 <= min_lr_ratio <= 1.0):
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.decay = decay
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step):
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)))
        m = self.min_lr_ratio
        if self.decay == "cosine":
            return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return m + (1.0 - m) * (1.0 - progress)


def build_scheduler(optimizer, warmup_steps, total_steps, decay="cosine", min_lr_ratio=0.0):
    """``LambdaLR`` applying `WarmupDecay` to every group's initial lr; call ``scheduler.step()``
    after each ``optimizer.step()``. Its ``state_dict()`` is plain numbers and strings (JSON-safe)
    and ``load_state_dict`` restores both the position and the schedule."""
    schedule = WarmupDecay(warmup_steps, total_steps, decay, min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)
