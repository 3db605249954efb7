"""Residual add + RMSNorm whose backward is one pass: `add_rms_norm`.

Forward (plain PyTorch, which torch.compile fuses into one kernel), with transformers' LLaMA
semantics (fp32 statistics, the normalised row rounded to the input dtype before the weight)::

    h = x + delta
    y = weight * (h.float() * rsqrt(mean(h.float() ** 2, -1) + eps)).to(h.dtype)

Backward is the op ``vpit_fast::rms_norm_backward`` (csrc/cuda/rms_norm.cu on CUDA): it gets the
gradient of ``y`` and the gradient that reaches ``h`` through the residual stream, and returns
their sum through the norm plus the weight gradient, reading each row once. Compiled apart, the
norm's backward, the residual add and the weight gradient's column sum read the rows again.
"""

import warnings

import torch

from vpit_fast import _extension

__all__ = ["add_rms_norm", "rms_norm_backward"]

_OP = "vpit_fast::rms_norm_backward"

if _extension._C is not None:

    @torch.library.register_fake(_OP)
    def _(grad_out, grad_direct, h, rstd, weight):
        return torch.empty_like(h), torch.empty_like(weight)


def rms_norm_backward(grad_out, grad_direct, h, rstd, weight):
    """Backward of ``y = weight * round(h * rstd)`` plus the residual gradient.

    Args:
        grad_out: ``[..., C]`` gradient of y. grad_direct: the same shape (the gradient that
            reaches h another way), or None. h: ``[..., C]`` the norm's input (float32, bfloat16,
            float16 or float64). rstd: float32, one per row (``[..., 1]``). weight: ``[C]``, h's dtype.

    Returns:
        ``(grad_h, grad_weight)``: ``grad_h`` in h's dtype and shape, ``grad_weight`` ``[C]``.
        Sums in fp32 (as the forward's statistics); deterministic.
    """
    _extension.extension()
    return torch.ops.vpit_fast.rms_norm_backward(grad_out, grad_direct, h, rstd, weight)


def _forward(x, delta, weight, eps):
    h = x + delta
    h32 = h.float()
    rstd = torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return h, weight * (h32 * rstd).to(h.dtype), rstd


_compiled_forward = None


def _forward_fused(x, delta, weight, eps):
    """`_forward` as one kernel on CUDA when called eagerly (the final norm after the compiled
    blocks): eager, it is seven passes with fp32 temporaries. Inside torch.compile it is traced.
    Where torch.compile cannot build it (no Triton, say), eager from then on, with a warning."""
    global _compiled_forward
    if x.device.type != "cuda" or torch.compiler.is_compiling() or _compiled_forward is _forward:
        return _forward(x, delta, weight, eps)
    if _compiled_forward is None:
        _compiled_forward = torch.compile(_forward, dynamic=True)
    try:
        return _compiled_forward(x, delta, weight, eps)
    except Exception as error:  # noqa: BLE001 - an optional speed-up; the eager path computes the same
        warnings.warn(f"add_rms_norm: torch.compile failed ({type(error).__name__}: {error}); running the "
                      "forward eagerly", RuntimeWarning, stacklevel=2)
        _compiled_forward = _forward
        return _forward(x, delta, weight, eps)


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, weight, eps):
        h, y, rstd = _forward_fused(x, delta, weight, eps)
        ctx.save_for_backward(h, rstd, weight)
        return h, y

    @staticmethod
    def backward(ctx, grad_h, grad_y):
        h, rstd, weight = ctx.saved_tensors
        if grad_y is None:
            grad_y = torch.zeros_like(h)
        grad_x, grad_weight = torch.ops.vpit_fast.rms_norm_backward(grad_y, grad_h, h, rstd, weight)
        return grad_x, grad_x, grad_weight if ctx.needs_input_grad[2] else None, None


def add_rms_norm(x, delta, weight, eps):
    """``(h, y)``: the residual sum ``h = x + delta`` and its RMSNorm ``y`` (module docstring).

    x, delta: ``[..., C]`` of one floating dtype; weight: ``[C]``; eps: float. Gradients flow to
    x, delta and weight; the backward is the one-pass op when the extension is built and weight
    has x's dtype (otherwise plain autograd, the same values).
    """
    if x.shape != delta.shape or x.dtype != delta.dtype:
        raise ValueError(f"add_rms_norm: x and delta must match, got {tuple(x.shape)} {x.dtype} and "
                         f"{tuple(delta.shape)} {delta.dtype}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"add_rms_norm: weight must be [{x.shape[-1]}], got {tuple(weight.shape)}")
    if _extension._C is None or weight.dtype != x.dtype or x.device.type not in ("cpu", "cuda"):
        return _forward(x, delta, weight, eps)[:2]
    return _AddRMSNorm.apply(x, delta, weight, eps)
