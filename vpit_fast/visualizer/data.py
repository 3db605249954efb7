"""The visualizer's training data: images paired with their visual tokens.

Images come from the procedural shapes dataset (drawn by key at any size: crisp at the
visualizer's resolution, and at the encoder's for its tokens) or from an image folder (resized
and centre-cropped). Tokens are computed once by a frozen `VisualTokens` with
`VisualTokens.precompute` (or read from an existing precomputed directory, e.g. the one a VPiT
training run wrote, so the visualizer learns exactly the tokens the model was trained on).
"""

from pathlib import Path

import torch
from torch.utils.data import Dataset

__all__ = ["IMAGE_SUFFIXES", "PairedImages", "image_source", "load_encoder", "loader_batches", "materialise",
           "random_batches", "to_unit_range"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_encoder(encoder, normalize=False):
    """The frozen `VisualTokens` named by ``encoder``: a preset of `vpit_fast.presets.ENCODERS`
    (random weights from the current torch seed, as the VPiT training loop builds it), a VPiT
    export directory (its ``encoder/`` with the model's layer, grid and normalisation), or a
    SigLIP hub name / path."""
    from vpit_fast import presets
    from vpit_fast.visual_tokens import VisualTokens

    if encoder in presets.ENCODERS:
        return VisualTokens.from_config(presets.encoder_config(encoder), normalize=normalize)
    if Path(encoder, "vpit_config.json").is_file():
        from vpit_fast.model import VPiTModel

        # The model's own loading path, so the tokens are exactly those the model predicts.
        visual = VPiTModel.load_visual(encoder, dtype=torch.float32)
        if visual is None:
            raise FileNotFoundError(f"VPiT export {encoder!r} was saved without its encoder/ directory")
        return visual
    if (encoder.startswith((".", "/")) or encoder.count("/") > 1 or Path(encoder).parent.is_dir()) \
            and not Path(encoder).exists():
        # A local path that is not there (e.g. runs/tiny/export before `vpit-train` ran): say so
        # instead of asking the hub for a repository of that name.
        raise FileNotFoundError(f"encoder {encoder!r}: no such directory (for the embedded default, run "
                                f"`vpit-train` first to write runs/tiny/export, or give encoder=tiny)")
    return VisualTokens.from_pretrained(encoder, normalize=normalize, dtype=torch.float32)


def _fit(image, size):
    """Resizes the shorter side to ``size`` (bicubic) and crops the centre square."""
    from PIL import Image

    image = image.convert("RGB")
    scale = size / min(image.size)
    if scale != 1:
        image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                             Image.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


class _ShapesImages:
    """``(key, size) -> PIL``: draws a shapes key at the asked size (picklable for workers)."""

    def __call__(self, key, size):
        from vpit_fast.data.shapes import render

        return render(key, size)


class _FolderImages:
    def __init__(self, root):
        self.root = Path(root)

    def __call__(self, key, size):
        from PIL import Image

        with Image.open(self.root / key) as image:
            return _fit(image, size)


def image_source(data, shapes_size=3000, shapes_seed=0):
    """(keys, ``draw(key, size) -> PIL RGB image``) of ``data``: ``"shapes"`` (the image keys of
    the train split of ``ShapesDataset(size=shapes_size, seed=shapes_seed)``; its records show
    every shape in every colour) or an image folder (the relative paths of its image files,
    sorted)."""
    if data == "shapes":
        from vpit_fast.data.shapes import ShapesDataset

        return ShapesDataset("train", size=shapes_size, seed=shapes_seed).image_keys(), _ShapesImages()
    root = Path(data)
    if not root.is_dir():
        raise NotADirectoryError(f'data must be "shapes" or an image folder, got {data!r} (not a directory)')
    keys = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not keys:
        raise ValueError(f"image folder {data!r} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return keys, _FolderImages(root)


class PairedImages(Dataset):
    """Item ``i``: (``[3, image_size, image_size]`` uint8 image, ``[T, Dv]`` tokens) of
    ``keys[i]``; ``tokens`` maps a key to its tokens (a `PrecomputedTokens`)."""

    def __init__(self, keys, draw, tokens, image_size):
        missing = [k for k in keys if k not in tokens]
        if missing:
            raise KeyError(f"{len(missing)} image keys have no precomputed tokens, e.g. {missing[:3]}")
        self.keys, self.draw, self.tokens, self.image_size = list(keys), draw, tokens, image_size

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, index):
        import numpy as np

        key = self.keys[index]
        pixels = np.asarray(self.draw(key, self.image_size), dtype=np.uint8)
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1), self.tokens[key]


def to_unit_range(images):
    """uint8 ``[B, 3, S, S]`` -> float32 in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def random_batches(images, tokens, batch_size, seed=0):
    """Endless batches from tensors already in memory (on the training device): a new random
    order each epoch, the last incomplete batch of an epoch dropped. Yields (images, tokens)."""
    count = images.shape[0]
    if count < batch_size:
        raise ValueError(f"the data holds {count} images, fewer than one batch of {batch_size}: "
                         f"lower batch_size or add images")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(count, generator=generator).to(images.device)
        for start in range(0, count - batch_size + 1, batch_size):
            index = order[start:start + batch_size]
            yield images[index], tokens[index]


def loader_batches(dataset, batch_size, num_workers=2, seed=0):
    """Endless shuffled batches through a DataLoader (images too many to hold in memory)."""
    from torch.utils.data import DataLoader

    if len(dataset) < batch_size:
        raise ValueError(f"the data holds {len(dataset)} images, fewer than one batch of {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=num_workers,
                        generator=generator, pin_memory=torch.cuda.is_available(),
                        persistent_workers=num_workers > 0)
    while True:
        yield from loader


def materialise(dataset, progress=True):
    """Every item of ``dataset`` stacked: (uint8 ``[N, 3, S, S]``, ``[N, T, Dv]`` tokens)."""
    from tqdm.auto import tqdm

    images = torch.empty(len(dataset), 3, dataset.image_size, dataset.image_size, dtype=torch.uint8)
    tokens = None
    for i in tqdm(range(len(dataset)), desc="images", unit="img", disable=not progress):
        image, token = dataset[i]
        if tokens is None:
            tokens = torch.empty(len(dataset), *token.shape, dtype=token.dtype)
        images[i], tokens[i] = image, token
    return images, tokens
