"""Varlen (packed-batch) causal attention, registered in transformers' attention interface.

A packed batch (`vpit_fast.data.packing.collate_packed`) holds several samples per row; attention
must stay causal within each sample and never cross a boundary. The boundaries travel as
``cu_seqlens`` over the flattened ``B * T`` tokens, under the kwarg names transformers' own
flash-attention path uses (``cu_seq_lens_q``, ``cu_seq_lens_k``, ``max_length_q``,
``max_length_k``; `packed_attention_kwargs` builds them).

Backends, first usable wins (`backend_name` says which one a device gets):

- ``segment``: our CUDA kernels for short segments (`vpit_fast.ops.segment_attention`): bf16,
  head_dim 64 or 128, every segment at most 256 tokens (``max_seqlen``), no dropout or window.
  First because MetaMorph-like samples are that short: on the H100 at the 1B shape it takes
  1.14 ms per layer forward + backward against FlashAttention-2's 2.14 ms
  (`benchmarks/RESULTS.md`, session 12). Longer segments, fp16, other head sizes, dropout and
  windows go to the backends below.
- ``flash_attn``: ``flash_attn.flash_attn_varlen_func``, when the package imports (CUDA, fp16/bf16).
- ``torch_varlen``: PyTorch's built-in FlashAttention, ``torch.nn.attention.varlen.varlen_attn``
  (CUDA, fp16/bf16). It has no dropout, so training with attention dropout skips it; its optional
  arguments (scale, window, GQA) are used when this torch has them, emulated otherwise (GQA
  without ``enable_gqa``: ATen's FlashAttention ops called directly, which read grouped K/V).
- ``sdpa_per_segment``: exact fallback for CPU and everything above cannot take: one causal SDPA
  call per segment. Chosen over one block-diagonal masked SDPA call because it never builds a
  ``[T, T]`` mask nor computes the masked-out blocks; its cost is a Python loop over segments and
  one host read of ``cu_seqlens``.

Register once with `register_varlen_attention`, then load models with
``from_pretrained(..., attn_implementation=ATTN_IMPLEMENTATION)`` or switch with
``model.set_attn_implementation(ATTN_IMPLEMENTATION)``. Without ``cu_seqlens`` the same model
runs unpacked or padded batches like transformers' ``"sdpa"``.
"""

import importlib
import inspect

import torch
import torch.nn.functional as F

from vpit_fast.ops.segment_attention import unsupported_reason as segment_unsupported_reason

ATTN_IMPLEMENTATION = "vpit_varlen"
BACKENDS = ("segment", "flash_attn", "torch_varlen", "sdpa_per_segment")
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- backend discovery

_PROBED = None  # (flash_attn_varlen_func or None, torch's varlen_attn or None, its parameter names)


def _probe_backends():
    """The importable varlen kernels, looked up once. The lookup (imports, ``inspect``) runs
    eagerly: `register_varlen_attention` does it when a model is built, so code that torch.compile
    traces only reads the result (an import inside a compiled decoder block would split its graph
    at every attention call)."""
    global _PROBED
    if _PROBED is None:
        try:
            flash = importlib.import_module("flash_attn").flash_attn_varlen_func
        except Exception:  # ImportError, or an ABI mismatch surfacing as OSError/RuntimeError
            flash = None
        try:
            fn = getattr(importlib.import_module("torch.nn.attention.varlen"), "varlen_attn", None)
        except ImportError:
            fn = None
        _PROBED = (flash, fn, tuple(inspect.signature(fn).parameters) if fn is not None else ())
    return _PROBED


def _flash_attn_varlen_func():
    """flash_attn.flash_attn_varlen_func, or None when the package is absent or fails to load."""
    return _probe_backends()[0]


def _torch_varlen_attn():
    """(varlen_attn, names of its parameters), or (None, ()) when this torch has none."""
    return _probe_backends()[1:]


def _backend_usable(backend, device, dtype, dropout, needs_window, head_dim=None, max_seqlen=None):
    """None when ``backend`` can run this call, else the reason it cannot. ``segment`` also needs
    the call's head_dim and max_seqlen (without them it is never chosen)."""
    if backend == "sdpa_per_segment":
        return None
    if backend == "segment":
        if head_dim is None or max_seqlen is None:
            return "segment needs the call's head_dim and max_seqlen"
        return segment_unsupported_reason(device, dtype, head_dim, max_seqlen, dropout, needs_window)
    if device.type != "cuda":
        return f"{backend} needs a CUDA device, got {device}"
    if not torch.cuda.is_available():
        return "CUDA is not available in this torch"
    if dtype not in _FLASH_DTYPES:
        return f"{backend} needs float16 or bfloat16, got {dtype}"
    if backend == "flash_attn":
        return None if _flash_attn_varlen_func() is not None else "flash_attn is not importable"
    fn, params = _torch_varlen_attn()
    if fn is None:
        return "this torch has no torch.nn.attention.varlen.varlen_attn"
    if dropout > 0:
        return "torch varlen_attn has no dropout"
    if needs_window and "window_size" not in params:
        return "this torch's varlen_attn has no window_size (sliding window)"
    return None


def _choose_backend(device, dtype, dropout, needs_window, head_dim=None, max_seqlen=None):
    for backend in BACKENDS:
        if _backend_usable(backend, device, dtype, dropout, needs_window, head_dim, max_seqlen) is None:
            return backend
    raise AssertionError("sdpa_per_segment is always usable")


def backend_name(device, dtype=torch.bfloat16, dropout=0.0, head_dim=None, max_seqlen=None):
    """The backend `varlen_attention` picks for causal attention on ``device`` with inputs of
    ``dtype`` and this attention ``dropout`` (no active sliding window): one of `BACKENDS`.
    ``segment`` is considered only when ``head_dim`` and ``max_seqlen`` are given."""
    return _choose_backend(torch.device(device), dtype, dropout, False, head_dim, max_seqlen)


def available_backends(device, dtype=torch.bfloat16, head_dim=None, max_seqlen=None):
    """Every backend of `BACKENDS` that can run causal attention without dropout on ``device``
    (``segment`` only when ``head_dim`` and ``max_seqlen`` are given)."""
    device = torch.device(device)
    return [b for b in BACKENDS if _backend_usable(b, device, dtype, 0.0, False, head_dim, max_seqlen) is None]


# --------------------------------------------------------------------------- FlashAttention and per-segment SDPA

def _window_active(sliding_window, max_seqlen):
    """transformers' sliding window (each query sees itself and the ``sliding_window - 1`` keys
    before it) only changes anything for segments longer than the window."""
    return sliding_window is not None and max_seqlen > sliding_window


def _run_flash_attn(q, k, v, cu, max_seqlen, scale, dropout, sliding_window):
    window = (sliding_window - 1, 0) if _window_active(sliding_window, max_seqlen) else (-1, -1)
    out = _flash_attn_varlen_func()(
        q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=dropout, softmax_scale=scale,
        causal=True, window_size=window)  # GQA is native
    return out[0] if isinstance(out, tuple) else out


# ATen's FlashAttention ops as `_GroupedFlashVarlen` calls them (with a left window size)
_ATEN_FLASH_HAS_WINDOW = "window_size_left" in {
    a.name for a in torch.ops.aten._flash_attention_forward.default._schema.arguments}


class _GroupedFlashVarlen(torch.autograd.Function):
    """Causal varlen attention through ATen's FlashAttention-2 ops with ``Hkv < H`` heads of K/V
    (the kernels map query head h to K/V head ``h // (H // Hkv)``, as `_repeat_kv_heads` does, and
    sum the group's K/V gradients themselves). No dropout."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_seqlen, scale, window_left):
        out, lse, rng_state, unused, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_seqlen, max_seqlen, 0.0, True, False, scale=scale,
            window_size_left=window_left)
        ctx.save_for_backward(q, k, v, out, lse, cu, rng_state, unused)
        ctx.max_seqlen, ctx.scale, ctx.window_left = max_seqlen, scale, window_left
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu, rng_state, unused = ctx.saved_tensors
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad_out.contiguous(), q, k, v, out, lse, cu, cu, ctx.max_seqlen, ctx.max_seqlen, 0.0, True,
            rng_state, unused, scale=ctx.scale, window_size_left=ctx.window_left)
        return dq, dk, dv, None, None, None, None


def _run_torch_varlen(q, k, v, cu, max_seqlen, scale, sliding_window):
    fn, params = _torch_varlen_attn()
    kwargs = {}
    if "window_size" in params:  # (-1, 0) is how varlen_attn spells "causal"
        kwargs["window_size"] = ((sliding_window - 1, 0) if _window_active(sliding_window, max_seqlen)
                                 else (-1, 0))
    else:
        kwargs["is_causal"] = True
    head_dim = q.shape[-1]
    if scale is not None:
        if "scale" in params:
            kwargs["scale"] = scale
        elif scale != head_dim ** -0.5:  # the kernel's default: fold the difference into q
            q = q * (scale * head_dim ** 0.5)
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        elif _ATEN_FLASH_HAS_WINDOW:
            # This torch's varlen_attn wants as many K/V heads as query heads; its FlashAttention-2
            # kernels read grouped heads natively, so call them directly rather than expanding K/V
            # to every query head (a copy in forward, a group sum in backward, group-size times
            # the K/V reads).
            left = sliding_window - 1 if _window_active(sliding_window, max_seqlen) else None
            return _GroupedFlashVarlen.apply(q, k, v, cu, max_seqlen, kwargs.get("scale"), left)
        else:
            k, v = _repeat_kv_heads(k, v, q.shape[1])
    out = fn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _repeat_kv_heads(k, v, num_heads):
    """[N, Hkv, D] -> [N, num_heads, D]: query head h reads kv head h // (num_heads // Hkv), as
    transformers' repeat_kv does."""
    groups = num_heads // k.shape[1]
    return k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)


def _sliding_window_causal_mask(length, sliding_window, device):
    """[length, length] bool, True where query i may read key j: i - sliding_window < j <= i."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    return (j <= i) & (j > i - sliding_window)


def _run_sdpa_per_segment(q, k, v, cu, scale, dropout, sliding_window):
    bounds = cu.tolist()  # one host read (a device sync on CUDA)
    total = q.shape[0]
    if bounds[0] != 0 or bounds[-1] != total or any(b > e for b, e in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the number of tokens {total}, got {bounds}")
    if k.shape[1] != q.shape[1]:
        k, v = _repeat_kv_heads(k, v, q.shape[1])
    # One split per tensor, not a slice per segment: a slice's backward writes its gradient into
    # a zero tensor as large as the whole input, once per segment; the split's backward is one
    # concatenation (measured on the CPU: 4.7 -> 3.6 ms for a 1024-token row of 8 segments).
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    outs = []
    for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
        length = qs.shape[0]
        if length == 0:
            continue
        # [1, H, L, D], the layout transformers' sdpa path uses, so the same CPU kernels run
        qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (qs, ks, vs))
        mask = None
        if sliding_window is not None and length > sliding_window:
            mask = _sliding_window_causal_mask(length, sliding_window, q.device)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, dropout_p=dropout,
                                           is_causal=mask is None, scale=scale)
        outs.append(o[0].transpose(0, 1))
    if not outs:  # no tokens at all
        return q.new_empty(q.shape)
    return torch.cat(outs) if len(outs) > 1 else outs[0]


# --------------------------------------------------------------------------- public varlen op

def varlen_attention(query, key, value, cu_seqlens, max_seqlen, *, scale=None, dropout=0.0,
                     sliding_window=None, backend=None):
    """Causal attention within each segment of a flattened token stream.

    query: ``[N, H, D]``; key, value: ``[N, Hkv, D]`` (``H % Hkv == 0``; GQA/MQA), one dtype and
        device (under autocast: any dtypes, all cast to the autocast dtype, as SDPA does).
        cu_seqlens: ``[S + 1]`` integer boundaries, 0 first and N last (checked on the
        ``sdpa_per_segment`` path; the CUDA kernels trust it to avoid a device sync).
        max_seqlen: int, at least the longest segment.
    scale: softmax scale, default ``D ** -0.5``. dropout: attention dropout probability.
    sliding_window: None, or each query sees itself and the ``sliding_window - 1`` keys before it
        (transformers' convention). backend: one of `BACKENDS`, or None to pick the first usable.
    Returns ``[N, H, D]`` in the input dtype; differentiable in query, key and value.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-D tensor [tokens, heads, head_dim], got "
                             f"{getattr(t, 'shape', type(t))}")
    if key.shape != value.shape or key.shape[0] != query.shape[0] or key.shape[2] != query.shape[2]:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must match and "
                         f"share tokens and head_dim with query {tuple(query.shape)}")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"query heads ({query.shape[1]}) must be a multiple of key/value heads "
                         f"({key.shape[1]})")
    if torch.is_autocast_enabled(query.device.type):
        # As SDPA under autocast: everything in the autocast dtype. (LLaMA's RoPE leaves query and
        # key in fp32 when its cos/sin are fp32, while value left its projection in bf16.)
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(f"query, key, value must share a dtype, got {query.dtype}, {key.dtype}, "
                         f"{value.dtype}")
    max_seqlen = _check_cu_seqlens(cu_seqlens, max_seqlen)
    if cu_seqlens.device != query.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but query on {query.device}")
    cu_seqlens = cu_seqlens.to(torch.int32)
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be None or >= 1, got {sliding_window}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    needs_window = _window_active(sliding_window, max_seqlen)
    shape = (query.shape[-1], max_seqlen)
    if backend is None:
        backend = _choose_backend(query.device, query.dtype, dropout, needs_window, *shape)
    elif backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    elif (reason := _backend_usable(backend, query.device, query.dtype, dropout, needs_window, *shape)):
        raise ValueError(f"backend {backend!r} cannot run this call: {reason}")

    if backend == "segment":
        return torch.ops.vpit_fast.segment_attention(query, key, value, cu_seqlens, max_seqlen,
                                                     scale if scale is not None else query.shape[-1] ** -0.5)[0]
    if backend == "flash_attn":
        return _run_flash_attn(query, key, value, cu_seqlens, max_seqlen, scale, dropout, sliding_window)
    if backend == "torch_varlen":
        return _run_torch_varlen(query, key, value, cu_seqlens, max_seqlen, scale, sliding_window)
    return _run_sdpa_per_segment(query, key, value, cu_seqlens, scale, dropout, sliding_window)


def _check_cu_seqlens(cu_seqlens, max_seqlen):
    """Shape and dtype checks that need no device sync; returns max_seqlen as an int (a SymInt
    stays one: under torch.compile it is symbolic, and int() would pin the graph to its value)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D tensor of at least 2 boundaries, got "
                         f"{getattr(cu_seqlens, 'shape', type(cu_seqlens))}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    if isinstance(max_seqlen, torch.Tensor):
        max_seqlen = int(max_seqlen)  # transformers' own helpers hand over 0-d tensors
    if not isinstance(max_seqlen, (int, torch.SymInt)) or max_seqlen < 1:
        raise ValueError(f"max_seqlen must be a positive int, got {max_seqlen!r}")
    return max_seqlen


def packed_attention_kwargs(cu_seqlens, max_seqlen, device=None):
    """The model kwargs that route a packed batch through `varlen_attention`.

    cu_seqlens: ``[S + 1]`` integer boundaries over the flattened ``B * T`` tokens, as
        `collate_packed` returns them (0 first, ``B * T`` last, padding tails their own segment).
    max_seqlen: int (or 0-d tensor), the longest segment. device: where the model runs; the
        boundaries are moved there (the CUDA kernels read them on the device).
    Returns ``{"cu_seq_lens_q", "cu_seq_lens_k": int32 tensor, "max_length_q", "max_length_k":
    int}``: pass as ``model(input_ids=..., position_ids=..., **kwargs)``. Values are checked here,
    once, while they are still on the host.
    """
    max_seqlen = _check_cu_seqlens(cu_seqlens, max_seqlen)
    if cu_seqlens.device.type == "cpu":
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if int(cu_seqlens[0]) != 0 or bool((lengths < 0).any()):
            raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {cu_seqlens.tolist()}")
        if int(lengths.max()) > max_seqlen:
            raise ValueError(f"max_seqlen ({max_seqlen}) is shorter than the longest segment "
                             f"({int(lengths.max())})")
    cu = cu_seqlens.to(device=device if device is not None else cu_seqlens.device, dtype=torch.int32,
                       non_blocking=True)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max_seqlen,
            "max_length_k": max_seqlen}


# --------------------------------------------------------------------------- transformers glue

def _segments_from_position_ids(position_ids, batch, length):
    """(cu_seqlens, max_seqlen) when ``position_ids`` restart inside a row (a packed batch given
    without cu_seqlens), else None. A new segment starts wherever the position does not grow by
    exactly 1, which is how transformers' masking (find_packed_sequence_indices) reads them."""
    if position_ids is None or position_ids.shape[-1] != length:
        return None
    pos = position_ids.reshape(-1, length).expand(batch, length)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = (pos[:, 1:] - pos[:, :-1]) != 1
    if not bool(starts[:, 1:].any()):  # one device sync; pass cu_seqlens to skip it
        return None
    first = starts.reshape(-1).nonzero().reshape(-1)
    cu = torch.cat([first, first.new_tensor([batch * length])]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _rows_as_segments(batch, length, device):
    cu = torch.arange(0, (batch + 1) * length, length, device=device, dtype=torch.int32)
    return cu, length


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             sliding_window=None, softcap=None, **kwargs):
    """transformers attention function for ``attn_implementation="vpit_varlen"``.

    query: ``[B, H, T, D]``; key, value: ``[B, Hkv, Tk, D]``. Returns ``(out [B, T, H, D], None)``.

    - ``cu_seq_lens_q`` (+ ``max_length_q``) in kwargs: packed batch, `varlen_attention` over the
      flattened ``B * T`` tokens. Needs ``Tk == T`` (no KV cache) and no padding mask.
    - no mask and ``position_ids`` that restart inside a row: the same, segments read from the
      positions (what transformers' sdpa masking does; costs a device sync per layer).
    - no mask and a sliding window shorter than T: each row one segment, windowed.
    - otherwise (padding masks, KV caches, plain causal): transformers' own sdpa function.
    """
    if softcap is not None:
        raise ValueError(f"{ATTN_IMPLEMENTATION} does not support attention logit softcapping")
    if kwargs.get("is_causal") is False or not getattr(module, "is_causal", True):
        raise ValueError(f"{ATTN_IMPLEMENTATION} is causal-only; this module asks for bidirectional attention")
    batch, _, length, _ = query.shape

    segments = None
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is not None:
        cu_k = kwargs.get("cu_seq_lens_k")
        # (the value check reads the device: skipped while torch.compile traces, where it would
        # split the graph; the same boundaries object, as packed_attention_kwargs passes, is checked)
        if (cu_k is not None and cu_k is not cu_q and not torch.compiler.is_compiling()
                and (cu_k.shape != cu_q.shape or not torch.equal(cu_k, cu_q))):
            raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q (packed self-attention)")
        if kwargs.get("max_length_q") is None:
            raise ValueError("cu_seq_lens_q needs max_length_q (the longest segment)")
        if attention_mask is not None:
            raise ValueError("pass either cu_seq_lens_q/... (packed) or a padding attention_mask, not both")
        if key.shape[2] != length:
            raise ValueError(f"packed attention needs as many keys as queries (no KV cache), got "
                             f"{key.shape[2]} keys for {length} queries")
        segments = (cu_q, kwargs["max_length_q"])
    elif attention_mask is None and length > 1 and key.shape[2] == length:
        segments = _segments_from_position_ids(kwargs.get("position_ids"), batch, length)
        if segments is None and _window_active(sliding_window, length):
            segments = _rows_as_segments(batch, length, query.device)

    if segments is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)

    # [B, H, T, D] -> [B*T, H, D], the layout varlen kernels read
    q, k, v = (x.transpose(1, 2).reshape(batch * length, x.shape[1], x.shape[3]) for x in (query, key, value))
    out = varlen_attention(q, k, v, segments[0], segments[1], scale=scaling, dropout=dropout,
                           sliding_window=sliding_window)
    return out.view(batch, length, out.shape[1], out.shape[2]), None


def padding_free_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                      attention_mask=None, **kwargs):
    """transformers mask function for ``"vpit_varlen"``: None when there is no padding mask and
    no KV cache (``q_length == kv_length``), so a packed batch never gets a dense
    ``[B, 1, T, T]`` mask (packing and sliding windows are applied inside
    `varlen_attention_forward` instead); otherwise exactly transformers' sdpa mask, which the
    sdpa path of `varlen_attention_forward` consumes."""
    if attention_mask is None and q_length == kv_length:
        return None
    from transformers.masking_utils import causal_mask_function, sdpa_mask
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                     kv_offset=kv_offset, mask_function=mask_function or causal_mask_function,
                     attention_mask=attention_mask, **kwargs)


def register_varlen_attention():
    """Registers `varlen_attention_forward` and `padding_free_mask` under `ATTN_IMPLEMENTATION`
    in transformers' global attention and mask interfaces (idempotent). Returns the name."""
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface
    _probe_backends()
    AttentionInterface.register(ATTN_IMPLEMENTATION, varlen_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, padding_free_mask)
    return ATTN_IMPLEMENTATION
