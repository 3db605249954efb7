"""Pure-PyTorch versions of every op: the ground truth of the tests, the peers of the benchmarks,
and what `impl="torch"` runs."""

import torch
import torch.nn.functional as F

from vpit_fast.ops.types import HeadLoss


def interpolate_tokens(x, out_size, in_size, normalize=False):
    """The official MetaMorph path: [B, h*w, C] -> grid -> bilinear (align_corners=False) in fp32
    (float64 for float64 input) -> optional L2 normalisation over C -> cast back -> [B, oh*ow, C]."""
    batch, _, channels = x.shape
    (in_h, in_w), (out_h, out_w) = in_size, out_size
    math_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    grid = x.reshape(batch, in_h, in_w, channels).permute(0, 3, 1, 2).contiguous()
    y = F.interpolate(grid.to(math_dtype), size=(out_h, out_w), mode="bilinear", align_corners=False)
    if normalize:
        y = F.normalize(y, dim=1, eps=1e-12)
    return y.to(x.dtype).permute(0, 2, 3, 1).reshape(batch, out_h * out_w, channels)


def head_loss(hidden, lm_weight, labels, visual_rows, visual_targets, vision_head,
              text_weight=1.0, visual_weight=1.0, ignore_index=-100, reduction="mean"):
    """The plain-PyTorch response-only heads and loss: the text rows (label != ignore_index) go
    through the LM head in the input dtype and cross-entropy in fp32; the visual rows go through
    vision_head in the input dtype and ``1 - cosine_similarity(eps=1e-8)`` in fp32. Float64
    inputs keep float64 throughout (the tests' ground truth). Inputs are trusted: the public
    `vpit_fast.head_loss` checks them. Returns a `HeadLoss`; only ``loss`` carries gradients."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f'reduction must be "mean" or "sum", got {reduction!r}')
    math_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32

    # Rows are selected before the heads run, so prompt rows cost nothing; sums over no rows are
    # 0 with zero gradients, and the mean divides by max(count, 1) so an empty modality is 0.
    text_rows = (labels != ignore_index).nonzero().squeeze(1)
    logits = hidden.index_select(0, text_rows) @ lm_weight.t()
    text_sum = F.cross_entropy(logits.to(math_dtype), labels.index_select(0, text_rows), reduction="sum")

    pred = vision_head(hidden.index_select(0, visual_rows))
    cos = F.cosine_similarity(pred.to(math_dtype), visual_targets.to(math_dtype), dim=-1, eps=1e-8)
    visual_sum = (1 - cos).sum()

    n_text, n_visual = text_rows.numel(), visual_rows.numel()
    if reduction == "mean":
        text_part, visual_part = text_sum / max(n_text, 1), visual_sum / max(n_visual, 1)
    else:
        text_part, visual_part = text_sum, visual_sum
    loss = text_weight * text_part + visual_weight * visual_part

    def count(n):
        return torch.tensor(n, dtype=torch.int64, device=hidden.device)

    return HeadLoss(loss, text_part.detach(), visual_part.detach(), count(n_text), count(n_visual))


# Per-row modes of the decode state (int64 tensors) that `dispatch_next_inputs` reads and writes.
TEXT, IMAGE_MODE, DONE = 0, 1, 2


def dispatch_next_inputs(mode, visual_count, images_left, text_ids, visual_pred, token_embedding, adapter, *,
                         num_visual_tokens, image_start_id, image_end_id, image_token_id, pad_id, eos_ids,
                         normalize):
    """The modality dispatch and state update of one decode step, for B rows at once.

    Every row runs through both paths (fixed shapes, no compaction, no host sync: capturable in a
    CUDA graph); the row's mode selects which result it keeps. The fused op
    (`vpit_fast.ops.decode_dispatch.dispatch_next_inputs`) takes and returns exactly these tensors;
    the adapter (two GEMMs) stays a callable.

    Args (all on one device):
        mode: ``[B]`` int64, the row's mode for the token to emit now: 0 text, 1 image, 2 done.
        visual_count: ``[B]`` int64, visual tokens the row has emitted in its current image
            (0..n; n means the next token is ``<image_end>``).
        images_left: ``[B]`` int64, images the row may still start (only decremented here; the
            sampler reads it to exclude ``<image_start>``).
        text_ids: ``[B]`` int64, the token sampled from the LM head for each row (read only for
            rows in text mode).
        visual_pred: ``[B, Dv]``, the vision head's prediction for each row (after guidance; read
            only for rows in image mode).
        token_embedding: ``[V, H]`` the LLM's input embedding table.
        adapter: callable ``[B, Dv] -> [B, H]`` (the model's adapter), run on the adapter's dtype.
        num_visual_tokens (n), image_start_id, image_end_id, image_token_id, pad_id: ints.
        eos_ids: ``[E]`` int64 tensor of end-of-turn ids.
        normalize: L2-normalise visual tokens (in fp32) before they are emitted and adapted.

    Per row, by mode:
        text: emits ``text_ids``, embeds it; ``<image_start>`` switches to image mode with count
            0 and decrements ``images_left``; an end-of-turn id switches to done.
        image, count < n: emits the ``<image>`` id and the visual token ``v = normalize?(pred)``;
            the next input is ``adapter(v)``; count + 1.
        image, count = n: emits ``<image_end>`` (embedded), back to text mode with count 0.
        done: emits ``pad_id`` (embedded), state unchanged.

    Returns:
        (next_embeds ``[B, H]`` in token_embedding's dtype, next_ids ``[B]`` int64, visual
        ``[B, Dv]`` in visual_pred's dtype: the emitted visual token, zero on other rows, mode,
        visual_count, images_left ``[B]`` int64 (new tensors)).
    """
    in_text = mode == TEXT
    in_image = mode == IMAGE_MODE
    emits_visual = in_image & (visual_count < num_visual_tokens)
    emits_end = in_image & (visual_count >= num_visual_tokens)
    starts_image = in_text & (text_ids == image_start_id)
    ends_turn = in_text & torch.isin(text_ids, eos_ids)

    next_ids = torch.where(in_text, text_ids, pad_id)
    next_ids = torch.where(emits_visual, image_token_id, next_ids)
    next_ids = torch.where(emits_end, image_end_id, next_ids)

    visual = visual_pred.float()
    if normalize:
        visual = F.normalize(visual, dim=-1)
    visual = visual.to(visual_pred.dtype)
    adapter_dtype = next(iter(adapter.parameters())).dtype if hasattr(adapter, "parameters") else visual.dtype
    adapted = adapter(visual.to(adapter_dtype)).to(token_embedding.dtype)
    embedded = token_embedding.index_select(0, next_ids)
    next_embeds = torch.where(emits_visual[:, None], adapted, embedded)
    visual = torch.where(emits_visual[:, None], visual, torch.zeros_like(visual))

    new_mode = torch.where(starts_image, IMAGE_MODE, mode)
    new_mode = torch.where(emits_end, TEXT, new_mode)
    new_mode = torch.where(ends_turn, DONE, new_mode)
    new_count = torch.where(emits_visual, visual_count + 1, visual_count)
    new_count = torch.where(emits_end | starts_image, 0, new_count)
    new_left = images_left - starts_image.long()
    return next_embeds, next_ids, visual, new_mode, new_count, new_left


def decode_attention(query, key, value, key_valid, scale):
    """Attention of one query token per (row, head) over a KV cache's valid slots, in the
    inputs' dtype (float64 for reference answers).

    query ``[B, H, D]``; key, value ``[B, Hkv, L, D]`` with ``H`` a multiple of ``Hkv`` (query head
    ``h`` reads KV head ``h // (H // Hkv)``); key_valid ``[B, L]`` bool. Returns ``[B, H, D]``:
    the softmax over valid slots of ``scale * q.k``, applied to the values; zeros for a row with no
    valid slot. Invalid slots never enter the result, whatever they hold.
    """
    B, H, D = query.shape
    Hkv = key.shape[1]
    group = H // Hkv if Hkv else 1
    k = key.repeat_interleave(group, dim=1)
    v = value.repeat_interleave(group, dim=1)
    valid = key_valid[:, None, :]
    scores = torch.einsum("bhd,bhld->bhl", query, k.masked_fill(~valid[..., None], 0)) * scale
    scores = scores.masked_fill(~valid, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no valid slot: all -inf
    return torch.einsum("bhl,bhld->bhd", probs, v.masked_fill(~valid[..., None], 0))


def _rms_norm(x, weight, eps):
    """transformers' LlamaRMSNorm, computed in float32 or (for float64 inputs) float64."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rope(x, positions, inv_freq, rope_scale):
    """transformers' apply_rotary_pos_emb on ``[R, heads, D]`` at ``positions`` ``[R]``. The angles
    are float32 products, as transformers computes them (the op's definition); cos and sin are
    taken in float64 for float64 inputs."""
    freqs = (positions.float()[:, None] * inv_freq.float()[None, :]).to(torch.promote_types(x.dtype, torch.float32))
    angles = torch.cat([freqs, freqs], dim=-1)[:, None, :]
    cos = (angles.cos() * rope_scale).to(x.dtype)
    sin = (angles.sin() * rope_scale).to(x.dtype)
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def decode_qkv_rope(hidden, norm_weight, eps, wq, wk, wv, bq, bk, bv, inv_freq, rope_scale, positions, cursor,
                    key_cache, value_cache):
    """A LLaMA-family layer's attention input for one new token per row: RMSNorm, the q / k / v
    projections and RoPE; writes k and v at slot ``cursor`` of the caches (in place) and returns
    q ``[R, heads, D]``. hidden ``[R, H]``; caches ``[R, Hkv, L, D]``; positions ``[R]`` int64."""
    R, D = hidden.shape[0], key_cache.shape[-1]
    xn = _rms_norm(hidden, norm_weight, eps)
    q = _rope(F.linear(xn, wq, bq).view(R, wq.shape[0] // D, D), positions, inv_freq, rope_scale)
    k = _rope(F.linear(xn, wk, bk).view(R, wk.shape[0] // D, D), positions, inv_freq, rope_scale)
    v = F.linear(xn, wv, bv).view(R, wv.shape[0] // D, D)
    slot = cursor.reshape(1)
    key_cache.index_copy_(2, slot, k[:, :, None])
    value_cache.index_copy_(2, slot, v[:, :, None])
    return q


def decode_gate_up(hidden, norm_weight, eps, w_gate, w_up, b_gate=None, b_up=None):
    """silu(gate) * up ``[R, I]`` of the RMSNorm of hidden ``[R, H]`` (a LLaMA MLP's first half)."""
    xn = _rms_norm(hidden, norm_weight, eps)
    return F.silu(F.linear(xn, w_gate, b_gate)) * F.linear(xn, w_up, b_up)


def decode_proj_add(residual, x, weight, bias=None):
    """residual ``[R, N]`` + x ``[R, K]`` weight^T + bias, returned (the reference does not write
    in place)."""
    return residual + F.linear(x, weight, bias)
