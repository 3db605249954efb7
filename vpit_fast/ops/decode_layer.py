"""Fused decode-step projections of a LLaMA-family decoder layer (LLaMA, Qwen2, Mistral): the
matrix-vector products of one new token per row with their neighbouring elementwise work.

A decode step reads every weight once and does little else, so its time is launches and memory
bandwidth. transformers' layer runs about fifteen kernels per layer per step (norms, three
projections, RoPE, cache writes, MLP halves, residual adds); the CUDA kernels here make it four
plus attention (csrc/cuda/decode_layer.cu)::

    q = decode_qkv_rope(x, ...)          # RMSNorm, q/k/v, RoPE; k and v into the cache slot
    a = decode_attention(q, k_cache, v_cache, key_valid, scale)
    decode_proj_add_(x, a.flatten(1), w_o)   # x += a W_o^T
    m = decode_gate_up(x, ...)           # RMSNorm, silu(gate) * up
    decode_proj_add_(x, m, w_down)       # x += m W_down^T

Rounding follows transformers' modules step by step, so the result differs from the model's own
layer only by the order of fp32 sums. The kernels take up to `MAX_ROWS` rows with 16-byte aligned,
contiguous weights; other arguments run the same computation in ATen ops (also the CPU
implementation). No host sync (a CUDA graph can capture the step); fake implementations let
torch.compile trace them. Inference only: no backward.
"""

import torch

from vpit_fast import _extension
from vpit_fast.ops import reference

__all__ = ["MAX_ROWS", "decode_gate_up", "decode_proj_add_", "decode_qkv_rope"]

MAX_ROWS = 8  # kDecodeLayerMaxRows in csrc/kernels/decode_layer.h

if _extension._C is not None:

    @torch.library.register_fake("vpit_fast::decode_qkv_rope")
    def _(hidden, norm_weight, eps, wq, wk, wv, bq, bk, bv, inv_freq, rope_scale, positions, cursor, key_cache,
          value_cache):
        head_dim = key_cache.shape[-1]
        return hidden.new_empty(hidden.shape[0], wq.shape[0] // head_dim, head_dim)

    @torch.library.register_fake("vpit_fast::decode_gate_up")
    def _(hidden, norm_weight, eps, w_gate, w_up, b_gate, b_up):
        return hidden.new_empty(hidden.shape[0], w_gate.shape[0])

    @torch.library.register_fake("vpit_fast::decode_proj_add_")
    def _(residual, x, weight, bias):
        return None

    def _no_backward(ctx, *grads):
        raise RuntimeError("vpit_fast's decode-layer ops are inference only and have no backward")

    # The other two ops write in place, which register_autograd does not take; autograd's fallback
    # for them raises on backward.
    torch.library.register_autograd("vpit_fast::decode_gate_up", _no_backward)


def _compiled(impl, tensor):
    if impl not in ("auto", "torch"):
        raise ValueError(f'impl must be "auto" or "torch", got {impl!r}')
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"hidden must be a torch.Tensor, got {type(tensor).__name__}")
    if impl == "torch":
        return False
    if tensor.device.type not in ("cpu", "cuda"):
        raise ValueError(f'the compiled op runs on cpu and cuda, got a tensor on {tensor.device}: use impl="torch"')
    _extension.extension()
    return True


def decode_qkv_rope(hidden, norm_weight, eps, wq, wk, wv, bq, bk, bv, inv_freq, rope_scale, positions, cursor,
                    key_cache, value_cache, *, impl="auto"):
    """RMSNorm, q / k / v projections and RoPE of one new token per row; k and v go into the cache.

    Args:
        hidden: ``[R, H]`` float32, bfloat16 or float16, the residual stream (last dim contiguous).
        norm_weight: ``[H]``; eps: the RMSNorm epsilon.
        wq: ``[heads * D, H]``; wk, wv: ``[kv_heads * D, H]``; bq, bk, bv: matching biases or None.
        inv_freq: ``[D / 2]`` float32 RoPE frequencies (transformers' ``rotary_emb.inv_freq``);
            rope_scale: multiplies cos and sin (its ``attention_scaling``).
        positions: ``[R]`` int64 position of each row's token.
        cursor: one-element int64 tensor: the cache slot to write (on the device: no host sync).
        key_cache, value_cache: ``[R, kv_heads, L, D]`` (D even), last dimension contiguous:
            written in place at slot ``cursor`` (k with RoPE, v without).
        impl: ``"auto"`` (compiled op) or ``"torch"`` (the reference; also float64).

    Returns:
        q ``[R, heads, D]`` in hidden's dtype, RoPE applied.
    """
    if _compiled(impl, hidden):
        return torch.ops.vpit_fast.decode_qkv_rope(hidden, norm_weight, float(eps), wq, wk, wv, bq, bk, bv, inv_freq,
                                                   float(rope_scale), positions, cursor, key_cache, value_cache)
    return reference.decode_qkv_rope(hidden, norm_weight, eps, wq, wk, wv, bq, bk, bv, inv_freq, rope_scale,
                                     positions, cursor, key_cache, value_cache)


def decode_gate_up(hidden, norm_weight, eps, w_gate, w_up, b_gate=None, b_up=None, *, impl="auto"):
    """The first half of a LLaMA MLP on the RMSNorm of each row.

    hidden ``[R, H]``; norm_weight ``[H]``; w_gate, w_up ``[I, H]``; b_gate, b_up ``[I]`` or None.
    Returns ``silu(x_n W_gate^T + b_gate) * (x_n W_up^T + b_up)`` ``[R, I]`` in hidden's dtype.
    """
    if _compiled(impl, hidden):
        return torch.ops.vpit_fast.decode_gate_up(hidden, norm_weight, float(eps), w_gate, w_up, b_gate, b_up)
    return reference.decode_gate_up(hidden, norm_weight, eps, w_gate, w_up, b_gate, b_up)


def decode_proj_add_(residual, x, weight, bias=None, *, impl="auto"):
    """``residual += x @ weight.T + bias`` in place (a projection added to the residual stream).

    residual ``[R, N]`` (last dim contiguous); x ``[R, K]`` not overlapping residual; weight
    ``[N, K]``; bias ``[N]`` or None. Returns residual.
    """
    if _compiled(impl, residual):
        torch.ops.vpit_fast.decode_proj_add_(residual, x, weight, bias)
    else:
        residual.copy_(reference.decode_proj_add(residual, x, weight, bias))
    return residual
