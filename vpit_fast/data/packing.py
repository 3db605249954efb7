"""Sequence packing and padding of encoded `Sample`s (`vpit_fast.data.conversations`).

`pack` puts whole samples into rows of a fixed token budget (greedy first-fit by decreasing length;
a sample, and so every image's token run, is never split), with position ids that restart at 0 for
each sample and ``cu_seqlens`` for varlen attention; `collate_packed` stacks packed rows for a
DataLoader, and `flatten_packed` turns such a batch into one row of its real tokens (padding-free:
varlen attention never needed the row boundaries, so the layers skip the rows' padding tails).
`pad_batch` is the plain alternative: one sample per row, right padding, an attention mask.
Labels are never shifted here (the model shifts) and are -100 on padding.
"""

from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100


@dataclass
class PackedBatch:
    """One packed row of ``budget`` tokens.

    input_ids, labels, position_ids: ``[budget]`` int64; labels -100 and position ids 0 on the
        padding after the last sample.
    cu_seqlens: ``[n_samples + 1]`` int32 boundaries of the samples (``cu_seqlens[-1]`` is the
        number of real tokens; padding is not a sequence).
    max_seqlen: the longest sample's length.
    sample_ids: the samples' ids, in row order.
    image_keys, image_slots (``[M]`` int64, first slot of each image in this row),
        image_is_target (``[M]`` bool): the samples' images, in row order.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    sample_ids: list = field(default_factory=list)
    image_keys: list = field(default_factory=list)
    image_slots: torch.Tensor = None
    image_is_target: torch.Tensor = None

    @property
    def num_tokens(self):
        """Real (non-padding) tokens in the row."""
        return int(self.cu_seqlens[-1])


def _first_fit_decreasing(lengths, budget):
    """Rows of sample indices: longest first, each into the first row with room."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep input order
    rows, room = [], []
    for i in order:
        for r, free in enumerate(room):
            if free >= lengths[i]:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(budget - lengths[i])
    return rows


def pack(samples, budget, pad_id):
    """Packs ``samples`` into rows of ``budget`` tokens by greedy first-fit decreasing; every
    sample lands in exactly one row, whole. Returns a list of `PackedBatch`. Raises ValueError
    naming the sample when one is longer than ``budget``."""
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    lengths = [len(s) for s in samples]
    for s, n in zip(samples, lengths):
        if n > budget:
            raise ValueError(f"sample {s.id!r} has {n} tokens, more than the budget of {budget}")
    out = []
    for row in _first_fit_decreasing(lengths, budget):
        input_ids = torch.full((budget,), pad_id, dtype=torch.int64)
        labels = torch.full((budget,), IGNORE_INDEX, dtype=torch.int64)
        position_ids = torch.zeros(budget, dtype=torch.int64)
        cu, keys, slots, targets, offset = [0], [], [], [], 0
        for i in row:
            s, n = samples[i], lengths[i]
            input_ids[offset:offset + n] = s.input_ids
            labels[offset:offset + n] = s.labels
            position_ids[offset:offset + n] = torch.arange(n)
            keys += list(s.image_keys)
            slots.append(s.image_slots + offset)
            targets.append(s.image_is_target)
            offset += n
            cu.append(offset)
        out.append(PackedBatch(
            input_ids=input_ids, labels=labels, position_ids=position_ids,
            cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=max(lengths[i] for i in row),
            sample_ids=[samples[i].id for i in row], image_keys=keys,
            image_slots=torch.cat(slots).to(torch.int64), image_is_target=torch.cat(targets).to(torch.bool)))
    return out


def collate_packed(batches):
    """Stacks `PackedBatch` rows (all of one budget) into a dict for a DataLoader:

    input_ids, labels, position_ids: ``[B, budget]`` int64.
    segment_ids: ``[B, budget]`` int64, the index of each token's sample within its row, -1 on
        padding (a block-diagonal attention mask is ``seg[:, :, None] == seg[:, None, :]`` and
        ``seg >= 0``, causal within the block).
    cu_seqlens: ``[S + 1]`` int32 boundaries over the flattened ``B * budget`` tokens, for varlen
        kernels: each row's samples, then the row's padding tail as one segment of its own when
        there is one (so ``cu_seqlens[-1] == B * budget``; padding only attends to padding, and
        its labels are -100).
    max_seqlen: int, the longest segment.
    sample_ids: list of B lists; image_keys: list of M; image_slots: ``[M]`` int64, slot index
        within the row; image_batch_index: ``[M]`` int64, the row; image_is_target: ``[M]`` bool.
    """
    if not batches:
        raise ValueError("collate_packed needs at least one PackedBatch")
    budget = batches[0].input_ids.numel()
    if any(b.input_ids.numel() != budget for b in batches):
        raise ValueError("every PackedBatch must have the same budget")
    segment_ids = torch.full((len(batches), budget), -1, dtype=torch.int64)
    bounds, max_seqlen = [0], 0
    for r, b in enumerate(batches):
        cu = b.cu_seqlens.to(torch.int64)
        lengths = cu[1:] - cu[:-1]
        segment_ids[r, :int(cu[-1])] = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        edges = (cu[1:] + r * budget).tolist()
        if int(cu[-1]) < budget:
            edges.append((r + 1) * budget)
        bounds += edges
        max_seqlen = max(max_seqlen, int(lengths.max()), budget - int(cu[-1]))
    return {
        "input_ids": torch.stack([b.input_ids for b in batches]),
        "labels": torch.stack([b.labels for b in batches]),
        "position_ids": torch.stack([b.position_ids for b in batches]),
        "segment_ids": segment_ids,
        "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
        "max_seqlen": max_seqlen,
        "sample_ids": [list(b.sample_ids) for b in batches],
        "image_keys": [k for b in batches for k in b.image_keys],
        "image_slots": torch.cat([b.image_slots for b in batches]).to(torch.int64),
        "image_batch_index": torch.cat([torch.full((b.image_slots.numel(),), r, dtype=torch.int64)
                                        for r, b in enumerate(batches)]),
        "image_is_target": torch.cat([b.image_is_target for b in batches]).to(torch.bool),
    }


def flatten_packed(batch, pad_id, pad_to_multiple_of=None):
    """A `collate_packed` batch as one row of its real tokens, in row order: the rows' padding tails
    are dropped, so the model computes nothing for them (samples stay whole and never attend across
    a boundary; ``cu_seqlens`` carries the boundaries as before).

    Returns a new dict of the same keys: input_ids, labels, position_ids, segment_ids ``[1, N]``
    (segment ``k`` is the k-th sample of the batch in row order; -1 on padding), cu_seqlens,
    max_seqlen, sample_ids (one list holding every row's ids), image_slots (positions in the flat
    row), image_batch_index (all 0); image_keys, image_is_target and any other entry (``visual_tokens``,
    ``pixel_values``) unchanged, so image ``j`` is still ``image_keys[j]``. N is the number of real
    tokens, rounded up to a multiple of ``pad_to_multiple_of`` with ``pad_id`` padding (a segment
    of its own, labels -100) when given.
    """
    if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
        raise ValueError(f"pad_to_multiple_of must be None or a positive int, got {pad_to_multiple_of!r}")
    if "segment_ids" not in batch or batch["segment_ids"].dim() != 2:
        raise ValueError("flatten_packed needs a collate_packed batch (with segment_ids [B, budget])")
    segment_ids = batch["segment_ids"]
    real = segment_ids >= 0
    counts = real.sum(1)
    n = int(counts.sum())
    if n == 0:
        raise ValueError("flatten_packed got a batch without real tokens")
    total = n if pad_to_multiple_of is None else -(-n // pad_to_multiple_of) * pad_to_multiple_of
    row_start = torch.cumsum(counts, 0) - counts  # where each row's tokens begin in the flat row
    segments = segment_ids.amax(1) + 1  # samples per row
    segments_before = torch.cumsum(segments, 0) - segments

    def flat(name, fill):
        out = torch.full((1, total), fill, dtype=batch[name].dtype)
        out[0, :n] = batch[name][real]
        return out

    flat_segments = torch.full((1, total), -1, dtype=torch.int64)
    flat_segments[0, :n] = (segment_ids + segments_before[:, None])[real]
    lengths = torch.bincount(flat_segments[0, :n])  # segments run 0, 1, ... in order
    bounds = [0] + torch.cumsum(lengths, 0).tolist()
    if total > n:
        bounds.append(total)
    out = dict(batch)
    out.update(
        input_ids=flat("input_ids", pad_id), labels=flat("labels", IGNORE_INDEX), position_ids=flat("position_ids", 0),
        segment_ids=flat_segments, cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        max_seqlen=max([b - a for a, b in zip(bounds[:-1], bounds[1:])], default=1),
        sample_ids=[[i for row in batch["sample_ids"] for i in row]],
        image_slots=batch["image_slots"] + row_start[batch["image_batch_index"]],
        image_batch_index=torch.zeros_like(batch["image_batch_index"]))
    return out


def pad_batch(samples, pad_id, pad_to_multiple_of=None):
    """One sample per row, right-padded to the longest (rounded up to ``pad_to_multiple_of``).
    Returns a dict: input_ids, labels (-100 on padding), position_ids (0 on padding),
    attention_mask (1 real / 0 padding): ``[B, T]`` int64; sample_ids: list of B; image_keys:
    list of M; image_slots (within the row), image_batch_index: ``[M]`` int64; image_is_target:
    ``[M]`` bool."""
    if not samples:
        raise ValueError("pad_batch needs at least one sample")
    lengths = [len(s) for s in samples]
    T = max(lengths)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    B = len(samples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.int64)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.int64)
    position_ids = torch.zeros((B, T), dtype=torch.int64)
    attention_mask = torch.zeros((B, T), dtype=torch.int64)
    for r, (s, n) in enumerate(zip(samples, lengths)):
        input_ids[r, :n], labels[r, :n] = s.input_ids, s.labels
        position_ids[r, :n] = torch.arange(n)
        attention_mask[r, :n] = 1
    return {
        "input_ids": input_ids, "labels": labels, "position_ids": position_ids,
        "attention_mask": attention_mask,
        "sample_ids": [s.id for s in samples],
        "image_keys": [k for s in samples for k in s.image_keys],
        "image_slots": torch.cat([s.image_slots for s in samples]).to(torch.int64),
        "image_batch_index": torch.cat([torch.full((s.image_slots.numel(),), r, dtype=torch.int64)
                                        for r, s in enumerate(samples)]),
        "image_is_target": torch.cat([s.image_is_target for s in samples]).to(torch.bool),
    }
