"""Multimodal generation for `VPiTModel`: text, and images as runs of visual tokens (MetaMorph).

Every sequence of a batch switches mode on its own. In text mode it samples from the LM head
until it emits ``<image_start>``; in image mode its next ``num_visual_tokens`` (64) tokens come
from the vision head (optionally L2-normalised, as the model's visual tokens are), each fed back
through the adapter as the next input embedding; then ``<image_end>`` is appended (not sampled)
and text resumes, until an end-of-turn token or the token budget. Visual token ``j`` of an image
is predicted from the hidden state at the position before it (the ``<image_start>`` position for
``j = 0``): the training shift of `vpit_fast.model`.

How it runs (`generate`):

- Prompts are rendered with the tokenizer's chat template (``add_generation_prompt=True``),
  optionally followed by a response prefix, and every ``<image>`` becomes ``<image_start>``, 64
  slots and ``<image_end>`` as in `vpit_fast.data.conversations`. The batch is left-padded (to a
  multiple of 64 positions), so all rows write the KV cache at the same slot each step; RoPE
  positions count real tokens only.
- A static KV cache (transformers' ``StaticCache``: per layer ``[rows, kv_heads, cache_len, D]``,
  preallocated) and static input/state/output buffers give the decode step fixed shapes. Masks
  are passed as ready 4-D boolean tensors (``[rows, 1, q, cache_len]``), so transformers builds
  none and nothing in the step reads a device value on the host.
- The decode step (`StaticDecoder`): one LLM forward for one token per row, the LM head and
  sampling on every row, the vision head on every row, then `dispatch_next_inputs` picks per row
  (no compaction, no host sync), writes the next input embeddings, the emitted ids and visual
  tokens into static buffers and updates the per-row state. With ``cuda_graph=True`` that whole
  step is captured once in a CUDA graph and replayed; the host only checks every
  ``stop_check_interval`` steps (and once after the prefill) whether all rows have finished and
  whether every unfinished row is inside an image: until that image's end no row samples text,
  so those steps run a second captured step without the LM head and sampling. The step's attention is
  `decode_attention` (grouped query heads packed onto their KV head, no copy of the cache); the
  prefill uses the model's own implementation. For LLaMA-family LLMs with at most
  `vpit_fast.fused_decode.AUTO_MAX_ROWS` rows on CUDA (any number on the CPU) the step's decoder layers
  are `vpit_fast.fused_decode.FusedDecodeLayers` (four fused ops plus attention per layer over
  the model's own weights and cache) instead of transformers' layers (``fused_layers``). With ``compile_step=True`` the step's model work
  (LLM forward, heads, greedy choice) is compiled with ``torch.compile`` (inductor, fixed shapes)
  before the graph captures it: RMSNorm, rotary embedding, SiLU-gating and the cache writes fuse
  into a few kernels each instead of dozens of small ones.

Text sampling: greedy (``temperature=0``), or temperature with optional top-k and top-p; rows of
the vocabulary at or beyond ``config.text_vocab_size`` (padding), the ``<image>`` placeholder and
``<image_end>`` (appended by the rule above, never sampled) are excluded; end-of-turn tokens are
excluded before ``min_new_tokens`` tokens exist; ``<image_start>`` once ``max_images`` images were
started.

Classifier-free guidance for visual tokens (``cfg_scale``) is an extension beyond the MetaMorph
paper, which generates visual tokens without guidance. Each prompt gets an unconditional twin:
the same conversation with every user message emptied (and its images dropped), the same
response prefix, then the same generated tokens. Both run in one batch of ``2 B`` rows; for
visual tokens ``pred = uncond + s * (cond - uncond)`` (re-normalised when
``config.normalize_visual``); text tokens come from the conditional rows only. An empty user turn
is chosen over an empty prompt because it keeps the template's structure (role markers, the
assistant's turn) that the model always saw in training, so only the request's content differs.

`generate_uncached` is the official MetaMorph way, kept as the reference for tests and
benchmarks: one prompt at a time, and the whole sequence re-run for every new token.

Public API:
    generate             -- batched generation (static KV cache, optional CUDA graph)
    generate_uncached    -- the official-style reference (no cache, one prompt at a time)
    start_decoding       -- the prompts prefilled into a `StaticDecoder`, for custom loops
    Generation           -- what both return per prompt
    encode_prompt        -- a prompt as model inputs (`PromptInputs`)
    dispatch_next_inputs -- the per-row modality dispatch and state update of one decode step
    decode_attention     -- the decode step's attention (one query per row, packed GQA)
    sample_tokens        -- greedy / temperature / top-k / top-p sampling from logits
    StaticDecoder        -- the fixed-shape decoding state the decode step runs on
    release_decoders     -- frees the CUDA-graph decoders kept for a model
"""

import inspect
import math
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vpit_fast.data.conversations import chat_template
from vpit_fast.data.shapes import IMAGE
from vpit_fast.data.tokenizer import IMAGE_END, IMAGE_START
from vpit_fast import _extension
from vpit_fast.ops.decode_attention import MAX_HEAD_DIM
# The fused dispatch (reference: vpit_fast.ops.reference) and the per-row modes of the decode state.
from vpit_fast.ops.decode_dispatch import DONE, IMAGE_MODE, TEXT, dispatch_next_inputs

__all__ = ["Generation", "PromptInputs", "StaticDecoder", "decode_attention", "dispatch_next_inputs", "encode_prompt",
           "generate", "generate_uncached", "release_decoders", "sample_tokens", "start_decoding"]

NO_IMAGE_LIMIT = 2 ** 40  # max_images=None
CACHE_LEN_MULTIPLE = 128  # cache lengths are rounded up, so CUDA-graph decoders are reused across prompts
# Batches are left-padded to a multiple of this: cuDNN's attention builds an execution plan for
# every new sequence length (about 70 ms each for LLaMA-3.2-1B on an H100), so fewer distinct
# prefill lengths mean fewer plans; the padding costs at most 63 masked positions.
PROMPT_LEN_MULTIPLE = 64


# =============================================================================================
# Results and parameters
# =============================================================================================


@dataclass
class Generation:
    """One prompt's generated continuation.

    text: the generated text; each generated image appears as one ``<image>`` placeholder (the
        data's convention); end-of-turn and padding tokens are left out.
    token_ids: ``[N]`` int64, every generated position in order: text ids, ``<image_start>``, one
        ``<image>`` id per visual token, ``<image_end>``, the end-of-turn token when one ended it.
    visual_tokens: one ``[num_visual_tokens, Dv]`` tensor (the model's dtype, on the CPU) per
        complete generated image, in order; an image cut off by the token budget is left out.
    finished: True when an end-of-turn token ended the turn, False when the budget did.
    """

    text: str
    token_ids: torch.Tensor
    visual_tokens: list = field(default_factory=list)
    finished: bool = False


@dataclass(frozen=True)
class _Sampling:
    """Validated sampling and stopping parameters (see `generate`)."""

    max_new_tokens: int
    min_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    max_images: int
    cfg_scale: float = None


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _check_sampling(max_new_tokens, min_new_tokens, temperature, top_k, top_p, max_images, cfg_scale):
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not _is_int(min_new_tokens) or not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"min_new_tokens must be an int in [0, max_new_tokens={max_new_tokens}], got "
                         f"{min_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if not _is_int(top_k) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1] (1 = off), got {top_p!r}")
    if max_images is not None and (not _is_int(max_images) or max_images < 0):
        raise ValueError(f"max_images must be None or an int >= 0, got {max_images!r}")
    if cfg_scale is not None and (isinstance(cfg_scale, bool) or not isinstance(cfg_scale, (int, float))
                                  or not math.isfinite(cfg_scale)):
        raise ValueError(f"cfg_scale must be None (no guidance) or a finite number, got {cfg_scale!r}")
    return _Sampling(max_new_tokens, min_new_tokens, float(temperature), top_k, float(top_p),
                     NO_IMAGE_LIMIT if max_images is None else max_images,
                     None if cfg_scale is None else float(cfg_scale))


# =============================================================================================
# Prompts
# =============================================================================================


@dataclass
class PromptInputs:
    """One prompt as model inputs.

    input_ids: ``[T]`` int64; image slots hold the ``<image>`` id.
    image_slots: ``[M]`` int64, first slot of each prompt image (its ``<image_start>`` is one before).
    visual_tokens: ``[M, n, Dv]`` or None when M = 0.
    """

    input_ids: torch.Tensor
    image_slots: torch.Tensor
    visual_tokens: torch.Tensor = None


def _messages(prompt):
    """A prompt (str: one user turn; list of {"role", "content"} dicts: a conversation) as a
    list of message dicts."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, (list, tuple)) and prompt and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt):
        return [dict(m) for m in prompt]
    raise TypeError("a prompt must be a str or a non-empty list of {'role': str, 'content': str} messages, got "
                    f"{type(prompt).__name__}")


def encode_prompt(model, prompt, visual_tokens=None, response_prefix=None, unconditional=False):
    """Renders one prompt for generation.

    Args:
        model: a `VPiTModel`.
        prompt: a str (one user turn) or a list of ``{"role", "content"}`` messages; ``<image>`` in
            the text marks where each image goes. When the prompt is a str with images and no
            ``<image>``, one ``<image>`` per image is put before the text (LLaVA's convention).
        visual_tokens: ``[M, n, Dv]`` tokens of the prompt's M images, or None.
        response_prefix: text the assistant's turn starts with (tokenized on its own and appended
            after the generation prompt); it may end with ``<image_start>`` (generation then
            starts in image mode) but hold no other image token.
        unconditional: the classifier-free-guidance twin: every user message emptied, no images.

    Returns:
        `PromptInputs`. Raises ValueError on a placeholder count that differs from M, literal
        ``<image_start>``/``<image_end>`` in messages, or image tokens in the prefix.
    """
    tokenizer, cfg = model.tokenizer, model.config
    n = cfg.num_visual_tokens
    messages = _messages(prompt)
    count = 0 if visual_tokens is None else visual_tokens.shape[0]
    if unconditional:
        messages = [{**m, "content": ""} if m["role"] == "user" else m for m in messages]
        count, visual_tokens = 0, None
    placeholders = sum(m["content"].count(IMAGE) for m in messages)
    if isinstance(prompt, str) and placeholders == 0 and count > 0:
        messages[0]["content"] = " ".join([IMAGE] * count + [messages[0]["content"]])
        placeholders = count
    if placeholders != count:
        raise ValueError(f"the prompt has {placeholders} {IMAGE} placeholder(s) but {count} image(s) were given")
    for m in messages:
        for token in (IMAGE_START, IMAGE_END):
            if token in m["content"]:
                raise ValueError(f"prompt messages must not contain a literal {token} (use {IMAGE} for images)")
    if visual_tokens is not None and (visual_tokens.dim() != 3 or
                                      tuple(visual_tokens.shape[1:]) != (n, cfg.visual_dim)):
        raise ValueError(f"visual_tokens must be [M, {n}, {cfg.visual_dim}], got {tuple(visual_tokens.shape)}")

    ids = list(tokenizer.apply_chat_template(messages, chat_template=chat_template(tokenizer), tokenize=True,
                                             return_dict=True, add_generation_prompt=True)["input_ids"])
    if response_prefix:
        prefix = tokenizer.encode(response_prefix, add_special_tokens=False)
        banned = {cfg.image_token_id, cfg.image_end_id}
        if banned & set(prefix) or cfg.image_start_id in prefix[:-1]:
            raise ValueError(f"response_prefix may end with {IMAGE_START} but hold no other image token, got "
                             f"{response_prefix!r}")
        ids += prefix
    ids = torch.tensor(ids, dtype=torch.int64)
    is_image = ids == cfg.image_token_id
    if int(is_image.sum()) != count:
        raise ValueError(f"{int(is_image.sum())} {IMAGE} tokens after tokenization but {count} images")
    repeats = torch.where(is_image, n + 2, 1)
    input_ids = ids.repeat_interleave(repeats)
    starts = (torch.cumsum(repeats, 0) - repeats)[is_image]
    input_ids[starts], input_ids[starts + n + 1] = cfg.image_start_id, cfg.image_end_id
    return PromptInputs(input_ids, starts + 1, visual_tokens)


def _prompt_list(prompts):
    if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], dict)):
        return [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise TypeError("prompts must be a str, a conversation (list of messages) or a non-empty list of those")
    return list(prompts)


def _per_prompt(values, count, name):
    """None, or one entry per prompt (None or a list/tensor); returns a list of length count."""
    if values is None:
        return [None] * count
    if count == 1 and not (isinstance(values, (list, tuple)) and len(values) == 1 and
                           (values[0] is None or isinstance(values[0], (list, tuple, torch.Tensor)))):
        values = [values]  # one prompt's images given without the outer list
    if not isinstance(values, (list, tuple)) or len(values) != count:
        raise ValueError(f"{name} must hold one entry per prompt ({count}), got "
                         f"{len(values) if isinstance(values, (list, tuple)) else type(values).__name__}")
    return list(values)


def _prompt_visual_tokens(model, prompts, images, visual_tokens):
    """Visual tokens ``[M_i, n, Dv]`` (or None) for each prompt, encoding all images in one pass."""
    count = len(prompts)
    if images is not None and visual_tokens is not None:
        raise ValueError("give images or visual_tokens, not both")
    if visual_tokens is not None:
        out = []
        for tokens in _per_prompt(visual_tokens, count, "visual_tokens"):
            if isinstance(tokens, (list, tuple)):
                tokens = torch.stack(list(tokens)) if tokens else None
            if tokens is not None and not isinstance(tokens, torch.Tensor):
                raise TypeError(f"visual_tokens entries must be tensors [M, n, Dv], got {type(tokens).__name__}")
            out.append(tokens)
        return out
    per_prompt = [[] if x is None else (list(x) if isinstance(x, (list, tuple)) else [x])
                  for x in _per_prompt(images, count, "images")]
    flat = [image for group in per_prompt for image in group]
    if not flat:
        return [None] * count
    if model.visual is None:
        raise ValueError("this model has no encoder (visual=None): give precomputed visual_tokens instead of images")
    pixels = model.visual.processor(images=flat, return_tensors="pt")["pixel_values"]
    encoded = model.visual(pixels.to(model.visual.device, model.visual.dtype))
    out, start = [], 0
    for group in per_prompt:
        out.append(encoded[start:start + len(group)] if group else None)
        start += len(group)
    return out


def _eos_ids(model, eos_token_ids):
    if eos_token_ids is None:
        # The tokenizer's, not the LLM config's: the chat template's end-of-turn token is the
        # tokenizer's business (a randomly configured LLM's default eos id means nothing).
        ids = [] if model.tokenizer.eos_token_id is None else [model.tokenizer.eos_token_id]
    else:
        ids = [eos_token_ids] if _is_int(eos_token_ids) else list(eos_token_ids)
    vocab = model.config.text_vocab_size
    if not ids or not all(_is_int(i) and 0 <= i < vocab for i in ids):
        raise ValueError(f"eos_token_ids must be token ids in [0, {vocab}) (at least one), got {ids!r}")
    return ids


def _encode_all(model, prompts, images, visual_tokens, response_prefix, cfg_scale):
    """(conditional PromptInputs list, unconditional list or None)."""
    prompts = _prompt_list(prompts)
    tokens = _prompt_visual_tokens(model, prompts, images, visual_tokens)
    if response_prefix is None or isinstance(response_prefix, str):
        prefixes = [response_prefix] * len(prompts)
    elif isinstance(response_prefix, (list, tuple)) and len(response_prefix) == len(prompts) and all(
            p is None or isinstance(p, str) for p in response_prefix):
        prefixes = list(response_prefix)
    else:
        raise ValueError(f"response_prefix must be None, a str, or one str (or None) per prompt ({len(prompts)}), "
                         f"got {response_prefix!r}")
    cond = [encode_prompt(model, p, t, x) for p, t, x in zip(prompts, tokens, prefixes)]
    uncond = None
    if cfg_scale is not None:
        uncond = [encode_prompt(model, p, None, x, unconditional=True) for p, x in zip(prompts, prefixes)]
    return cond, uncond


def _left_padded(model, prompts, device, multiple=1):
    """Left-pads PromptInputs into a batch of T positions, T the longest prompt rounded up to
    ``multiple``. Returns (embeds [R, T, H], valid [R, T] bool, positions [R, T] int64), on device."""
    R = len(prompts)
    T = -(-max(p.input_ids.numel() for p in prompts) // multiple) * multiple
    pad_id = model.tokenizer.pad_token_id
    pad_id = model.config.image_token_id if pad_id is None else pad_id
    ids = torch.full((R, T), pad_id, dtype=torch.int64)
    valid = torch.zeros(R, T, dtype=torch.bool)
    slots, rows, tokens = [], [], []
    for r, p in enumerate(prompts):
        offset = T - p.input_ids.numel()
        ids[r, offset:] = p.input_ids
        valid[r, offset:] = True
        if p.visual_tokens is not None and p.visual_tokens.shape[0] > 0:
            slots.append(p.image_slots + offset)
            rows.append(torch.full_like(p.image_slots, r))
            tokens.append(p.visual_tokens.to(device))
    positions = (valid.cumsum(1) - 1).clamp(min=0)
    if tokens:
        embeds = model.embed(ids.to(device), torch.cat(tokens), torch.cat(slots).to(device), torch.cat(rows).to(device))
    else:
        embeds = model.embed(ids.to(device), None, None, None)
    return embeds, valid.to(device), positions.to(device)


def _initial_state(model, prompts, sampling, device):
    """(mode, images_left) ``[B]`` int64: image mode where the prompt ends with ``<image_start>``."""
    starts = torch.tensor([int(p.input_ids[-1]) == model.config.image_start_id for p in prompts], dtype=torch.int64)
    mode = torch.where(starts.bool(), IMAGE_MODE, TEXT)
    return mode.to(device), (sampling.max_images - starts).to(device)


# =============================================================================================
# Sampling and the modality dispatch (pure PyTorch, no host syncs, fixed shapes)
# =============================================================================================


def sample_tokens(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """Next-token ids from ``logits`` ``[B, V]`` (float32; -inf for excluded tokens).

    temperature 0 is greedy (argmax, no randomness); otherwise the logits are divided by it, then
    restricted to the ``top_k`` largest (0: all) and to the smallest set of most likely tokens
    whose probability reaches ``top_p`` (1: all; the most likely token is always kept). The draw
    is ``argmax(p / e)`` with ``e ~ Exp(1)`` per token, which picks token i with probability
    ``p_i`` and needs no host sync (CUDA-graph safe with the default generator).

    Returns ``[B]`` int64.
    """
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    ids = None
    if 0 < top_k < logits.shape[-1]:
        logits, ids = logits.topk(top_k, dim=-1)  # sorted, descending
        if top_p < 1:
            logits = _nucleus(logits, top_p)
    elif top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        logits = torch.empty_like(logits).scatter_(-1, order, _nucleus(ordered, top_p))
    probs = logits.softmax(-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    choice = (probs / race).argmax(-1)
    return choice if ids is None else ids.gather(-1, choice[:, None]).squeeze(-1)


def _nucleus(sorted_logits, top_p):
    """Masks (to -inf) every token of descending ``sorted_logits`` after the probability mass
    before it reaches top_p."""
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    return sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))


def _text_bias(model, vocab, device):
    """``[V]`` float32: 0, or -inf on tokens text mode never samples (vocabulary padding, the
    ``<image>`` placeholder, ``<image_end>``)."""
    cfg = model.config
    bias = torch.zeros(vocab, dtype=torch.float32)
    bias[cfg.text_vocab_size:] = float("-inf")
    bias[[cfg.image_token_id, cfg.image_end_id]] = float("-inf")
    return bias.to(device)


def _exclude_by_state(logits, generated, images_left, eos_ids, min_new_tokens, image_start_id):
    """Excludes (in place, no host sync) end-of-turn ids while fewer than min_new_tokens tokens
    exist (``generated``: 0-d int64) and ``<image_start>`` on rows with no images left."""
    if min_new_tokens > 0:
        eos_logits = logits.index_select(1, eos_ids)
        logits.index_copy_(1, eos_ids, torch.where(generated < min_new_tokens, float("-inf"), eos_logits))
    start = logits.select(1, image_start_id)
    start.copy_(torch.where(images_left > 0, start, float("-inf")))
    return logits


def _guided(pred_cond, pred_uncond, scale):
    """Classifier-free guidance in fp32: ``uncond + scale * (cond - uncond)``."""
    uncond = pred_uncond.float()
    return (uncond + scale * (pred_cond.float() - uncond)).to(pred_cond.dtype)


# =============================================================================================
# The static decoder (KV cache, buffers, optional CUDA graph)
# =============================================================================================


DECODE_ATTENTION = "vpit_decode"


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                     sliding_window=None, **kwargs):
    """transformers attention function for the decode step: one query token per row against the
    whole static cache.

    query: ``[B, H, 1, D]``; key, value: ``[B, Hkv, L, D]`` (the cache); attention_mask:
    ``[B, 1, 1, L]`` bool (True = attend). Runs `vpit_fast.ops.decode_attention` (split-K over
    the cache, each cached key and value read once per group of query heads sharing it) when the
    compiled op takes the case and, on CUDA, while ``B * Hkv <= FUSED_DECODE_MAX_PAIRS``; otherwise SDPA with the query heads that share a KV head packed as
    that head's queries (transformers' own sdpa path copies the whole cache per layer per step to
    repeat the KV heads whenever a mask is given). Returns ``(out [B, 1, H, D], None)``.
    """
    B, H, q, D = query.shape
    Hkv = key.shape[1]
    if q != 1:
        raise ValueError(f"{DECODE_ATTENTION} takes one query token per row, got {q}")
    if softcap is not None:
        raise ValueError(f"{DECODE_ATTENTION} does not support attention logit softcapping")
    if sliding_window is not None and key.shape[2] > sliding_window:
        raise ValueError(f"{DECODE_ATTENTION} does not support sliding windows (window {sliding_window}, "
                         f"cache {key.shape[2]})")
    if _fused_decode_attention_takes(query, key, attention_mask, dropout):
        valid = attention_mask[:, 0, 0, :]
        out = fused_decode_attention(query.reshape(B, H, D), key, value, valid, D ** -0.5 if scaling is None else scaling)
        return out[:, None], None
    out = F.scaled_dot_product_attention(query.reshape(B, Hkv, H // Hkv, D), key, value, attn_mask=attention_mask,
                                         dropout_p=dropout, scale=scaling)
    return out.reshape(B, H, 1, D).transpose(1, 2), None


# On CUDA the split-K op wins while the (row, KV head) pairs are few, the decode step of small
# batches; with many pairs a dense kernel already fills the GPU. Measured on an H100 (LLaMA-3.2-1B
# layer, 2176-slot cache, benchmarks/bench_decode_attention.py): batch 1 (8 pairs) 0.019 ms vs
# SDPA 0.041 ms; batch 4 (32) 0.028 vs 0.041; batch 8 (64) 0.047 vs 0.041; batch 16 (128) 0.079
# vs 0.045. LLaMA-3-8B shapes cross over at the same batch.
FUSED_DECODE_MAX_PAIRS = 32


def fused_decode_attention(query, key, value, key_valid, scale):
    """The compiled op itself, without `vpit_fast.decode_attention`'s Python argument checks: the
    step runs it once per layer, the shapes come from the model, and the op's C++ adapter checks
    them again anyway."""
    return torch.ops.vpit_fast.decode_attention(query, key, value, key_valid, float(scale))


def _fused_decode_attention_takes(query, key, attention_mask, dropout):
    many_pairs = query.shape[0] * key.shape[1] > FUSED_DECODE_MAX_PAIRS
    if query.device.type == "cuda" and many_pairs:
        return False
    return (_extension._C is not None and dropout == 0.0 and query.device.type in ("cpu", "cuda")
            and query.dtype in (torch.float32, torch.bfloat16, torch.float16) and query.shape[-1] <= MAX_HEAD_DIM
            and attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.dim() == 4
            and attention_mask.shape[1] == 1 and attention_mask.shape[2] == 1)


def _register_decode_attention():
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(DECODE_ATTENTION, decode_attention)
    AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)  # never built: the step passes its 4-D mask


class _Attention:
    """Switches an LLM's attention implementation for a block (the decode step), then restores it."""

    def __init__(self, llm, name):
        self.config, self.name = llm.config, name

    def __enter__(self):
        self.previous = self.config._attn_implementation
        self.config._attn_implementation = self.name

    def __exit__(self, *exc):
        self.config._attn_implementation = self.previous


def _cache_keyword(base_model):
    """The keyword the model's forward takes its KV cache by: ``cache`` from transformers 5.2x on
    (``past_key_values`` is deprecated there), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(base_model.forward).parameters else "past_key_values"


class StaticDecoder:
    """Fixed-shape decoding state of `generate` for one model: a static KV cache of
    ``cache_len`` slots for ``rows`` sequences (``rows = 2 * batch_size`` with guidance), static
    input / state / output buffers, and the decode step, optionally captured in a CUDA graph.

    Use: `prefill` (any prompt length up to ``cache_len - max_new_tokens``; with ``cuda_graph``
    each length's prefill is captured on first use, see `prefill`), then `step`
    up to ``max_new_tokens - 1`` times; results are in ``out_ids`` ``[B, max_new_tokens]`` and
    ``out_visual`` ``[B, max_new_tokens, Dv]``. `prefill` resets the state, so a decoder (and its
    graph) serves any number of batches of the same shape. ``compile_step=True`` compiles the
    step's model work (`_model_step`) with ``torch.compile`` on its first step (the capture's
    warm-up with ``cuda_graph=True``).
    """

    def __init__(self, model, batch_size, cache_len, sampling, eos_ids, generator=None, cuda_graph=False,
                 compile_step=False, fused_layers="auto"):
        from transformers import StaticCache

        llm, cfg = model.llm, model.config
        weight = llm.get_input_embeddings().weight
        device, dtype = weight.device, weight.dtype
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device}")
        if cuda_graph and generator is not None and sampling.temperature > 0:
            raise ValueError("cuda_graph=True samples with the default CUDA generator (seed it with "
                             "torch.manual_seed); a custom generator cannot be captured")
        self.model, self.sampling, self.generator = model, sampling, generator
        self.batch_size, self.cache_len = batch_size, cache_len
        self.rows = batch_size * (1 if sampling.cfg_scale is None else 2)
        text = llm.config.get_text_config()
        self.cache = StaticCache(config=llm.config, max_cache_len=cache_len)
        self.cache_kwargs = {_cache_keyword(llm.base_model): self.cache}
        if any(getattr(layer, "is_sliding", False) for layer in self.cache.layers):
            raise ValueError("generation supports full-attention layers only; this model has sliding-window layers "
                             f"(window {getattr(text, 'sliding_window', None)}) shorter than the cache ({cache_len})")
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.cache.early_initialization(self.rows, kv_heads, head_dim, dtype, device)
        _register_decode_attention()
        self.fused_layers_option = fused_layers
        self.fused_layers = _fused_layers(model.llm, self.cache, self.rows, device, fused_layers)

        R, B, H, Dv, steps = self.rows, batch_size, weight.shape[1], cfg.visual_dim, sampling.max_new_tokens
        self.embeds = torch.zeros(R, 1, H, dtype=dtype, device=device)
        self.positions = torch.zeros(R, 1, dtype=torch.int64, device=device)
        self.key_valid = torch.zeros(R, cache_len, dtype=torch.bool, device=device)
        self.cursor = torch.zeros(1, dtype=torch.int64, device=device)  # cache slot of the next input
        self.generated = torch.zeros((), dtype=torch.int64, device=device)
        self.mode = torch.zeros(B, dtype=torch.int64, device=device)
        self.visual_count = torch.zeros(B, dtype=torch.int64, device=device)
        self.images_left = torch.zeros(B, dtype=torch.int64, device=device)
        self.out_ids = torch.zeros(B, steps, dtype=torch.int64, device=device)
        self.out_visual = torch.zeros(B, steps, Dv, dtype=dtype, device=device)
        self.text_bias = _text_bias(model, model.heads.lm_head.weight.shape[0], device)
        self.eos_ids = torch.tensor(eos_ids, dtype=torch.int64, device=device)
        self.eos_tuple = tuple(eos_ids)
        pad_id = model.tokenizer.pad_token_id
        self.pad_id = eos_ids[0] if pad_id is None else pad_id
        self.no_text = torch.zeros(B, dtype=torch.int64, device=device)  # an image-run step's text ids
        self.graph = None
        self.image_run_graph = None  # the step without LM head and sampling (see `image_run_steps`)
        self.prefill_graphs = {}  # prompt length -> (graph, input buffers), or None: not capturable
        # Random draws stay eager: dynamo cannot trace a torch.Generator, and the compiled draw
        # would come from another random stream than the eager step's.
        self.sample_in_step = not compile_step or sampling.temperature == 0
        self.compile_step = compile_step
        self.model_step = self._model_step
        if compile_step:
            # Fixed shapes (dynamic=False) and no inductor CUDA graphs: the whole step is captured
            # in our own graph. fullgraph: a graph break would leave the step half eager, silently.
            self.model_step = torch.compile(self._model_step, dynamic=False, fullgraph=True)
        if cuda_graph:
            self._capture()

    @property
    def key(self):
        """What a reused decoder must match (see `_decoder`)."""
        return _decoder_key(self.model, self.batch_size, self.cache_len, self.sampling, self.eos_tuple,
                            self.compile_step, self.fused_layers_option)

    def reset(self):
        self.cache.reset()
        for buffer in (self.embeds, self.positions, self.key_valid, self.cursor, self.generated, self.mode,
                       self.visual_count, self.images_left, self.out_ids):
            buffer.zero_()

    # ---- the two phases ----------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, embeds, valid, positions, mode, images_left):
        """Runs the prompts and emits the first token. With ``cuda_graph`` the prefill of each
        prompt length is captured too (on its first use) and replayed: an eager prefill of a
        1B model is bound by launching transformers' kernels (32 ms for 13.5 ms of GPU work at
        2048 tokens, benchmarks/RESULTS.md).

        embeds: ``[R, T, H]``; valid: ``[R, T]`` bool (left padding False); positions: ``[R, T]``
        int64; mode, images_left: ``[B]`` int64 initial state. Returns None.
        """
        R, T, _ = embeds.shape
        if R != self.rows or T + self.sampling.max_new_tokens > self.cache_len:
            raise ValueError(f"this decoder holds {self.rows} rows of {self.cache_len} slots; got {R} prompts of "
                             f"{T} tokens for {self.sampling.max_new_tokens} new tokens")
        self.reset()
        inputs = (embeds, valid, positions, mode, images_left)
        if self.graph is None:
            self._prefill(*inputs)
            return
        if T not in self.prefill_graphs:
            self.prefill_graphs[T] = self._capture_prefill(inputs)
        captured = self.prefill_graphs[T]
        if captured is None:  # the capture failed once: this length runs eagerly
            self._prefill(*inputs)
            return
        graph, buffers = captured
        for buffer, value in zip(buffers, inputs):
            buffer.copy_(value)
        graph.replay()

    def _prefill(self, embeds, valid, positions, mode, images_left):
        """What `prefill` runs (and captures) on a reset state."""
        T = embeds.shape[1]
        self.key_valid[:, :T] = valid
        query = torch.arange(T, device=embeds.device)[:, None]
        key = torch.arange(self.cache_len, device=embeds.device)[None, :]
        # Causal over real tokens; a padding query sees itself, so no softmax row is empty (NaN).
        mask = ((key <= query) & self.key_valid[:, None, :]) | (key == query)
        hidden = self.model.llm.base_model(inputs_embeds=embeds, attention_mask=mask[:, None], position_ids=positions,
                                           use_cache=True, **self.cache_kwargs).last_hidden_state[:, -1]
        self.cursor.fill_(T)
        self.positions.copy_(positions[:, -1:] + 1)
        self.mode.copy_(mode)
        self.images_left.copy_(images_left)
        self._emit(hidden)

    @torch.no_grad()
    def step(self, image_run=False):
        """One decode step (the CUDA graph's replay when captured). ``image_run=True`` skips the
        LM head and sampling, which only rows in text mode read: allowed for the steps that
        `image_run_steps` counts, and giving the same results there. Returns None."""
        graph = self.image_run_graph if image_run else self.graph
        if graph is not None:
            graph.replay()
        else:
            self._step(with_text=not image_run)

    def image_run_steps(self):
        """How many of the next steps no row samples text in: 0 while a row is in text mode; else
        every unfinished row is inside an image, whose remaining visual tokens and ``<image_end>``
        come without the LM head, and the fewest such steps over those rows. Reading the state
        syncs with the device. An image's 64 visual tokens and ``<image_end>`` can so skip the LM
        head (the largest weight read of a step after the layers): all 65 steps when the host
        reads the state right after ``<image_start>``, fewer when it learns of the image later."""
        modes, counts = torch.stack([self.mode, self.visual_count]).tolist()
        if TEXT in modes or IMAGE_MODE not in modes:
            return 0
        n = self.model.config.num_visual_tokens
        return min(n - count + 1 for mode, count in zip(modes, counts) if mode == IMAGE_MODE)

    def finished(self):
        """0-d bool tensor: every row is done (reading it on the host syncs)."""
        return (self.mode == DONE).all()

    # ---- what a step does (captured as is) -------------------------------------------------------

    def _step(self, with_text=True):
        with _Attention(self.model.llm, DECODE_ATTENTION):
            text, pred = self.model_step(with_text)
        self._dispatch(text, pred)

    def _model_step(self, with_text=True):
        """The step's model work (what ``compile_step`` compiles): one LLM forward for the rows'
        inputs, then `_heads`. Returns `_heads`' result."""
        self.key_valid.index_fill_(1, self.cursor, True)
        if self.fused_layers is not None:
            hidden = self.fused_layers(self.embeds[:, 0], self.positions[:, 0], self.cursor, self.key_valid)
        else:
            hidden = self.model.llm.base_model(
                inputs_embeds=self.embeds, attention_mask=self.key_valid[:, None, None, :],
                position_ids=self.positions, use_cache=True, **self.cache_kwargs).last_hidden_state[:, -1]
        self.cursor.add_(1)
        self.positions.add_(1)
        return self._heads(hidden, with_text)

    def _emit(self, hidden):
        """Heads, sampling and dispatch on the last hidden states ``[R, H]`` (the prefill's)."""
        self._dispatch(*self._heads(hidden))

    def _heads(self, hidden, with_text=True):
        """LM head (with the exclusions; skipped without ``with_text``) and vision head (with
        guidance) on the last hidden states ``[R, H]``. Returns (text ids ``[B]`` int64, or the
        ``[B, V]`` float32 logits to sample from when not ``sample_in_step``, or None without
        ``with_text``; visual predictions ``[B, Dv]``)."""
        model, cfg, s, B = self.model, self.model.config, self.sampling, self.batch_size
        cond = hidden[:B]
        text = None
        if with_text:
            logits = model.heads.lm_head(cond).float() + self.text_bias
            _exclude_by_state(logits, self.generated, self.images_left, self.eos_ids, s.min_new_tokens,
                              cfg.image_start_id)
            text = (sample_tokens(logits, s.temperature, s.top_k, s.top_p, self.generator) if self.sample_in_step
                    else logits)
        pred = model.heads.vision_head(cond)
        if s.cfg_scale is not None:
            pred = _guided(pred, model.heads.vision_head(hidden[B:]), s.cfg_scale)
        return text, pred

    def _dispatch(self, text, pred):
        """`dispatch_next_inputs` on `_heads`' result (the text logits are sampled here first when
        not ``sample_in_step``); writes the outputs at index ``generated`` and the next step's
        inputs."""
        model, cfg, s, B = self.model, self.model.config, self.sampling, self.batch_size
        if text is None:  # an image-run step: no row reads a text id
            text_ids = self.no_text
        elif self.sample_in_step:
            text_ids = text
        else:
            text_ids = sample_tokens(text, s.temperature, s.top_k, s.top_p, self.generator)
        next_embeds, next_ids, visual, mode, count, left = dispatch_next_inputs(
            self.mode, self.visual_count, self.images_left, text_ids, pred,
            model.llm.get_input_embeddings().weight, model.adapter, num_visual_tokens=cfg.num_visual_tokens,
            image_start_id=cfg.image_start_id, image_end_id=cfg.image_end_id, image_token_id=cfg.image_token_id,
            pad_id=self.pad_id, eos_ids=self.eos_ids, normalize=cfg.normalize_visual,
            impl="torch" if pred.dtype == torch.float64 else "auto")  # the compiled ops have no float64
        # Clamped so warm-up steps of a graph capture never index past the buffers.
        index = self.generated.clamp(max=s.max_new_tokens - 1).reshape(1)
        self.out_ids.index_copy_(1, index, next_ids[:, None])
        self.out_visual.index_copy_(1, index, visual[:, None].to(self.out_visual.dtype))
        self.mode.copy_(mode)
        self.visual_count.copy_(count)
        self.images_left.copy_(left)
        self.embeds.copy_(next_embeds.repeat(self.rows // B, 1)[:, None])
        self.generated.add_(1)

    def _capture(self):
        """Warms the step and the image-run step up on a side stream (cuBLAS handles, allocator,
        compilation), captures both (one memory pool: they never run at once), resets."""
        with torch.no_grad():
            _on_side_stream(lambda: [self._step(with_text) for with_text in (True, True, False, False)])
            self.reset()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step()
            self.reset()
            image_run_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(image_run_graph, pool=graph.pool()):
                self._step(with_text=False)
            self.graph, self.image_run_graph = graph, image_run_graph
            self.reset()

    def _capture_prefill(self, inputs):
        """(graph, static input buffers) of the prefill at these inputs' shapes, or None when it
        cannot be captured (a model whose forward syncs with the host) or its replay does not
        reproduce the eager prefill it was warmed up with (state, first tokens, KV cache): that
        prompt length then runs eagerly, with a warning. Leaves the state reset."""
        buffers = tuple(value.clone() for value in inputs)
        _on_side_stream(lambda: self._prefill(*buffers))
        eager = [t.clone() for t in self._prefill_state()]
        self.reset()
        graph = torch.cuda.CUDAGraph()
        problem = None
        try:
            with torch.cuda.graph(graph):
                self._prefill(*buffers)
        except RuntimeError as error:
            problem = f"it could not be captured ({error})"
        if problem is None:
            self.reset()
            graph.replay()
            if not all(_same(a, b) for a, b in zip(eager, self._prefill_state())):
                problem = "its replay differed from the eager prefill"
        self.reset()
        if problem is not None:
            warnings.warn(f"generate(cuda_graph=True): the prefill of {inputs[0].shape[1]} tokens runs eagerly: "
                          f"{problem}", RuntimeWarning, stacklevel=4)
            return None
        return graph, buffers

    def _prefill_state(self):
        """Everything a prefill writes: the decode state, the first outputs and the KV cache."""
        cache = [t for layer in self.cache.layers for t in (layer.keys, layer.values)]
        return [self.embeds, self.positions, self.key_valid, self.cursor, self.generated, self.mode, self.visual_count,
                self.images_left, self.out_ids[:, :1], self.out_visual[:, :1], *cache]


def _on_side_stream(fn):
    """Runs fn on a fresh side stream, ordered after and before the current stream's work: the
    warm-up before a CUDA-graph capture (cuBLAS handles and workspaces, allocator blocks)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)


def _same(a, b):
    """Equal integer / bool tensors; floating tensors equal up to rounding (a replayed graph runs
    the same kernels, but a library may pick another algorithm under capture)."""
    if a.is_floating_point():
        return torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-3)
    return torch.equal(a, b)


def _fused_layers(llm, cache, rows, device, option):
    """The `FusedDecodeLayers` the step runs (see `generate`'s ``fused_layers``), or None."""
    from vpit_fast.fused_decode import AUTO_MAX_ROWS, FusedDecodeLayers, unsupported_reason

    if option is False:
        return None
    reason = unsupported_reason(llm)
    if reason is None and _extension._C is None:
        reason = "vpit_fast's compiled kernels are not built"
    if reason is None and device.type not in ("cpu", "cuda"):
        reason = f"the model is on {device}"
    if option is True:
        if reason is not None:
            raise ValueError(f"fused_layers=True, but the fused decode layers cannot run this model: {reason}")
        return FusedDecodeLayers(llm, cache)
    # auto: on CUDA only where measured faster (AUTO_MAX_ROWS says); on the CPU both are ATen ops.
    if reason is not None or (device.type == "cuda" and rows > AUTO_MAX_ROWS):
        return None
    return FusedDecodeLayers(llm, cache)


# Decoders whose CUDA graph is worth keeping between calls: model -> the latest one.
_DECODERS = weakref.WeakKeyDictionary()


def release_decoders(model):
    """Drops the CUDA-graph decoder `generate` keeps for ``model`` (its KV cache and graph pool)."""
    _DECODERS.pop(model, None)


def _decoder_key(model, batch_size, cache_len, sampling, eos_ids, compile_step, fused_layers):
    weight = model.llm.get_input_embeddings().weight
    return (batch_size, cache_len, sampling, tuple(eos_ids), weight.device, weight.dtype, weight.data_ptr(),
            compile_step, fused_layers)


def _decoder(model, batch_size, cache_len, sampling, eos_ids, generator, cuda_graph, compile_step, fused_layers):
    if not cuda_graph:
        return StaticDecoder(model, batch_size, cache_len, sampling, eos_ids, generator, compile_step=compile_step,
                             fused_layers=fused_layers)
    kept = _DECODERS.get(model)
    key = _decoder_key(model, batch_size, cache_len, sampling, eos_ids, compile_step, fused_layers)
    if kept is not None and kept.key == key:
        return kept
    _DECODERS.pop(model, None)  # free the old cache before allocating a new one
    decoder = StaticDecoder(model, batch_size, cache_len, sampling, eos_ids, generator, cuda_graph=True,
                            compile_step=compile_step, fused_layers=fused_layers)
    _DECODERS[model] = decoder
    return decoder


# =============================================================================================
# Results
# =============================================================================================


def _result(model, ids, visual, eos_ids):
    """A `Generation` from one row's emitted ids ``[N]`` and visual tokens ``[N, Dv]`` (CPU)."""
    cfg, n = model.config, model.config.num_visual_tokens
    ids = ids.tolist()
    eos = set(eos_ids)
    finished = False
    for i, token in enumerate(ids):
        if token in eos:
            ids, visual, finished = ids[:i + 1], visual[:i + 1], True
            break
    images, text_ids, run = [], [], []
    for i, token in enumerate(ids):
        if token == cfg.image_token_id:
            run.append(i)
            continue
        if token == cfg.image_end_id and len(run) == n:
            images.append(visual[run[0]:run[-1] + 1].clone())
            text_ids.append(cfg.image_token_id)
        run = []
        if token not in (cfg.image_start_id, cfg.image_end_id) and token not in eos:
            text_ids.append(token)
    text = model.tokenizer.decode(text_ids, skip_special_tokens=False).strip()
    return Generation(text=text, token_ids=torch.tensor(ids, dtype=torch.int64), visual_tokens=images,
                      finished=finished)


class _EvalMode:
    """Puts a module in eval mode for a block and restores its previous mode."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.was_training = self.module.training
        self.module.eval()

    def __exit__(self, *exc):
        self.module.train(self.was_training)


# =============================================================================================
# Public entry points
# =============================================================================================


def start_decoding(model, prompts, images=None, *, visual_tokens=None, max_new_tokens=256, min_new_tokens=0,
                   temperature=0.0, top_k=0, top_p=1.0, max_images=None, cfg_scale=None, response_prefix=None,
                   eos_token_ids=None, generator=None, cuda_graph=False, compile_step=False, fused_layers="auto"):
    """The first half of `generate`: encodes the prompts, builds (or reuses) a `StaticDecoder`
    and runs its prefill, which emits the first token. Call ``decoder.step()`` up to
    ``max_new_tokens - 1`` times for the rest (benchmarks and custom loops do; the model should
    be in eval mode). Same arguments as `generate`; returns the decoder."""
    sampling = _check_sampling(max_new_tokens, min_new_tokens, temperature, top_k, top_p, max_images, cfg_scale)
    eos_ids = _eos_ids(model, eos_token_ids)
    if not isinstance(compile_step, bool):
        raise ValueError(f"compile_step must be a bool, got {compile_step!r}")
    if fused_layers not in ("auto", True, False):
        raise ValueError(f'fused_layers must be "auto", True or False, got {fused_layers!r}')
    device = model.llm.get_input_embeddings().weight.device
    with torch.no_grad():
        cond, uncond = _encode_all(model, prompts, images, visual_tokens, response_prefix, cfg_scale)
        embeds, valid, positions = _left_padded(model, cond + (uncond or []), device, PROMPT_LEN_MULTIPLE)
        length = embeds.shape[1] + max_new_tokens
        cache_len = -(-length // CACHE_LEN_MULTIPLE) * CACHE_LEN_MULTIPLE
        decoder = _decoder(model, len(cond), cache_len, sampling, eos_ids, generator, cuda_graph, compile_step,
                           fused_layers)
        mode, images_left = _initial_state(model, cond, sampling, device)
        decoder.prefill(embeds, valid, positions, mode, images_left)
    return decoder


def generate(model, prompts, images=None, *, visual_tokens=None, max_new_tokens=256, min_new_tokens=0,
             temperature=0.0, top_k=0, top_p=1.0, max_images=None, cfg_scale=None, response_prefix=None,
             eos_token_ids=None, generator=None, cuda_graph=False, compile_step=False, fused_layers="auto",
             stop_check_interval=8):
    """Generates text and images for a batch of prompts (see the module docstring).

    Args:
        model: a `VPiTModel` (any device and dtype; run in eval mode here, its mode is restored).
        prompts: a str, a conversation (list of ``{"role", "content"}``), or a list of those;
            ``<image>`` marks where each prompt image goes.
        images: per prompt, None or a list of PIL images (encoded by ``model.visual``); for a
            single prompt a plain list of images is accepted.
        visual_tokens: instead of images, per prompt None or ``[M, n, Dv]`` precomputed tokens.
        max_new_tokens: token budget per sequence (every position counts: text, ``<image_start>``,
            each visual token, ``<image_end>``).
        min_new_tokens: end-of-turn ids are excluded while fewer tokens than this were generated.
        temperature, top_k, top_p: text sampling (`sample_tokens`); temperature 0 is greedy.
        max_images: at most this many images per sequence (counting one a response prefix
            opens); afterwards ``<image_start>`` is excluded. None: no limit.
        cfg_scale: classifier-free guidance scale for visual tokens (an extension beyond the
            paper; see the module docstring); None runs no unconditional pass.
        response_prefix: text the assistant's turn starts with, e.g. ``"<image_start>"`` to
            start in image mode; one str for every prompt or a list (None entries: no prefix).
        eos_token_ids: end-of-turn ids (an int or a list); default the tokenizer's eos
            (``<|end|>`` for ours).
        generator: a ``torch.Generator`` on the model's device for sampling (not with cuda_graph).
        cuda_graph: capture the decode step in a CUDA graph (CUDA only). The decoder and graph are
            kept for the model and reused by calls of the same batch size, cache length (prompt
            length + budget, rounded up to 128) and sampling parameters; `release_decoders` frees it.
        compile_step: compile the decode step's model work with ``torch.compile`` (inductor):
            fused kernels, a faster step (most with cuda_graph, where launches no longer hide the
            many small kernels). The first call for each decoder shape compiles (tens of seconds
            for a 1B model); greedy ids equal the uncompiled step's up to floating-point rounding.
        fused_layers: run the decode step's decoder layers through `vpit_fast.fused_decode`
            (four fused ops plus attention per layer, the same weights and cache) instead of
            transformers' layers. ``"auto"``: when the LLM is LLaMA-family and, on CUDA, the
            step has at most `vpit_fast.fused_decode.AUTO_MAX_ROWS` rows (batch, doubled with
            guidance); True: always (an error names what the model lacks); False: never.
        stop_check_interval: steps between host checks that every sequence has finished. These
            checks (and one after the prefill) also read whether every unfinished row is inside
            an image: the steps until its end then skip the LM head and sampling
            (`StaticDecoder.image_run_steps`), with the same results.

    Returns:
        a list of `Generation`, one per prompt, in order.
    """
    if not _is_int(stop_check_interval) or stop_check_interval < 1:
        raise ValueError(f"stop_check_interval must be an int >= 1, got {stop_check_interval!r}")
    with _EvalMode(model):
        decoder = start_decoding(model, prompts, images, visual_tokens=visual_tokens, max_new_tokens=max_new_tokens,
                                 min_new_tokens=min_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 max_images=max_images, cfg_scale=cfg_scale, response_prefix=response_prefix,
                                 eos_token_ids=eos_token_ids, generator=generator, cuda_graph=cuda_graph,
                                 compile_step=compile_step, fused_layers=fused_layers)
        steps = 1
        image_run = decoder.image_run_steps() if max_new_tokens > 1 else 0
        while steps < max_new_tokens:
            if steps % stop_check_interval == 0:
                if bool(decoder.finished()):
                    break
                image_run = decoder.image_run_steps()
            decoder.step(image_run=image_run > 0)
            image_run -= 1
            steps += 1
        ids = decoder.out_ids[:, :steps].cpu()
        visual = decoder.out_visual[:, :steps].cpu()
    eos_ids = list(decoder.eos_tuple)
    return [_result(model, ids[b], visual[b], eos_ids) for b in range(decoder.batch_size)]


def generate_uncached(model, prompts, images=None, *, visual_tokens=None, max_new_tokens=256, min_new_tokens=0,
                      temperature=0.0, top_k=0, top_p=1.0, max_images=None, cfg_scale=None, response_prefix=None,
                      eos_token_ids=None, generator=None):
    """The official MetaMorph generation loop, the reference `generate` is tested against: one
    prompt at a time, no KV cache (the whole sequence re-runs for every new token), the LM head
    only in text mode and the vision head only in image mode, Python control flow per token.
    Same arguments and result as `generate` (no CUDA graph)."""
    sampling = _check_sampling(max_new_tokens, min_new_tokens, temperature, top_k, top_p, max_images, cfg_scale)
    eos_ids = _eos_ids(model, eos_token_ids)
    cfg, n = model.config, model.config.num_visual_tokens
    llm, heads = model.llm, model.heads
    table = llm.get_input_embeddings().weight
    device = table.device
    bias = _text_bias(model, heads.lm_head.weight.shape[0], device)
    results = []
    with _EvalMode(model), torch.no_grad():
        cond, uncond = _encode_all(model, prompts, images, visual_tokens, response_prefix, cfg_scale)
        for i, prompt in enumerate(cond):
            sequence = _left_padded(model, [prompt], device)[0]
            twin = _left_padded(model, [uncond[i]], device)[0] if uncond is not None else None
            in_image = int(prompt.input_ids[-1]) == cfg.image_start_id
            images_left = sampling.max_images - int(in_image)
            count = 0
            ids, visual = [], []
            for step in range(max_new_tokens):
                hidden = llm.base_model(inputs_embeds=sequence).last_hidden_state[:, -1]
                if in_image and count < n:
                    pred = heads.vision_head(hidden)
                    if twin is not None:
                        twin_hidden = llm.base_model(inputs_embeds=twin).last_hidden_state[:, -1]
                        pred = _guided(pred, heads.vision_head(twin_hidden), sampling.cfg_scale)
                    token = pred.float()
                    if cfg.normalize_visual:
                        token = F.normalize(token, dim=-1)
                    token = token.to(pred.dtype)
                    embed = model.adapter(token.to(model.adapter[0].weight.dtype)).to(table.dtype)
                    ids.append(cfg.image_token_id)
                    visual.append(token[0])
                    count += 1
                elif in_image:
                    ids.append(cfg.image_end_id)
                    visual.append(torch.zeros_like(visual[-1]))
                    embed = table[cfg.image_end_id][None]
                    in_image, count = False, 0
                else:
                    logits = heads.lm_head(hidden).float() + bias
                    if step < sampling.min_new_tokens:
                        logits[:, eos_ids] = float("-inf")
                    if images_left <= 0:
                        logits[:, cfg.image_start_id] = float("-inf")
                    token = int(sample_tokens(logits, sampling.temperature, sampling.top_k, sampling.top_p, generator))
                    ids.append(token)
                    visual.append(torch.zeros(cfg.visual_dim, dtype=table.dtype, device=device))
                    if token in eos_ids:
                        break
                    if token == cfg.image_start_id:
                        in_image, images_left = True, images_left - 1
                    embed = table[token][None]
                sequence = torch.cat([sequence, embed[:, None]], dim=1)
                if twin is not None:
                    twin = torch.cat([twin, embed[:, None]], dim=1)
            stacked = torch.stack(visual).cpu() if visual else torch.zeros(0, cfg.visual_dim)
            results.append(_result(model, torch.tensor(ids, dtype=torch.int64), stacked, eos_ids))
    return results
