"""Causal attention within short packed segments: our CUDA kernels (csrc/cuda/segment_attention.cu)
as a differentiable op that torch.compile traces as one node.

`vpit_fast.attention` offers it as backend ``"segment"``, its first choice for bf16 packed
batches on CUDA whose segments are all at most `MAX_SEQLEN` tokens with head_dim 64 or 128: on
the H100 at the 1B shape it is 1.9x as fast as FlashAttention-2 per layer, forward + backward
(`benchmarks/RESULTS.md`, session 12). Inputs follow the varlen convention: query
``[N, H, D]``, key/value ``[N, Hkv, D]`` (``H % Hkv == 0``; GQA's K/V gradients are summed over
each group inside the kernel), ``cu_seqlens`` ``[S + 1]`` int32 rising from 0 to N (trusted, as
FlashAttention trusts it: checked on the host by `vpit_fast.attention.packed_attention_kwargs`).
"""

import torch

from vpit_fast import _extension

MAX_SEQLEN = 256  # csrc/cuda/segment_attention.h kSegmentMaxSeqlen
HEAD_DIMS = (64, 128)
_OP = "vpit_fast::segment_attention"


# Read once at import: code that torch.compile traces must not call into the extension module.
_CUDA_BUILT = _extension._C is not None and bool(dict(_extension._C.build_info()).get("cuda"))


def unsupported_reason(device, dtype, head_dim, max_seqlen, dropout=0.0, window=False):
    """None when `segment_attention` can run a call with these properties, else why not (for the
    backend choice in `vpit_fast.attention`; plain values, so torch.compile traces no tensors)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"segment needs a CUDA device, got {device}"
    if not torch.cuda.is_available():
        return "CUDA is not available in this torch"
    if not _CUDA_BUILT:
        return "vpit_fast was built without CUDA kernels"
    return call_unsupported_reason(dtype, head_dim, max_seqlen, dropout, window)


def call_unsupported_reason(dtype, head_dim, max_seqlen, dropout=0.0, window=False):
    """The part of `unsupported_reason` that depends on the call, not the machine. Traced inside
    compiled decoder blocks with a symbolic ``max_seqlen``: the message must not format it (an
    f-string of a symbolic int splits the graph, as each batch whose longest segment passes
    `MAX_SEQLEN` would then do)."""
    if dtype != torch.bfloat16:
        return f"segment needs bfloat16, got {dtype}"
    if head_dim not in HEAD_DIMS:
        return f"segment needs head_dim in {HEAD_DIMS}, got {head_dim}"
    if not 1 <= max_seqlen <= MAX_SEQLEN:
        got = "" if torch.compiler.is_compiling() else f", got max_seqlen {max_seqlen}"
        return f"segment needs every segment at most {MAX_SEQLEN} tokens{got}"
    if dropout > 0:
        return "segment has no attention dropout"
    if window:
        return "segment has no sliding window"
    return None


if _extension._C is not None:
    @torch.library.register_fake(_OP)
    def _(query, key, value, cu_seqlens, max_seqlen, scale):
        return torch.empty_like(query), query.new_empty((query.shape[1], query.shape[0]), dtype=torch.float32)

    @torch.library.register_fake("vpit_fast::segment_attention_backward")
    def _(grad_out, query, key, value, out, lse, cu_seqlens, max_seqlen, scale):
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)

    def _setup_context(ctx, inputs, output):
        query, key, value, cu_seqlens, max_seqlen, scale = inputs
        out, lse = output
        ctx.save_for_backward(query, key, value, out, lse, cu_seqlens)
        ctx.max_seqlen, ctx.scale = max_seqlen, scale

    def _backward(ctx, grad_out, grad_lse):  # lse is an internal output: its gradient is ignored
        query, key, value, out, lse, cu_seqlens = ctx.saved_tensors
        grads = torch.ops.vpit_fast.segment_attention_backward(
            grad_out.contiguous(), query, key, value, out, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
        return (*grads, None, None, None)

    torch.library.register_autograd(_OP, _backward, setup_context=_setup_context)


def segment_attention(query, key, value, cu_seqlens, max_seqlen, scale=None):
    """Causal attention within each segment of a flattened token stream, every segment at most
    `MAX_SEQLEN` tokens. Returns ``[N, H, D]`` bf16; differentiable in query, key and value.
    Raises ValueError when the call is outside what the kernels take (`unsupported_reason`)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor [tokens, heads, head_dim], got "
                             f"{getattr(t, 'shape', type(t))}")
    if not isinstance(max_seqlen, torch.SymInt):  # symbolic under torch.compile: kept symbolic
        max_seqlen = int(max_seqlen)
    if reason := unsupported_reason(query.device, query.dtype, query.shape[-1], max_seqlen):
        raise ValueError(reason)
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype or t.device != query.device:
            raise ValueError(f"{name} must be {query.dtype} on {query.device} like query, got {t.dtype} on {t.device}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D tensor of at least 2 boundaries, got "
                         f"{getattr(cu_seqlens, 'shape', type(cu_seqlens))}")
    if cu_seqlens.device != query.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but query on {query.device}")
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    _extension.extension()
    out, _ = torch.ops.vpit_fast.segment_attention(query, key, value, cu_seqlens.to(torch.int32), max_seqlen, scale)
    return out
