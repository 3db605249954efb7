"""Conversation encoding: LLaVA/Cambrian-style records to token ids, labels and image slots.

A record is ``{"id", "image": [key, ...] (or one str, or absent), "conversations": [{"from":
"human"|"gpt", "value": "... <image> ..."}, ...]}``. Each ``<image>`` placeholder, in order of
appearance across the turns, is one entry of ``"image"``; images of ``"gpt"`` turns are generation
targets.

`encode_conversation` renders the turns with the tokenizer's chat template (its ``{% generation %}``
block marks the assistant tokens, ``return_assistant_tokens_mask=True``) and then expands every
``<image>`` token into ``<image_start>``, ``num_visual_tokens`` slot positions and ``<image_end>``.
Slot positions hold the ``<image>`` id as a placeholder; the model replaces their embeddings with
adapter outputs.

Label and shift convention (labels are *not* shifted; the model shifts): ``labels[t]`` is the token
that position ``t`` holds when it is a response token, else -100, and the hidden state at position
``t`` predicts the token at ``t + 1``. Response tokens are the assistant's text, its end-of-turn
token, and the ``<image_start>``/``<image_end>`` of response images. Visual slots always carry -100;
a target image's visual tokens are predicted by the vision head, the first one from the
``<image_start>`` position (``image_slots[i] - 1``), the last slot position predicts ``<image_end>``
through the LM head. Prompt images (human turns) are inputs only.
"""

import warnings
from dataclasses import dataclass, field

import torch

from vpit_fast.data.shapes import IMAGE
from vpit_fast.data.tokenizer import IMAGE_END, IMAGE_START

IGNORE_INDEX = -100
ROLES = {"human": "user", "gpt": "assistant"}


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
        if not isinstance(value, str) or not value.strip():
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


def encode_conversation(record, tokenizer, num_visual_tokens=64):
    """Encodes one record; returns a `Sample`. Raises `MalformedRecord` for a record without
    conversations or without a gpt turn, a role other than human/gpt, empty turn text, or a number
    of ``<image>`` placeholders other than ``len(record["image"])``. Raises ValueError when the
    tokenizer lacks the image tokens or a chat template with ``{% generation %}`` blocks."""
    record_id, messages, keys, is_target = _validate(record)
    image_id = _special_id(tokenizer, IMAGE)
    start_id, end_id = _special_id(tokenizer, IMAGE_START), _special_id(tokenizer, IMAGE_END)
    if "generation" not in (tokenizer.chat_template or ""):
        raise ValueError("the tokenizer's chat template has no {% generation %} block, so it cannot mark "
                         "assistant tokens")
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    ids = torch.tensor(out["input_ids"], dtype=torch.int64)
    response = torch.tensor(out["assistant_masks"], dtype=torch.bool)
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
