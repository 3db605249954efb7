"""Conversation encoding (`vpit_fast.data.conversations`) and packing (`vpit_fast.data.packing`)
on the embedded default's tokenizer, with 4 visual tokens per image to keep the arrays short."""

import warnings

import pytest
import torch

from vpit_fast.data.conversations import (MalformedRecord, Sample, drop_conditions, encode_all, encode_conversation,
                                          is_text_to_image)
from vpit_fast.data.packing import PackedBatch, collate_packed, flatten_packed, pack, pad_batch
from vpit_fast.data.shapes import ShapesDataset
from vpit_fast.data.tokenizer import build_tokenizer

N = 4
IMG = ["<image_start>", *["<image>"] * N, "<image_end>"]
PROMPT = ["<s>", "<|user|>"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def record(human, gpt, images, rid="r"):
    return {"id": rid, "image": images,
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}


# (record, expected tokens, positions that carry labels, image_slots, image_is_target)
CASES = {
    "image_qa": (
        record("<image> What colour is the shape?", "Red.", ["k0"]),
        [*PROMPT, *IMG, "what", "colour", "is", "the", "shape", "?", "<|end|>", "<|assistant|>",
         "red", ".", "<|end|>"],
        [16, 17, 18], [3], [False]),
    "text_to_image": (
        record("Draw a small red circle in the center.", "Here is an image based on your request: <image>",
               "k0"),  # a single str image
        [*PROMPT, "draw", "a", "small", "red", "circle", "in", "the", "center", ".", "<|end|>", "<|assistant|>",
         "here", "is", "an", "image", "based", "on", "your", "request", ":", *IMG, "<|end|>"],
        [*range(13, 22), 22, 27, 28], [23], [True]),
    "image_editing": (
        record("<image> Make the circle blue.", "<image>", ["k0", "k1"]),
        [*PROMPT, *IMG, "make", "the", "circle", "blue", ".", "<|end|>", "<|assistant|>", *IMG, "<|end|>"],
        [15, 20, 21], [3, 16], [False, True]),
    "visual_thinking": (
        record("<image> What shape is in the image? Zoom in before you answer.", "<image> star",
               ["k0", "k1"]),
        [*PROMPT, *IMG, "what", "shape", "is", "in", "the", "image", "?", "zoom", "in", "before", "you",
         "answer", ".", "<|end|>", "<|assistant|>", *IMG, "star", "<|end|>"],
        [23, 28, 29, 30], [3, 24], [False, True]),
    "frame_prediction": (
        record("<image> <image> <image> Predict the next frame.", "<image>", ["f0", "f1", "f2", "f3"]),
        [*PROMPT, *IMG, *IMG, *IMG, "predict", "the", "next", "frame", ".", "<|end|>", "<|assistant|>", *IMG,
         "<|end|>"],
        [27, 32, 33], [3, 9, 15, 28], [False, False, False, True]),
}


@pytest.mark.parametrize("task", list(CASES))
def test_encode_exact(tok, task):
    rec, tokens, labelled, slots, target = CASES[task]
    s = encode_conversation(rec, tok, num_visual_tokens=N)
    assert isinstance(s, Sample) and s.id == "r"
    assert s.input_ids.dtype == s.labels.dtype == torch.int64 and s.labels.shape == s.input_ids.shape
    assert tok.convert_ids_to_tokens(s.input_ids.tolist()) == tokens
    expected = torch.full_like(s.input_ids, -100)
    expected[labelled] = s.input_ids[labelled]
    assert torch.equal(s.labels, expected)
    assert s.image_slots.dtype == torch.int64 and s.image_slots.tolist() == slots
    assert s.image_is_target.dtype == torch.bool and s.image_is_target.tolist() == target
    assert s.image_keys == ([rec["image"]] if isinstance(rec["image"], str) else rec["image"])
    # Every slot run is bounded by start/end, holds <image>, and never carries a label.
    for slot in slots:
        assert tokens[slot - 1] == "<image_start>" and tokens[slot + N] == "<image_end>"
        assert (s.labels[slot:slot + N] == -100).all()
    # End-of-turn labels: the assistant's <|end|> only.
    ends = [i for i, t in enumerate(tokens) if t == "<|end|>"]
    assert [i for i in ends if s.labels[i] != -100] == [ends[-1]]


def test_multi_turn_and_default_tokens(tok):
    rec = {"id": "m", "conversations": [
        {"from": "human", "value": "What shape is in the image?"}, {"from": "gpt", "value": "circle"},
        {"from": "human", "value": "<image> Zoom in."}, {"from": "gpt", "value": "<image> star"}],
        "image": ["a", "b"]}
    s = encode_conversation(rec, tok)  # 64 visual tokens
    tokens = tok.convert_ids_to_tokens(s.input_ids.tolist())
    assert "<unk>" not in tokens and len(tokens) == 21 + 2 * 66
    ends = [i for i, t in enumerate(tokens) if t == "<|end|>"]
    assert len(ends) == 4 and [s.labels[i].item() != -100 for i in ends] == [False, True, False, True]
    assert s.image_is_target.tolist() == [False, True]
    assert s.image_slots.tolist() == [15, 15 + 66 + 5]
    assert tokens[s.image_slots[1] - 1] == "<image_start>"
    labelled = [tokens[i] for i in range(len(tokens)) if s.labels[i] != -100]
    assert labelled == ["circle", "<|end|>", "<image_start>", "<image_end>", "star", "<|end|>"]
    # A text-only record may leave "image" out.
    text_only = encode_conversation({"id": "t", "conversations": rec["conversations"][:2]}, tok)
    assert text_only.image_keys == [] and text_only.image_slots.tolist() == []
    assert text_only.image_is_target.dtype == torch.bool and len(text_only) == 13


MALFORMED = [
    ({"id": "a"}, "no conversations"),
    ({"id": "b", "conversations": []}, "no conversations"),
    ({"id": "c", "conversations": [{"from": "system", "value": "hi"}, {"from": "gpt", "value": "red"}]},
     "role"),
    (record("<image> <image> What?", "red", ["k0"], rid="d"), "placeholders"),
    (record("What?", "red", ["k0"], rid="e"), "placeholders"),
    (record("  ", "red", [], rid="f"), "empty"),
    (record("What?", "", [], rid="g"), "empty"),
    ({"id": "h", "conversations": [{"from": "human", "value": "What?"}]}, "no gpt turn"),
    (record("<image_start> What?", "red", [], rid="i"), "literal"),
]


@pytest.mark.parametrize("rec,reason", MALFORMED)
def test_malformed_raises(tok, rec, reason):
    with pytest.raises(MalformedRecord, match=reason) as info:
        encode_conversation(rec, tok, num_visual_tokens=N)
    assert info.value.record_id == rec["id"]


def test_drop_conditions_empties_a_fixed_fraction_of_text_to_image_prompts(tok):
    """Condition dropout: only text-to-image records change (their user message emptied, marked
    unconditional, the response kept); the choice is fixed by the seed and the record ids; the
    empty user turn encodes as the template's empty user message, with the same labels on the
    response as the conditional record."""
    records = list(ShapesDataset(size=700, tasks=["text_to_image", "image_qa", "image_editing"]))
    dropped = drop_conditions(records, 0.2, seed=0)
    assert drop_conditions(records, 0.2, seed=0) == dropped and drop_conditions(records, 0.2, seed=1) != dropped
    assert drop_conditions(records, 0.0) == records
    changed = [(a, b) for a, b in zip(records, dropped) if a != b]
    t2i = [r for r in records if is_text_to_image(r)]
    assert len(t2i) == sum(r["task"] == "text_to_image" for r in records)
    assert all(a["task"] == "text_to_image" for a, _ in changed)
    assert 0.12 < len(changed) / len(t2i) < 0.28
    for before, after in changed:
        assert after["unconditional"] and after["conversations"][0]["value"] == ""
        assert after["conversations"][1] == before["conversations"][1] and after["image"] == before["image"]
        assert "unconditional" not in before
    before, after = changed[0]
    conditional, unconditional = (encode_conversation(r, tok, num_visual_tokens=N) for r in (before, after))
    shift = len(conditional.input_ids) - len(unconditional.input_ids)
    assert tok.convert_ids_to_tokens(unconditional.input_ids[:3].tolist()) == [*PROMPT, "<|end|>"]
    assert torch.equal(unconditional.labels, conditional.labels[shift:])
    assert torch.equal(unconditional.image_slots, conditional.image_slots - shift)
    with pytest.raises(MalformedRecord, match="empty"):  # an empty turn without the mark stays malformed
        encode_conversation({**after, "unconditional": False}, tok, num_visual_tokens=N)
    with pytest.raises(ValueError, match="fraction"):
        drop_conditions(records, 1.5)


def test_encode_all_skip_and_raise(tok):
    good = [CASES["image_qa"][0], CASES["image_editing"][0]]
    records = [good[0], *[r for r, _ in MALFORMED], good[1]]
    with pytest.warns(UserWarning) as caught:
        samples = encode_all(records, tok, num_visual_tokens=N)
    assert len(samples) == 2 and len(caught) == 1
    message = str(caught[0].message)
    assert f"skipped {len(MALFORMED)} malformed record(s) of {len(records)}" in message
    assert all(f"'{rid}'" in message for rid in "abcde") and f"and {len(MALFORMED) - 5} more" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(encode_all(good, tok, num_visual_tokens=N)) == 2
        with pytest.raises(MalformedRecord, match="'a'"):
            encode_all(records, tok, num_visual_tokens=N, on_error="raise")
    with pytest.raises(ValueError):
        encode_all(records, tok, on_error="ignore")


@pytest.fixture(scope="module")
def shape_samples(tok):
    samples = encode_all(ShapesDataset(size=50), tok, num_visual_tokens=N)
    assert len(samples) == 50
    return samples


def check_row(row, samples_by_id, budget, pad_id):
    assert isinstance(row, PackedBatch)
    for name in ("input_ids", "labels", "position_ids"):
        assert getattr(row, name).shape == (budget,) and getattr(row, name).dtype == torch.int64
    assert row.cu_seqlens.dtype == torch.int32 and len(row.cu_seqlens) == len(row.sample_ids) + 1
    cu = row.cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] <= budget
    keys, slots, targets = [], [], []
    for (a, b), sid in zip(zip(cu[:-1], cu[1:]), row.sample_ids):
        s = samples_by_id[sid]
        assert b - a == len(s)  # whole sample, never split
        assert torch.equal(row.input_ids[a:b], s.input_ids) and torch.equal(row.labels[a:b], s.labels)
        assert torch.equal(row.position_ids[a:b], torch.arange(b - a))
        keys += s.image_keys
        slots += (s.image_slots + a).tolist()
        targets += s.image_is_target.tolist()
    assert row.max_seqlen == max(b - a for a, b in zip(cu[:-1], cu[1:]))
    assert row.image_keys == keys and row.image_slots.tolist() == slots
    assert row.image_is_target.tolist() == targets
    assert (row.input_ids[cu[-1]:] == pad_id).all() and (row.labels[cu[-1]:] == -100).all()
    assert (row.position_ids[cu[-1]:] == 0).all()
    for slot in row.image_slots.tolist():  # slot runs survive packing
        assert (row.input_ids[slot:slot + N] == row.input_ids[slot]).all()


def test_pack_shapes_dataset(tok, shape_samples):
    budget, pad_id = 160, tok.pad_token_id
    rows = pack(shape_samples, budget, pad_id)
    by_id = {s.id: s for s in shape_samples}
    ids = [sid for row in rows for sid in row.sample_ids]
    assert sorted(ids) == sorted(by_id) and len(ids) == len(set(ids)) == 50  # each exactly once
    for row in rows:
        check_row(row, by_id, budget, pad_id)
    assert len(rows) < 50 and sum(r.num_tokens for r in rows) == sum(len(s) for s in shape_samples)
    # First-fit decreasing cannot leave room in an earlier row for a later (shorter) sample's row start.
    firsts = [by_id[r.sample_ids[0]] for r in rows]
    for i, row in enumerate(rows):
        for earlier in rows[:i]:
            assert budget - earlier.num_tokens < len(firsts[i])


def test_pack_small_exact(tok):
    a = encode_conversation(CASES["image_qa"][0], tok, num_visual_tokens=N)          # 19 tokens
    b = encode_conversation(CASES["image_editing"][0], tok, num_visual_tokens=N)     # 22 tokens
    b.id = "b"
    rows = pack([a, b], 48, pad_id=0)
    assert len(rows) == 1
    row = rows[0]
    assert row.sample_ids == ["b", "r"] and row.cu_seqlens.tolist() == [0, 22, 41]
    assert row.position_ids.tolist() == [*range(22), *range(19), *[0] * 7]
    assert row.image_slots.tolist() == [3, 16, 22 + 3] and row.image_is_target.tolist() == [False, True, False]
    assert len(pack([a, b], 40, pad_id=0)) == 2
    with pytest.raises(ValueError, match="'b'"):
        pack([a, b], 21, pad_id=0)


def test_collate_packed(tok, shape_samples):
    budget = 160
    rows = pack(shape_samples, budget, tok.pad_token_id)[:3]
    batch = collate_packed(rows)
    for name in ("input_ids", "labels", "position_ids", "segment_ids"):
        assert batch[name].shape == (3, budget)
    bounds = batch["cu_seqlens"].tolist()
    assert batch["cu_seqlens"].dtype == torch.int32 and bounds[0] == 0 and bounds[-1] == 3 * budget
    expected = [0]
    for r, row in enumerate(rows):
        expected += [c + r * budget for c in row.cu_seqlens.tolist()[1:]]
        if row.num_tokens < budget:
            expected.append((r + 1) * budget)
    assert bounds == expected
    for r, row in enumerate(rows):
        cu = row.cu_seqlens.tolist()
        for k, (a, b) in enumerate(zip(cu[:-1], cu[1:])):
            assert (batch["segment_ids"][r, a:b] == k).all()
        assert (batch["segment_ids"][r, cu[-1]:] == -1).all()
    assert batch["image_slots"].tolist() == [s for row in rows for s in row.image_slots.tolist()]
    assert batch["image_batch_index"].tolist() == [r for r, row in enumerate(rows) for _ in row.image_keys]
    rows_of_images = batch["input_ids"][batch["image_batch_index"], batch["image_slots"]]
    assert (rows_of_images == tok.convert_tokens_to_ids("<image>")).all()


@pytest.mark.parametrize("multiple", [None, 1, 64])
def test_flatten_packed(tok, shape_samples, multiple):
    budget, pad = 160, tok.pad_token_id
    rows = pack(shape_samples, budget, pad)[:3]
    batch = collate_packed(rows)
    batch["visual_tokens"] = torch.randn(len(batch["image_keys"]), N, 8)
    flat = flatten_packed(batch, pad, pad_to_multiple_of=multiple)
    n = sum(row.num_tokens for row in rows)
    total = n if multiple is None else -(-n // multiple) * multiple
    for name in ("input_ids", "labels", "position_ids", "segment_ids"):
        assert flat[name].shape == (1, total) and flat[name].dtype == torch.int64
    # the rows' real tokens, in row order, then padding
    assert flat["input_ids"][0, :n].tolist() == [t for row in rows for t in row.input_ids[:row.num_tokens].tolist()]
    assert flat["labels"][0, :n].tolist() == [t for row in rows for t in row.labels[:row.num_tokens].tolist()]
    assert (flat["input_ids"][0, n:] == pad).all() and (flat["labels"][0, n:] == -100).all()
    assert (flat["segment_ids"][0, n:] == -1).all() and (flat["position_ids"][0, n:] == 0).all()
    # one boundary per sample, each segment one sample, its positions counting from 0
    ids = [i for row in rows for i in row.sample_ids]
    assert flat["sample_ids"] == [ids]
    lengths = [int(n) for row in rows for n in row.cu_seqlens.diff()]
    bounds = [0] + torch.tensor(lengths).cumsum(0).tolist()
    assert flat["cu_seqlens"].dtype == torch.int32
    assert flat["cu_seqlens"].tolist() == bounds + ([total] if total > n else [])
    assert flat["max_seqlen"] == max(lengths + [total - n])
    for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        assert (flat["segment_ids"][0, a:b] == k).all()
        assert flat["position_ids"][0, a:b].tolist() == list(range(b - a))
    # images: the same order and tensors, slots now in the flat row
    assert flat["image_keys"] == batch["image_keys"] and flat["visual_tokens"] is batch["visual_tokens"]
    assert torch.equal(flat["image_is_target"], batch["image_is_target"])
    assert (flat["image_batch_index"] == 0).all()
    slots = flat["input_ids"][0, flat["image_slots"]]
    assert (slots == tok.convert_tokens_to_ids("<image>")).all()
    starts = flat["input_ids"][0, flat["image_slots"] - 1]
    assert (starts == tok.convert_tokens_to_ids("<image_start>")).all()
    # the source batch is left as it was
    assert batch["input_ids"].shape == (3, budget)


def test_flatten_packed_rejects_what_it_cannot_flatten(tok, shape_samples):
    with pytest.raises(ValueError, match="collate_packed"):
        flatten_packed(pad_batch(shape_samples[:2], tok.pad_token_id), tok.pad_token_id)
    batch = collate_packed(pack(shape_samples[:4], 160, tok.pad_token_id))
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        flatten_packed(batch, tok.pad_token_id, pad_to_multiple_of=0)


def test_pad_batch(tok, shape_samples):
    samples = shape_samples[:5]
    lengths = [len(s) for s in samples]
    batch = pad_batch(samples, tok.pad_token_id, pad_to_multiple_of=16)
    T = -(-max(lengths) // 16) * 16
    for name in ("input_ids", "labels", "position_ids", "attention_mask"):
        assert batch[name].shape == (5, T) and batch[name].dtype == torch.int64
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for r, (s, n) in enumerate(zip(samples, lengths)):
        assert torch.equal(batch["input_ids"][r, :n], s.input_ids)
        assert torch.equal(batch["labels"][r, :n], s.labels)
        assert (batch["input_ids"][r, n:] == tok.pad_token_id).all() and (batch["labels"][r, n:] == -100).all()
        assert batch["position_ids"][r, :n].tolist() == list(range(n))
    assert batch["sample_ids"] == [s.id for s in samples]
    assert batch["image_keys"] == [k for s in samples for k in s.image_keys]
    assert batch["image_batch_index"].tolist() == [r for r, s in enumerate(samples) for _ in s.image_keys]
    assert batch["image_slots"].tolist() == [x for s in samples for x in s.image_slots.tolist()]
    assert batch["image_is_target"].dtype == torch.bool
    assert pad_batch(samples, 0)["input_ids"].shape == (5, max(lengths))
