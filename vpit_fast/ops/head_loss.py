"""The fused response-only heads and loss of VPiT: cross-entropy through the LM head on text rows
plus cosine loss through the vision head on visual rows, with every gradient computed in the
forward pass (chunked, never materialising all logits) so backward only scales."""

import torch
from torch import nn

from vpit_fast import _extension
from vpit_fast.ops import reference
from vpit_fast.ops.types import HeadLoss

_OP = "vpit_fast::head_loss"
DEFAULT_MAX_CHUNK_BYTES = 512 << 20
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

if _extension._C is not None:

    @torch.library.register_fake(_OP)
    def _(hidden, lm_weight, labels, visual_rows, visual_targets, vision_params, text_weight,
          visual_weight, ignore_index, sum_reduction, max_chunk_bytes, need_grads, text_count=-1):
        losses = hidden.new_empty((3,), dtype=torch.float32)
        counts = hidden.new_empty((2,), dtype=torch.int64)
        if not need_grads:
            return losses, counts, hidden.new_empty((0,)), hidden.new_empty((0,)), []
        return (losses, counts, torch.empty_like(hidden), torch.empty_like(lm_weight),
                [torch.empty_like(p, dtype=torch.float32) for p in vision_params])

    @torch.library.register_fake("vpit_fast::scale_")
    def _(t, factor):
        return None

    def _setup_context(ctx, inputs, output):
        _, _, grad_hidden, grad_lm, grad_vision = output
        ctx.vision_dtypes = [p.dtype for p in inputs[5]]
        # A plain attribute that backward empties, so a second backward is refused (the saved
        # gradients are scaled in place).
        ctx.grads = [grad_hidden, grad_lm, *grad_vision]

    def _backward(ctx, grad_losses, grad_counts, *unused):
        if ctx.grads is None:
            raise RuntimeError(_TWICE)
        grads, ctx.grads = ctx.grads, None
        # one gradient per argument of the call: a text_count left at its default may not be one
        num_args = len(ctx.needs_input_grad)
        if grads[0].numel() == 0 and grads[1].numel() == 0:
            return (None,) * num_args
        grad_hidden, grad_lm, grad_vision = _scaled_gradients(grad_losses, grads, ctx.vision_dtypes)
        return (grad_hidden, grad_lm, None, None, None, grad_vision) + (None,) * (num_args - 6)

    torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)


class _CastHead:
    """A vision head given as its parameter list (in `vision_head_params` order), cast to
    ``dtype`` with autograd back to the originals."""

    def __init__(self, params, dtype):
        self.params = [p.to(dtype) for p in params]

    def __call__(self, x):  # the forward of the head these parameters came from (for impl="torch")
        p = self.params
        x = nn.functional.linear(x, p[0], p[1])
        return x if len(p) == 2 else nn.functional.linear(nn.functional.gelu(x), p[2], p[3])


# Eager calls that need gradients go through an autograd.Function around the op (called with
# autograd below it switched off): on torch 2.11, gradients returned by the op's registered
# autograd were copied by AccumulateGrad (1 GiB for the LLaMA-3-8B LM head) instead of adopted.
# torch.compile traces the op with its registered autograd.


_TWICE = ("vpit_fast.head_loss: backward through the same loss twice is not supported (its gradients "
          "were computed once, in forward)")


def _scaled_gradients(grad_losses, grads, vision_dtypes):
    """The op's gradients ``[hidden, lm_weight, *vision]`` times the incoming gradient of the total
    loss (losses[0]; the parts are diagnostics). hidden and lm_weight are scaled in place, skipped
    on the device when the factor is 1 (``loss.backward()``); the fp32 vision gradients are cast to
    their parameters' dtypes. Returns (hidden, lm_weight, [vision...])."""
    grad_hidden, grad_lm, *grad_vision = grads
    scale = grad_losses[0].float().reshape(1)
    torch.ops.vpit_fast.scale_(grad_hidden, scale)
    torch.ops.vpit_fast.scale_(grad_lm, scale)
    return grad_hidden, grad_lm, [(g * scale).to(dtype) for g, dtype in zip(grad_vision, vision_dtypes)]


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, args, hidden, lm_weight, *vision_params):
        # forward runs without grad mode, so the op's registered autograd stays out of the way
        losses, counts, grad_hidden, grad_lm, grad_vision = torch.ops.vpit_fast.head_loss(*args)
        ctx.vision_dtypes = [p.dtype for p in vision_params]
        ctx.save_for_backward(grad_hidden, grad_lm, *grad_vision)
        ctx.mark_non_differentiable(counts)
        return losses, counts

    @staticmethod
    def backward(ctx, grad_losses, grad_counts):
        if getattr(ctx, "used", False):
            raise RuntimeError(_TWICE)
        ctx.used = True
        grad_hidden, grad_lm, grad_vision = _scaled_gradients(grad_losses, ctx.saved_tensors, ctx.vision_dtypes)
        return (None, grad_hidden, grad_lm, *grad_vision)


def _run_eager(args):
    """(losses, counts) of the op, with gradients through `_FusedHeadLoss` when they are needed."""
    hidden, lm_weight, params, need_grads = args[0], args[1], args[5], args[11]
    if not need_grads:
        losses, counts, *_ = torch.ops.vpit_fast.head_loss(*args)
        return losses, counts
    return _FusedHeadLoss.apply(args, hidden, lm_weight, *params)


def vision_head_params(vision_head):
    """The parameters of a vision head in the op's order: [weight, bias] for ``nn.Linear``,
    [w1, b1, w2, b2] for ``nn.Sequential(nn.Linear, nn.GELU(), nn.Linear)``. A missing bias
    becomes a zero tensor (its gradient is dropped)."""

    def linear(layer):
        bias = layer.bias if layer.bias is not None else layer.weight.new_zeros(layer.out_features)
        return [layer.weight, bias]

    if isinstance(vision_head, _CastHead):
        return vision_head.params
    if isinstance(vision_head, nn.Linear):
        return linear(vision_head)
    if (isinstance(vision_head, nn.Sequential) and len(vision_head) == 3
            and isinstance(vision_head[0], nn.Linear) and isinstance(vision_head[2], nn.Linear)
            and isinstance(vision_head[1], nn.GELU) and vision_head[1].approximate == "none"):
        return linear(vision_head[0]) + linear(vision_head[2])
    raise ValueError(
        "vision_head must be nn.Linear(H, Dv) or nn.Sequential(nn.Linear(H, H2), nn.GELU(), "
        f"nn.Linear(H2, Dv)), got {type(vision_head).__name__}")


def _check(hidden, lm_weight, labels, visual_rows, visual_targets, vision_head, reduction, impl):
    if reduction not in ("mean", "sum"):
        raise ValueError(f'reduction must be "mean" or "sum", got {reduction!r}')
    if impl not in ("auto", "torch"):
        raise ValueError(f'impl must be "auto" or "torch", got {impl!r}')
    for name, t in (("hidden", hidden), ("lm_weight", lm_weight), ("labels", labels),
                    ("visual_rows", visual_rows), ("visual_targets", visual_targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [rows, hidden_size], got shape {tuple(hidden.shape)}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    n, h = hidden.shape
    params = vision_head_params(vision_head)
    checks = [("lm_weight", lm_weight), ("visual_targets", visual_targets)]
    checks += [("vision_head", p) for p in params]
    for name, t in checks:
        if t.dtype != hidden.dtype:
            raise TypeError(f"{name} is {t.dtype} but hidden is {hidden.dtype}")
    for name, t in checks + [("labels", labels), ("visual_rows", visual_rows)]:
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if lm_weight.dim() != 2 or lm_weight.shape[1] != h or lm_weight.shape[0] == 0:
        raise ValueError(f"lm_weight must be [vocab, {h}], got shape {tuple(lm_weight.shape)}")
    if labels.dim() != 1 or labels.shape[0] != n or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 [{n}], got {labels.dtype} of shape {tuple(labels.shape)}")
    if visual_rows.dim() != 1 or visual_rows.dtype != torch.int64:
        raise ValueError(f"visual_rows must be 1-D int64, got {visual_rows.dtype} of shape "
                         f"{tuple(visual_rows.shape)}")
    if params[0].shape[1] != h:
        raise ValueError(f"vision_head takes {params[0].shape[1]} features but hidden has {h}")
    dv = params[-1].shape[0]
    if visual_targets.dim() != 2 or visual_targets.shape[1] != dv:
        raise ValueError(f"visual_targets must be [visual rows, {dv}], got shape {tuple(visual_targets.shape)}")
    if visual_targets.shape[0] != visual_rows.shape[0]:
        raise ValueError(f"visual_targets has {visual_targets.shape[0]} rows but visual_rows lists "
                         f"{visual_rows.shape[0]}")
    return params


def check_indices(labels, visual_rows, n, vocab, ignore_index):
    """The data-dependent checks of `head_loss` (ValueError naming what is wrong): for impl="torch",
    and for callers that check on the host before passing ``text_count`` (the compiled op makes
    them itself otherwise)."""
    is_text = labels != ignore_index
    if bool((is_text & ((labels < 0) | (labels >= vocab))).any()):
        raise ValueError(f"labels holds values outside [0, {vocab}) that are not ignore_index ({ignore_index})")
    if visual_rows.numel():
        if bool(((visual_rows < 0) | (visual_rows >= n)).any()):
            raise ValueError(f"visual_rows holds indices outside [0, {n})")
        if visual_rows.unique().numel() != visual_rows.numel():
            raise ValueError("visual_rows lists a row more than once")
        if bool(is_text[visual_rows].any()):
            raise ValueError("a row is both in visual_rows and has a text target in labels; a row has "
                             "at most one target (set its label to ignore_index)")


def head_loss(hidden, lm_weight, labels, visual_rows, visual_targets, vision_head, *,
              text_weight=1.0, visual_weight=1.0, ignore_index=-100, reduction="mean",
              impl="auto", max_chunk_bytes=None, text_count=None):
    """Response-only VPiT loss: LM head + cross-entropy on text rows, vision head + cosine on
    visual rows, fused so that prompt rows cost nothing and the logits never exist for all rows.

    Args:
        hidden: ``[N, H]`` final hidden states, already aligned with their targets (row i
            predicts the target of row i: the caller shifts). fp32, bf16 or fp16.
        lm_weight: ``[V, H]`` LM-head weight, hidden's dtype.
        labels: ``[N]`` int64: row i's text target in [0, V), or ``ignore_index``.
        visual_rows: ``[Nv]`` int64: the rows whose target is a visual token (distinct, none with
            a text label).
        visual_targets: ``[Nv, Dv]`` target visual tokens, in visual_rows' order, hidden's dtype.
        vision_head: ``nn.Linear(H, Dv)`` or ``nn.Sequential(nn.Linear(H, H2), nn.GELU(),
            nn.Linear(H2, Dv))``; None for text only (visual_rows must then be empty and
            visual_targets ``[0, anything]``).
        text_weight, visual_weight: loss = text_weight * text + visual_weight * visual.
        reduction: ``"mean"`` (each part averaged over its rows) or ``"sum"`` (for normalising
            by global token counts across ranks and micro-batches).
        impl: ``"auto"`` (compiled CPU/CUDA op) or ``"torch"`` (the plain-PyTorch reference).
        max_chunk_bytes: bound on what one chunk of text rows holds: its logits, hidden rows and
            hidden-gradient rows (default 512 MiB).
        text_count: the number of rows with a text target, when the caller counted it on the host
            and has already checked ``labels`` and ``visual_rows`` there (as
            `VPiTModel.batch_inputs` does): the op then skips its index checks and the one
            device-to-host read they cost (a GPU stall per call). A wrong count gives a wrong
            loss. None: checked and counted by the op.

    Returns:
        `HeadLoss(loss, text_loss, visual_loss, text_count, visual_count)`: float32 scalars and
        int64 counts on hidden's device. Only ``loss`` carries gradients (to hidden, lm_weight and
        the vision head). An empty modality contributes exactly 0 and zero gradients.

    Under ``torch.autocast`` the float operands are cast to the autocast dtype first, as
    ``nn.Linear`` would be.
    """
    if isinstance(hidden, torch.Tensor) and torch.is_autocast_enabled(hidden.device.type):
        # Like nn.Linear under autocast: the operands in the autocast dtype, then the op as is.
        dtype = torch.get_autocast_dtype(hidden.device.type)
        if vision_head is not None:
            vision_head = _CastHead(vision_head_params(vision_head), dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            return head_loss(hidden.to(dtype), lm_weight.to(dtype), labels, visual_rows, visual_targets.to(dtype),
                             vision_head, text_weight=text_weight, visual_weight=visual_weight,
                             ignore_index=ignore_index, reduction=reduction, impl=impl,
                             max_chunk_bytes=max_chunk_bytes, text_count=text_count)
    if vision_head is None:  # text only: a frozen one-feature head that no row uses
        if isinstance(visual_rows, torch.Tensor) and visual_rows.numel():
            raise ValueError("vision_head is None but visual_rows is not empty")
        if isinstance(hidden, torch.Tensor) and hidden.dim() == 2:
            vision_head = _CastHead([hidden.new_zeros(1, hidden.shape[1]), hidden.new_zeros(1)], hidden.dtype)
            if isinstance(visual_targets, torch.Tensor) and visual_targets.numel() == 0:
                visual_targets = hidden.new_zeros(0, 1)
    params = _check(hidden, lm_weight, labels, visual_rows, visual_targets, vision_head, reduction, impl)
    if impl == "torch":
        check_indices(labels, visual_rows, hidden.shape[0], lm_weight.shape[0], ignore_index)
        return reference.head_loss(hidden, lm_weight, labels, visual_rows, visual_targets, vision_head,
                                   text_weight, visual_weight, ignore_index, reduction)
    if hidden.device.type not in ("cpu", "cuda"):
        raise ValueError(f'hidden is on {hidden.device}; the compiled op runs on cpu and cuda: use impl="torch"')
    _extension.extension()
    tensors = [hidden, lm_weight, *params]
    need_grads = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    chunk = DEFAULT_MAX_CHUNK_BYTES if max_chunk_bytes is None else int(max_chunk_bytes)
    if chunk <= 0:
        raise ValueError(f"max_chunk_bytes must be positive, got {max_chunk_bytes}")
    if text_count is not None and (isinstance(text_count, bool) or not isinstance(text_count, int)
                                   or not 0 <= text_count <= hidden.shape[0]):
        raise ValueError(f"text_count must be None or an int in [0, {hidden.shape[0]}] (rows with a text "
                         f"target), got {text_count!r}")
    args = (hidden, lm_weight, labels, visual_rows, visual_targets, params, float(text_weight),
            float(visual_weight), int(ignore_index), reduction == "sum", chunk, need_grads,
            -1 if text_count is None else text_count)
    if torch.compiler.is_compiling():
        losses, counts, *_ = torch.ops.vpit_fast.head_loss(*args)
    else:
        try:
            losses, counts = _run_eager(args)
        except RuntimeError as error:  # the op's own index checks: bad values, not a failure
            message = str(error).split("\n")[0]
            if message.startswith("vpit_fast.head_loss: "):
                raise ValueError(message[len("vpit_fast.head_loss: "):]) from None
            raise
    # Separate tensors, not views of `losses`: FSDP2 warns that an in-place op on a returned view
    # would skip its pre-backward hook.
    total, text, visual = (t.clone() for t in losses.unbind())
    return HeadLoss(total, text.detach(), visual.detach(), counts[0].clone(), counts[1].clone())
