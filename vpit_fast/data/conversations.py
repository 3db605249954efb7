"""Conversation encoding: LLaVA/Cambrian-style records to token ids, labels and image slots.

A record is ``{"id", "image": [key, ...] (or one str, or absent), "conversations": [{"from":
"human"|"gpt", "value": "... <image> ..."}, ...]}``. Each ``<image>`` placeholder, in order of
appearance across the turns, is one entry of ``"image"``; images of ``"gpt"`` turns are generation
targets.

`encode_conversation` renders the turns with the tokenizer's chat template, marks the assistant
(response) tokens, and then expands every ``<image>`` token into ``<image_start>``,
``num_visual_tokens`` slot positions and ``<image_end>``. Slot positions hold the ``<image>`` id as
a placeholder; the model replaces their embeddings with adapter outputs.

Which template, and how response tokens are found:

- A template with ``{% generation %}`` blocks (ours, `vpit_fast.data.tokenizer.CHAT_TEMPLATE`):
  the blocks mark the response tokens (``return_assistant_tokens_mask=True``).
- A template without them (LLaMA-3/3.1, Qwen2 ChatML, Mistral): incremental rendering. For each
  assistant turn ``k``, ``messages[:k]`` is rendered with ``add_generation_prompt=True`` and
  ``messages[:k + 1]`` without; the tokens the longer rendering adds are the assistant's (its
  content and the template's end-of-turn token, ``<|eot_id|>`` / ``<|im_end|>`` / ``</s>``), less
  trailing tokens that decode to whitespace only (ChatML's newline after ``<|im_end|>``: template
  formatting the model never generates, as outside our ``{% generation %}`` block). This is exact
  when every rendering's token ids start the next one's (prefix property); it is checked on every
  record and a ValueError naming the tokenizer is raised when it does not hold (e.g. templates
  that rewrite earlier turns). It costs ``2 * assistant turns + 1`` renderings per record.
- A tokenizer with no chat template at all (base LLMs): the default is
  `vpit_fast.data.tokenizer.CHAT_TEMPLATE` (``<s><|user|> ... <|end|>`` /
  ``<|assistant|> ... <|end|>``, with ``{% generation %}`` blocks). Its role markers are plain
  text to a tokenizer that lacks them as tokens, so such a tokenizer should get them added as
  special tokens (like the image tokens) or a template of its own.

Label and shift convention (labels are *not* shifted; the model shifts): ``labels[t]`` is the token
that position ``t`` holds when it is a response token, else -100, and the hidden state at position
``t`` predicts the token at ``t + 1``. Response tokens are the assistant's text, its end-of-turn
token, and the ``<image_start>``/``<image_end>`` of response images. Visual slots always carry -100;
a target image's visual tokens are predicted by the vision head, the first one from the
``<image_start>`` position (``image_slots[i] - 1``), the last slot position predicts ``<image_end>``
through the LM head. Prompt images (human turns) are inputs only.
"""

import re
import warnings
from dataclasses import dataclass, field

import torch

from vpit_fast.data.shapes import IMAGE
from vpit_fast.data.tokenizer import CHAT_TEMPLATE, IMAGE_END, IMAGE_START

IGNORE_INDEX = -100
ROLES = {"human": "user", "gpt": "assistant"}
GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")  # the test transformers itself uses


class MalformedRecord(ValueError):
    """A record that cannot be encoded; ``record_id`` and ``reason`` say which and why."""

    def __init__(self, record_id, reason):
        super().__init__(f"record {record_id!r}: {reason}")
        self.record_id, self.reason = record_id, reason


@dataclass
class Sample:
    """One encoded conversation (see the module docstring for the label convention).

    input_ids: ``[T]`` int64, visual slots hold the ``<image>`` id.
    labels: ``[T]`` int64, aligned with input_ids (not shifted), -100 off the response text.
    image_keys: ``[M]`` image keys in order of appearance.
    image_slots: ``[M]`` int64, index in input_ids of each image's first slot (its ``<image_start>``
        is one before, its ``<image_end>`` ``num_visual_tokens`` after).
    image_is_target: ``[M]`` bool, the image is in a gpt turn (its visual tokens are vision-head
        targets).
    id: the record id.
    num_visual_tokens: slots per image.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    image_keys: list = field(default_factory=list)
    image_slots: torch.Tensor = None
    image_is_target: torch.Tensor = None
    id: str = None
    num_visual_tokens: int = 64

    def __len__(self):
        return self.input_ids.numel()


def _special_id(tokenizer, token):
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token} token; add it with add_special_tokens")
    return token_id


def _validate(record):
    """Returns (record id, messages in HF role/content form, image keys, per-image is-target) or
    raises MalformedRecord."""
    record_id = record.get("id", "<no id>") if isinstance(record, dict) else "<not a dict>"
    if not isinstance(record, dict):
        raise MalformedRecord(record_id, f"a record is a dict, got {type(record).__name__}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise MalformedRecord(record_id, "no conversations")
    images = record.get("image", [])
    if images is None:
        images = []
    elif isinstance(images, str):
        images = [images]
    elif not isinstance(images, (list, tuple)) or not all(isinstance(k, str) for k in images):
        raise MalformedRecord(record_id, "image must be a str or a list of str")
    messages, is_target = [], []
    for i, turn in enumerate(turns):
        role = turn.get("from") if isinstance(turn, dict) else None
        if role not in ROLES:
            raise MalformedRecord(record_id, f"turn {i} has role {role!r}, not 'human' or 'gpt'")
        value = turn.get("value")
        if not isinstance(value, str) or not (value.strip() or (role == "human" and record.get("unconditional"))):
            raise MalformedRecord(record_id, f"turn {i} has empty text")
        for token in (IMAGE_START, IMAGE_END):
            if token in value:
                raise MalformedRecord(record_id, f"turn {i} contains a literal {token}")
        is_target += [role == "gpt"] * value.count(IMAGE)
        messages.append({"role": ROLES[role], "content": value})
    if len(is_target) != len(images):
        raise MalformedRecord(record_id, f"{len(is_target)} <image> placeholders but {len(images)} images")
    if not any(m["role"] == "assistant" for m in messages):
        raise MalformedRecord(record_id, "no gpt turn (nothing to train on)")
    return record_id, messages, list(images), is_target


def chat_template(tokenizer):
    """The template string `encode_conversation` renders with: the tokenizer's own (its default
    entry when it has several), or `CHAT_TEMPLATE` when it has none."""
    if not tokenizer.chat_template:
        return CHAT_TEMPLATE
    return tokenizer.get_chat_template()


def _tokenizer_name(tokenizer):
    return f"{type(tokenizer).__name__}({getattr(tokenizer, 'name_or_path', '') or '<unnamed>'!r})"


def _render(tokenizer, template, messages, add_generation_prompt):
    return list(tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                              add_generation_prompt=add_generation_prompt)["input_ids"])


def _response_mask_by_increments(tokenizer, template, messages, record_id):
    """Token ids of the whole conversation and the per-token response mask, found by rendering
    the conversation up to each assistant turn (see the module docstring). Returns (list of ids,
    list of bool). Raises ValueError when a shorter rendering is not a prefix of a longer one."""
    ids = _render(tokenizer, template, messages, add_generation_prompt=False)
    mask = [False] * len(ids)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, template, messages[:k], add_generation_prompt=True)
        after = _render(tokenizer, template, messages[:k + 1], add_generation_prompt=False)
        checks = ((before, f"the first {k} message(s) with the generation prompt", after,
                   f"the first {k + 1} message(s)"),
                  (after, f"the first {k + 1} message(s)", ids, "the whole conversation"))
        for shorter, shorter_name, longer, longer_name in checks:
            if longer[:len(shorter)] != shorter:
                raise ValueError(
                    f"the chat template of tokenizer {_tokenizer_name(tokenizer)} has no {{% generation %}} "
                    f"blocks and is not prefix-stable (record {record_id!r}): the token ids of {shorter_name} "
                    f"do not start those of {longer_name}, so the assistant's tokens cannot be found; give "
                    f"the tokenizer a template with {{% generation %}} blocks around the assistant's tokens")
        end = len(after)
        # Whitespace after the end-of-turn token is formatting between turns, never generated.
        while end > len(before) and not tokenizer.decode([after[end - 1]]).strip():
            end -= 1
        mask[len(before):end] = [True] * (end - len(before))
    return ids, mask


def encode_conversation(record, tokenizer, num_visual_tokens=64):
    """Encodes one record; returns a `Sample`. Raises `MalformedRecord` for a record without
    conversations or without a gpt turn, a role other than human/gpt, empty turn text, or a number
    of ``<image>`` placeholders other than ``len(record["image"])``. Raises ValueError when the
    tokenizer lacks the image tokens, or when its chat template has no ``{% generation %}``
    blocks and is not prefix-stable (see the module docstring)."""
    record_id, messages, keys, is_target = _validate(record)
    image_id = _special_id(tokenizer, IMAGE)
    start_id, end_id = _special_id(tokenizer, IMAGE_START), _special_id(tokenizer, IMAGE_END)
    template = chat_template(tokenizer)
    if GENERATION_BLOCK.search(template):
        out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, response = out["input_ids"], out["assistant_masks"]
    else:
        ids, response = _response_mask_by_increments(tokenizer, template, messages, record_id)
    ids = torch.tensor(ids, dtype=torch.int64)
    response = torch.tensor(response, dtype=torch.bool)
    is_image = ids == image_id
    if int(is_image.sum()) != len(keys):
        raise MalformedRecord(record_id, f"{int(is_image.sum())} <image> tokens after tokenization but "
                                         f"{len(keys)} images")

    # Every token becomes one position, every <image> becomes start + slots + end.
    n = num_visual_tokens
    repeats = torch.where(is_image, n + 2, 1)
    input_ids = ids.repeat_interleave(repeats)
    labels = torch.where(response, ids, IGNORE_INDEX).repeat_interleave(repeats)
    starts = (torch.cumsum(repeats, 0) - repeats)[is_image]  # new index of each <image_start>
    target = torch.tensor(is_target, dtype=torch.bool)
    slots = starts[:, None] + 1 + torch.arange(n)
    input_ids[starts], input_ids[starts + n + 1] = start_id, end_id
    # start/end carry labels exactly for response images
    labels[starts] = torch.where(target, start_id, IGNORE_INDEX)
    labels[starts + n + 1] = torch.where(target, end_id, IGNORE_INDEX)
    labels[slots.reshape(-1)] = IGNORE_INDEX
    return Sample(input_ids=input_ids, labels=labels, image_keys=keys, image_slots=starts + 1,
                  image_is_target=target, id=record_id, num_visual_tokens=n)


def is_text_to_image(record):
    """True for a record whose human turns hold no image and whose gpt turns hold at least one."""
    turns = record.get("conversations") or []
    human = sum(t.get("value", "").count(IMAGE) for t in turns if t.get("from") == "human")
    gpt = sum(t.get("value", "").count(IMAGE) for t in turns if t.get("from") == "gpt")
    return human == 0 and gpt > 0


def drop_conditions(records, fraction, seed=0):
    """Condition dropout for classifier-free guidance (not in the MetaMorph paper): a fixed
    ``fraction`` of the text-to-image records (`is_text_to_image`), chosen by ``seed`` and each
    record's id, get every human message emptied, the unconditional prompt that generation's
    ``cfg_scale`` pairs each prompt with; they are marked ``"unconditional": True`` (which lets
    `encode_conversation` accept the empty turns). Returns a new list (changed records are
    copies)."""
    import random

    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    out = []
    for index, record in enumerate(records):
        rng = random.Random(f"vpit-uncond/{seed}/{record.get('id', index)}")
        if fraction > 0 and is_text_to_image(record) and rng.random() < fraction:
            turns = [{**t, "value": ""} if t.get("from") == "human" else dict(t) for t in record["conversations"]]
            record = {**record, "conversations": turns, "unconditional": True}
        out.append(record)
    return out


def encode_all(records, tokenizer, num_visual_tokens=64, on_error="skip"):
    """Encodes every record; returns a list of `Sample`. ``on_error="raise"`` re-raises the first
    `MalformedRecord`; ``"skip"`` leaves malformed records out and warns once (a UserWarning) with
    their count and the first few ids and reasons."""
    if on_error not in ("skip", "raise"):
        raise ValueError(f'on_error must be "skip" or "raise", got {on_error!r}')
    samples, skipped = [], []
    for record in records:
        try:
            samples.append(encode_conversation(record, tokenizer, num_visual_tokens))
        except MalformedRecord as error:
            if on_error == "raise":
                raise
            skipped.append(error)
    if skipped:
        shown = "; ".join(f"{e.record_id!r} ({e.reason})" for e in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        warnings.warn(f"skipped {len(skipped)} malformed record(s) of {len(samples) + len(skipped)}: "
                      f"{shown}{more}", stacklevel=2)
    return samples
