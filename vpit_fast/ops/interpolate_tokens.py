"""SigLIP token interpolation: channels-last patch tokens to a smaller grid (27x27 -> 8x8 = 64
tokens in MetaMorph), bilinear with align_corners=False, fp32 math, optional fused L2 norm."""

import math

import torch

from vpit_fast import _extension
from vpit_fast.ops import reference

_OP = "vpit_fast::interpolate_tokens"

if _extension._C is not None:

    @torch.library.register_fake(_OP)
    def _(x, in_h, in_w, out_h, out_w, normalize):
        return x.new_empty((x.shape[0], out_h * out_w, x.shape[2]))

    @torch.library.register_fake("vpit_fast::interpolate_tokens_backward")
    def _(grad_out, x, in_h, in_w, out_h, out_w, normalize):
        return x.new_empty((x.shape[0], in_h * in_w, x.shape[2]))

    def _setup_context(ctx, inputs, output):
        x, in_h, in_w, out_h, out_w, normalize = inputs
        ctx.grid = (in_h, in_w, out_h, out_w)
        ctx.normalize = normalize
        # x is needed for its shape, and for its values only when normalising.
        ctx.save_for_backward(x)

    def _backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        grad_x = torch.ops.vpit_fast.interpolate_tokens_backward(
            grad_out.contiguous(), x, *ctx.grid, ctx.normalize
        )
        return grad_x, None, None, None, None, None

    torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)


def _pair(value, name):
    if isinstance(value, int):
        value = (value, value)
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints (h, w), got {value!r}")
    return int(value[0]), int(value[1])


def interpolate_tokens(x, out_size=(8, 8), in_size=None, normalize=False, impl="auto"):
    """Bilinearly resample a grid of channels-last tokens.

    Same result as the official MetaMorph path (view as [B, h, w, C], permute to channels-first,
    ``F.interpolate(..., mode="bilinear", align_corners=False)`` in fp32, cast back, permute back),
    without its copies, and with an optional fused ``F.normalize`` over C (eps 1e-12, in fp32,
    before the cast).

    Args:
        x: ``[B, h*w, C]`` float32, bfloat16 or float16 (float64 with ``impl="torch"``), on CPU or CUDA. Non-contiguous input is
            accepted (made contiguous). ``B`` may be 0.
        out_size: ``(oh, ow)`` or an int for a square grid. Default ``(8, 8)``: 64 tokens.
        in_size: ``(h, w)`` of the input grid; default: the square root of the token count.
        normalize: divide each output token by its L2 norm (``max(||y||, 1e-12)``).
        impl: ``"auto"`` (the compiled CPU/CUDA kernel for x's device) or ``"torch"`` (the
            pure-PyTorch reference).

    Returns:
        ``[B, oh*ow, C]`` tensor of x's dtype and device. Differentiable with respect to x.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must be [batch, tokens, channels], got shape {tuple(x.shape)}")
    allowed = (torch.float32, torch.bfloat16, torch.float16) + ((torch.float64,) if impl == "torch" else ())
    if x.dtype not in allowed:
        raise TypeError(f"x must be float32, bfloat16 or float16 (or float64 with impl=\"torch\"), got {x.dtype}")
    if x.shape[2] == 0:
        raise ValueError(f"x has no channels (shape {tuple(x.shape)})")
    tokens = x.shape[1]
    if in_size is None:
        side = math.isqrt(tokens)
        if side * side != tokens or tokens == 0:
            raise ValueError(
                f"x has {tokens} tokens, which is not a square grid: pass in_size=(h, w)"
            )
        in_size = (side, side)
    in_h, in_w = _pair(in_size, "in_size")
    out_h, out_w = _pair(out_size, "out_size")
    if in_h * in_w != tokens:
        raise ValueError(f"x has {tokens} tokens but in_size ({in_h}, {in_w}) needs {in_h * in_w}")
    if impl == "torch":
        return reference.interpolate_tokens(x, (out_h, out_w), (in_h, in_w), normalize)
    if impl != "auto":
        raise ValueError(f'impl must be "auto" or "torch", got {impl!r}')
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f'x is on {x.device}; the compiled kernels run on cpu and cuda: use impl="torch"')
    _extension.extension()
    return torch.ops.vpit_fast.interpolate_tokens(x, in_h, in_w, out_h, out_w, bool(normalize))
