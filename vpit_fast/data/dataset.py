"""Training data for VPiT: record files -> encoded samples -> packed rows (or single samples) with
their images -> batches, through a torch DataLoader with workers.

`load_records` reads a LLaVA-style ``.json`` list or ``.jsonl`` file. An image source says where
the entries of a record's ``"image"`` list come from (`as_image_source` picks one):

- `ImageFolder(root)`: image files; entries are paths relative to ``root`` (absolute paths are
  used as they are). Missing files are found at construction, corrupt ones when loaded.
- `ImageFunction(fn)`: ``fn(key) -> PIL.Image``, e.g. `ShapesDataset.image` (images drawn on
  demand; there is nothing to check up front).
- `PrecomputedImages(tokens)`: visual tokens written by `VisualTokens.precompute`
  (`PrecomputedTokens`), or any mapping ``key -> [num_visual_tokens, Dv]`` tensor; training then
  needs no vision tower.

`VPiTDataset` does all the text work once, in the main process, at construction (encoding,
checks, packing); an item only loads and preprocesses its images, which is what DataLoader
workers are for. `make_dataloader` gives an order that depends only on (seed, epoch), can start at
any batch without loading the batches before it (exact resume), and splits every global batch
between distributed ranks.
"""

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vpit_fast.data.conversations import encode_all
from vpit_fast.data.packing import PackedBatch, collate_packed, flatten_packed, pack, pad_batch

__all__ = ["EpochBatchSampler", "ImageFolder", "ImageFunction", "ImageLoadError", "PrecomputedImages",
           "VPiTDataset", "as_image_source", "collate", "load_records", "make_dataloader"]

SHOWN = 5  # skipped records named in one warning


def load_records(path):
    """Reads records from a ``.json`` file (one JSON list) or a ``.jsonl`` file (one JSON value a
    line; blank lines are ignored). Returns the list as parsed; the records themselves are
    checked when they are encoded. Raises ValueError naming the file and line for bad JSON, a
    ``.json`` file that is not a list, or another suffix; FileNotFoundError when missing."""
    path = Path(path)
    if path.suffix not in (".json", ".jsonl"):
        raise ValueError(f"path must be a .json or .jsonl file, got {str(path)!r}")
    with path.open(encoding="utf-8") as f:
        if path.suffix == ".json":
            try:
                records = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{error.lineno}: invalid JSON ({error.msg}, column {error.colno})") from None
            if not isinstance(records, list):
                raise ValueError(f"{path}: a .json record file holds a list, got {type(records).__name__}")
            return records
        records = []
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({error.msg}, column {error.colno})") from None
        return records


# ----------------------------------------------------------------------------------------------
# Image sources: kind ("pixels" or "tokens"), where(key), exists(key), load(key)

class ImageLoadError(RuntimeError):
    """An image that could not be loaded; the message names the record and the image."""


class ImageFolder:
    """Image files under ``root``; a key is a path relative to it, or an absolute path. `load`
    returns an RGB ``PIL.Image``."""

    kind = "pixels"

    def __init__(self, root):
        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"image folder {str(self.root)!r} is not a directory")

    def where(self, key):
        """The file of ``key`` (a str path)."""
        return str(self.root / key)  # an absolute key replaces the root

    def exists(self, key):
        return os.path.isfile(self.where(key))

    def load(self, key):
        from PIL import Image

        with Image.open(self.where(key)) as image:
            return image.convert("RGB")  # decodes the whole file, so corrupt data fails here

    def __repr__(self):
        return f"ImageFolder({str(self.root)!r})"


class ImageFunction:
    """Images made by ``fn(key) -> PIL.Image`` (e.g. `ShapesDataset.image`). Every key counts as
    existing; `load` returns the image converted to RGB. ``fn`` must pickle for workers started
    with spawn (bound methods of picklable objects do)."""

    kind = "pixels"

    def __init__(self, fn):
        if not callable(fn):
            raise TypeError(f"fn must be callable (key -> PIL.Image), got {type(fn).__name__}")
        self.fn = fn

    def where(self, key):
        return repr(key)

    def exists(self, key):
        return True

    def load(self, key):
        return self.fn(key).convert("RGB")

    def __repr__(self):
        return f"ImageFunction({self.fn!r})"


class PrecomputedImages:
    """Precomputed visual tokens: a `PrecomputedTokens` or any mapping ``key -> [T, Dv]`` tensor
    (keys are looked up exactly as the records spell them). `load` returns the ``[T, Dv]``
    tensor. Attributes: ``num_tokens`` (T), ``hidden_size`` (Dv), ``dtype``."""

    kind = "tokens"

    def __init__(self, tokens):
        if not isinstance(tokens, Mapping) and not hasattr(tokens, "num_tokens"):
            raise TypeError(f"tokens must be a PrecomputedTokens or a mapping key -> tensor, "
                            f"got {type(tokens).__name__}")
        self.tokens = tokens
        if hasattr(tokens, "num_tokens"):  # PrecomputedTokens records its shape and dtype
            self.num_tokens, self.hidden_size = tokens.num_tokens, tokens.hidden_size
            self.dtype = getattr(torch, tokens.dtype)
        else:
            first = next(iter(tokens.values()), None)
            if first is None:
                raise ValueError("tokens is empty")
            if not isinstance(first, torch.Tensor) or first.dim() != 2:
                raise ValueError(f"tokens must map keys to [T, Dv] tensors, got {type(first).__name__} "
                                 f"{tuple(getattr(first, 'shape', ()))}")
            (self.num_tokens, self.hidden_size), self.dtype = first.shape, first.dtype

    def where(self, key):
        return repr(key)

    def exists(self, key):
        return key in self.tokens

    def load(self, key):
        tokens = self.tokens[key]
        if tuple(tokens.shape) != (self.num_tokens, self.hidden_size):
            raise ValueError(f"tokens have shape {tuple(tokens.shape)}, expected "
                             f"{(self.num_tokens, self.hidden_size)}")
        return tokens

    def __repr__(self):
        return f"PrecomputedImages({self.tokens!r})"


def as_image_source(images):
    """An image source from what the caller has: a source as is; a str or path: `ImageFolder`; a
    `PrecomputedTokens` or mapping: `PrecomputedImages`; a callable: `ImageFunction`."""
    if isinstance(images, (ImageFolder, ImageFunction, PrecomputedImages)):
        return images
    if isinstance(images, (str, os.PathLike)):
        return ImageFolder(images)
    if isinstance(images, Mapping) or hasattr(images, "num_tokens"):
        return PrecomputedImages(images)
    if callable(images):
        return ImageFunction(images)
    raise TypeError(f"images must be a folder path, a callable key -> PIL.Image, precomputed tokens or an "
                    f"image source, got {type(images).__name__}")


def _processed_size(processor):
    """(height, width) of the processor's output images; they must have one fixed size so items
    stack (and so a batch without images still has a [0, 3, H, W] tensor)."""
    size = dict(getattr(processor, "size", None) or {})
    crop = dict(getattr(processor, "crop_size", None) or {})
    if getattr(processor, "do_center_crop", False) and {"height", "width"} <= crop.keys():
        return crop["height"], crop["width"]
    if {"height", "width"} <= size.keys():
        return size["height"], size["width"]
    raise ValueError(f"processor must make images of one fixed size (size or crop_size with height and width, "
                     f"as SigLIP's has), got size={size}, crop_size={crop}")


def _warn_skipped(what, skipped, total):
    """One warning: how many records of ``total`` were skipped and why, the first few named."""
    shown = "; ".join(skipped[:SHOWN])
    more = f" and {len(skipped) - SHOWN} more" if len(skipped) > SHOWN else ""
    warnings.warn(f"skipped {len(skipped)} record(s) of {total} {what}: {shown}{more}", stacklevel=4)


# ----------------------------------------------------------------------------------------------
# The dataset

class VPiTDataset(Dataset):
    """Map-style dataset of packed rows (or single samples) with their images.

    At construction, in the calling process: the records are encoded (`encode_all`), records
    whose images are missing from the source and samples longer than ``budget`` are left out,
    and, in packed mode, the samples are packed into rows of ``budget`` tokens (`pack`: whole
    samples, first-fit decreasing). Each kind of problem is one counted warning naming the first
    few records (``on_error="skip"``) or an exception for the first one (``on_error="raise"``:
    `MalformedRecord`, FileNotFoundError, ValueError).

    Args:
        records: a list of record dicts, or a ``.json``/``.jsonl`` path (`load_records`).
        tokenizer: a transformers tokenizer with the image tokens (e.g. `build_tokenizer`).
        images: an image source or what `as_image_source` accepts.
        num_visual_tokens: slots per image (64); precomputed tokens must have this many.
        processor: the vision encoder's image processor (``VisualTokens(...).processor``);
            required for pixel sources, unused with precomputed tokens.
        budget: tokens per packed row, or None for plain mode (one sample per item).
        on_error: ``"skip"`` or ``"raise"``.
        seed: shuffles the samples before packing, so rows mix records of equal length from all
            over the file (first-fit decreasing keeps file order among equal lengths).
        pad_to_multiple_of: plain mode: `pad_batch` pads each batch to a multiple of this;
            flattened packed batches are padded to a multiple of this.
        flatten: packed mode: each batch is one row of its rows' real tokens (`flatten_packed`),
            so the model computes nothing for the rows' padding tails.

    Attributes: ``samples`` (the kept `Sample`s), ``rows`` (per item, the indices into
    ``samples`` in row order), ``skipped`` (``{"malformed", "missing_image", "too_long"}`` ->
    count), ``pad_id``, ``budget``, ``images`` (the source).

    Item ``i`` is a dict: ``"row"``: a `PackedBatch` (packed) or a `Sample` (plain), and its
    images in ``row.image_keys`` order: ``"pixel_values"`` float32 ``[M, 3, H, W]`` from the
    processor, or ``"visual_tokens"`` ``[M, T, Dv]`` in the precomputed dtype. An image that
    fails to load raises `ImageLoadError` naming the record id and the image's path or key.
    """

    def __init__(self, records, tokenizer, images, num_visual_tokens=64, processor=None, budget=None,
                 on_error="skip", seed=0, pad_to_multiple_of=None, flatten=False):
        if on_error not in ("skip", "raise"):
            raise ValueError(f'on_error must be "skip" or "raise", got {on_error!r}')
        if budget is not None and (not isinstance(budget, int) or budget <= 0):
            raise ValueError(f"budget must be a positive int or None, got {budget!r}")
        self.images = as_image_source(images)
        self.budget, self.pad_to_multiple_of, self.flatten = budget, pad_to_multiple_of, bool(flatten)
        self.processor = processor if self.images.kind == "pixels" else None
        if self.images.kind == "pixels":
            if processor is None:
                raise ValueError(f"processor is required to turn the images of {self.images!r} into pixel values")
            self._empty = torch.empty(0, 3, *_processed_size(processor))
        else:
            if self.images.num_tokens != num_visual_tokens:
                raise ValueError(f"the precomputed tokens have {self.images.num_tokens} tokens per image, but "
                                 f"num_visual_tokens is {num_visual_tokens}")
            self._empty = torch.empty(0, self.images.num_tokens, self.images.hidden_size, dtype=self.images.dtype)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if self.pad_id is None:  # LLaMA tokenizers have no pad token; padding is masked, any id works
            raise ValueError("the tokenizer has neither a pad token nor an eos token to pad with")

        if isinstance(records, (str, os.PathLike)):
            records = load_records(records)
        samples = encode_all(records, tokenizer, num_visual_tokens, on_error=on_error)
        self.skipped = {"malformed": len(records) - len(samples)}
        samples = self._drop(samples, "missing_image", "with missing images", self._missing_image, on_error)
        if budget is not None:
            samples = self._drop(samples, "too_long", f"longer than the budget of {budget} tokens",
                                 lambda s: f"{len(s)} tokens" if len(s) > budget else None, on_error)
        if not samples:
            raise ValueError(f"no usable records among {len(records)} (skipped: {self.skipped})")
        self.samples = samples

        if budget is None:
            self.rows = [[i] for i in range(len(samples))]
        else:
            order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
            # Pack copies whose id is their index, so every row says exactly which samples it holds
            # (record ids need not be unique); items pack their own samples again from these.
            rows = pack([replace(samples[i], id=i) for i in order], budget, self.pad_id)
            self.rows = [list(row.sample_ids) for row in rows]

    def _missing_image(self, sample):
        missing = [self.images.where(k) for k in sample.image_keys if not self.images.exists(k)]
        return ", ".join(missing) if missing else None

    def _drop(self, samples, name, what, problem, on_error):
        """Samples for which ``problem(sample)`` is None; the others are counted in
        ``skipped[name]`` and warned about, or the first raises."""
        kept, skipped = [], []
        for s in samples:
            reason = problem(s)
            if reason is None:
                kept.append(s)
            elif on_error == "raise":
                error = FileNotFoundError if name == "missing_image" else ValueError
                raise error(f"record {s.id!r}: {what.removeprefix('with ')}: {reason}")
            else:
                skipped.append(f"{s.id!r} ({reason})")
        self.skipped[name] = len(skipped)
        if skipped:
            _warn_skipped(what, skipped, len(samples))
        return kept

    def __len__(self):
        """Packed rows (packed mode) or samples (plain mode)."""
        return len(self.rows)

    def __getitem__(self, index):
        samples = [self.samples[i] for i in self.rows[index]]
        if self.budget is None:
            row = samples[0]
        else:
            (row,) = pack(samples, self.budget, self.pad_id)  # in row order already, so the same row
        loaded = [self._load(s, key) for s in samples for key in s.image_keys]
        if self.images.kind == "tokens":
            return {"row": row, "visual_tokens": torch.stack(loaded) if loaded else self._empty}
        if not loaded:
            return {"row": row, "pixel_values": self._empty}
        pixel_values = self.processor(images=loaded, return_tensors="pt")["pixel_values"]
        return {"row": row, "pixel_values": pixel_values.to(torch.float32)}

    def _load(self, sample, key):
        try:
            return self.images.load(key)
        except Exception as error:  # any decoder's error; say which record and file it was
            raise ImageLoadError(f"record {sample.id!r}: cannot load image {self.images.where(key)}: "
                                 f"{type(error).__name__}: {error}") from error

    def collate(self, items):
        """`collate` with this dataset's pad id (the DataLoader's ``collate_fn``)."""
        return collate(items, self.pad_id, self.pad_to_multiple_of, self.flatten)


def collate(items, pad_id, pad_to_multiple_of=None, flatten=False):
    """Items of `VPiTDataset` -> one batch dict: `collate_packed` of the rows (packed mode; then
    `flatten_packed` with ``flatten``) or `pad_batch` of the samples (plain mode), plus
    ``"pixel_values"`` ``[M, 3, H, W]`` or ``"visual_tokens"`` ``[M, T, Dv]``: every item's images
    concatenated, so image ``j`` is ``batch["image_keys"][j]`` at row ``image_batch_index[j]``, slot ``image_slots[j]``."""
    if not items:
        raise ValueError("collate needs at least one item")
    rows = [item["row"] for item in items]
    if isinstance(rows[0], PackedBatch):
        batch = collate_packed(rows)
        if flatten:
            batch = flatten_packed(batch, pad_id, pad_to_multiple_of)
    else:
        batch = pad_batch(rows, pad_id, pad_to_multiple_of)
    name = "visual_tokens" if "visual_tokens" in items[0] else "pixel_values"
    batch[name] = torch.cat([item[name] for item in items])
    return batch


# ----------------------------------------------------------------------------------------------
# Order, resume and distributed split

class EpochBatchSampler(Sampler):
    """The batches of item indices one rank reads in one epoch.

    The epoch's order is a permutation of ``range(num_items)`` drawn from a generator seeded with
    ``seed * 1000003 + epoch`` (the identity with ``shuffle=False``), the same on every rank.
    Global batch ``b`` is ``order[b * G:(b + 1) * G]`` with ``G = world_size * batch_size``, and
    rank ``r`` reads its items ``r, r + world_size, ...`` (an interleaved, disjoint share). With
    ``drop_last=False`` a last, short global batch is kept and topped up to a multiple of
    ``world_size`` with items from the start of the order, so every rank reads the same number of
    batches. Iteration starts at global batch ``start_batch``; the batches before it are never
    produced, so their items are never loaded. ``len()`` is the number of batches still to come,
    ``batches_per_epoch - start_batch``.
    """

    def __init__(self, num_items, batch_size, seed=0, epoch=0, start_batch=0, rank=0, world_size=1,
                 drop_last=True, shuffle=True):
        for name, value, low in (("num_items", num_items, 0), ("batch_size", batch_size, 1), ("seed", seed, 0),
                                 ("epoch", epoch, 0), ("start_batch", start_batch, 0),
                                 ("world_size", world_size, 1)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
        if shuffle:
            order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))
        else:
            order = torch.arange(num_items)
        size = world_size * batch_size
        batches = [order[start:start + size] for start in range(0, num_items - size + 1, size)]
        tail = order[len(batches) * size:]
        if not drop_last and tail.numel():
            extra = torch.arange(-tail.numel() % world_size) % num_items
            batches.append(torch.cat([tail, order[extra]]))
        self.batches_per_epoch = len(batches)
        if start_batch > self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} is past the end of the epoch "
                             f"({self.batches_per_epoch} batches)")
        self.start_batch = start_batch
        self._batches = [batch[rank::world_size].tolist() for batch in batches[start_batch:]]

    def __iter__(self):
        return iter(self._batches)

    def __len__(self):
        return len(self._batches)


def make_dataloader(dataset, batch_size, num_workers=0, seed=0, epoch=0, start_batch=0, drop_last=True,
                    rank=0, world_size=1, shuffle=True, pin_memory=None, collate_fn=None):
    """A DataLoader over ``dataset`` (a `VPiTDataset`) in the order of `EpochBatchSampler`.

    Args:
        batch_size: items per batch on this rank (rows in packed mode, samples in plain mode).
        num_workers: worker processes that load and preprocess images (0: in this process); the
            batches are the same for any number of workers.
        seed, epoch: the order is a function of these only.
        start_batch: the first global batch to read, e.g. the count already consumed when a run
            is resumed; earlier batches are not loaded.
        drop_last: drop the last, short global batch (see `EpochBatchSampler` for keeping it).
        rank, world_size: this process's share of each global batch of ``world_size *
            batch_size`` items (interleaved; every rank must pass the same other arguments).
        shuffle: False reads the items in dataset order.
        pin_memory: page-locked batches for fast host-to-GPU copies; default: when CUDA is
            available.
        collate_fn: default ``dataset.collate``.

    Returns:
        a DataLoader yielding `collate` dicts. ``len(loader)`` is the number of batches this
        rank still reads this epoch: ``len(dataset) // (world_size * batch_size) - start_batch``
        with ``drop_last`` (rounded up without it). Workers are not persistent: each epoch's
        loader starts its own. Iterating it never draws from the global torch RNG.
    """
    sampler = EpochBatchSampler(len(dataset), batch_size, seed=seed, epoch=epoch, start_batch=start_batch,
                                rank=rank, world_size=world_size, drop_last=drop_last, shuffle=shuffle)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    # Its own generator: starting an iterator draws the workers' base seed, which would otherwise
    # come from (and advance) the global torch RNG that a resumed run restores before its loader.
    generator = torch.Generator().manual_seed(seed * 1000003 + epoch * 7919 + rank)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn if collate_fn is not None else dataset.collate,
                      pin_memory=pin_memory, persistent_workers=False, generator=generator)
