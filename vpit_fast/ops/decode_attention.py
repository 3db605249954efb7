"""Decode attention: one query token per row and head against a static KV cache (the decode step
of `vpit_fast.generation`), split-K on CUDA.

A decode step at batch 1 has one query per head: attention kernels built for long queries run
it on a handful of thread blocks (PyTorch's SDPA with a mask used 8 blocks for a LLaMA-3.2-1B
layer over a 2176-slot cache on an H100). The CUDA kernel splits the cache into chunks of 128
slots, one block per (chunk, KV head, group of <= 8 query heads that share it, row), and merges
the chunks' partial softmaxes in a second kernel (flash-decoding). Chunks past the filled part of
the cache stop after reading the mask, so a step costs what the filled slots cost. No host sync:
the op can be captured in a CUDA graph; a fake implementation lets torch.compile trace it.
Inference only (no backward).
"""

import math

import torch

from vpit_fast import _extension
from vpit_fast.ops import reference

__all__ = ["MAX_HEAD_DIM", "decode_attention"]

MAX_HEAD_DIM = 256
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

if _extension._C is not None:

    @torch.library.register_fake("vpit_fast::decode_attention")
    def _(query, key, value, key_valid, scale):
        return query.new_empty(query.shape)

    def _no_backward(ctx, *grads):
        raise RuntimeError('vpit_fast.decode_attention is inference only and has no backward; use impl="torch" '
                           "where gradients must flow")

    torch.library.register_autograd("vpit_fast::decode_attention", _no_backward)


def _check(query, key, value, key_valid, scale, impl):
    tensors = dict(query=query, key=key, value=value, key_valid=key_valid)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if query.dim() != 3:
        raise ValueError(f"query must be [batch, heads, head_dim], got shape {tuple(query.shape)}")
    if key.dim() != 4:
        raise ValueError(f"key must be [batch, kv_heads, cache_len, head_dim], got shape {tuple(key.shape)}")
    if value.shape != key.shape:
        raise ValueError(f"value must have key's shape {tuple(key.shape)}, got {tuple(value.shape)}")
    B, H, D = query.shape
    if key.shape[0] != B or key.shape[3] != D:
        raise ValueError(f"key must be [{B}, kv_heads, cache_len, {D}] to match query {tuple(query.shape)}, "
                         f"got {tuple(key.shape)}")
    Hkv, L = key.shape[1], key.shape[2]
    if (Hkv == 0 and H != 0) or (Hkv and H % Hkv):
        raise ValueError(f"query's {H} heads must be a multiple of key's {Hkv} kv_heads")
    if key_valid.dtype != torch.bool or tuple(key_valid.shape) != (B, L):
        raise ValueError(f"key_valid must be a [{B}, {L}] bool tensor, got {key_valid.dtype} "
                         f"{tuple(key_valid.shape)}")
    floats = _FLOAT_DTYPES + ((torch.float64,) if impl == "torch" else ())
    if query.dtype not in floats:
        raise TypeError(f'query must be float32, bfloat16 or float16 (or float64 with impl="torch"), '
                        f"got {query.dtype}")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise TypeError(f"query, key and value must share a dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    for name, t in tensors.items():
        if t.device != query.device:
            raise ValueError(f"{name} is on {t.device} but query is on {query.device}: all tensors must share a "
                             "device")
    if impl != "torch" and D > MAX_HEAD_DIM:
        raise ValueError(f'head_dim must be at most {MAX_HEAD_DIM} for the compiled op, got {D} (use impl="torch")')
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")


def decode_attention(query, key, value, key_valid, scale=None, *, impl="auto"):
    """Attention of one new token per row over a KV cache, with grouped-query heads.

    Args:
        query: ``[B, H, D]`` float32, bfloat16 or float16 (the last dimension contiguous is
            fastest; other layouts are copied).
        key, value: ``[B, Hkv, L, D]`` in query's dtype, ``H`` a multiple of ``Hkv``: query head
            ``h`` reads KV head ``h // (H // Hkv)``. Read in place (any strides with a contiguous
            last dimension), e.g. a transformers ``StaticCache`` layer.
        key_valid: ``[B, L]`` bool, True for the slots to attend to. Other slots are never read.
        scale: multiplies ``q . k``; default ``1 / sqrt(D)``.
        impl: ``"auto"`` (the compiled op on cpu and cuda; D <= 256) or ``"torch"`` (the
            reference, which also takes float64 and carries gradients).

    Returns:
        ``[B, H, D]`` in query's dtype: softmax over the valid slots, fp32 accumulation; zeros
        for a row with no valid slot (where SDPA would return NaN).
    """
    if impl not in ("auto", "torch"):
        raise ValueError(f'impl must be "auto" or "torch", got {impl!r}')
    if scale is None and isinstance(query, torch.Tensor) and query.dim() == 3:
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] else 1.0
    _check(query, key, value, key_valid, scale, impl)
    if impl == "torch":
        return reference.decode_attention(query, key, value, key_valid, scale)
    if query.device.type not in ("cpu", "cuda"):
        raise ValueError(f'query is on {query.device}; the compiled op runs on cpu and cuda: use impl="torch"')
    _extension.extension()
    return torch.ops.vpit_fast.decode_attention(query, key, value, key_valid, float(scale))
