"""Does a picture show the asked shape in the asked colour? A checker for pictures of one shape of
the procedural shapes dataset (`vpit_fast.data.shapes`), at any resolution.

    colour  every pixel takes the nearest colour of the palette (the white background and the six
            named colours, which the dataset draws exactly, without anti-aliasing); the picture's
            colour is the most frequent non-background one.
    kind    the non-background pixels form the picture's mask; its kind is that of the reference
            mask (every kind at every size the dataset draws, rendered at the picture's resolution)
            with the highest intersection over union at the best shift (one correlation per
            reference), so where the shape is does not matter.

A picture with no non-background pixel shows nothing: kind and colour are None (never right).
Made for pictures of one shape (what "Generate an image of a red circle" asks for); with two
shapes the colour is the larger area's and the kind the best single-shape match.

Public API:
    check_picture   -- picture -> `PictureCheck` (kind, colour, IoU of the best match)
    score           -- pictures and their (kind, colour) truths -> accuracies
    parse_request   -- "Generate an image of a red circle" -> ("circle", "red")
    single_shape_keys -- image keys of every single still shape (the reference scenes)
"""

import itertools
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from vpit_fast.data.shapes import BACKGROUND, COLORS, POSITIONS, SHAPES, SIZES, Scene, Shape, render, scene_to_key

__all__ = ["PictureCheck", "check_picture", "parse_request", "score", "single_shape_keys"]

# Index 0 is the background; 1.. are the named colours in `COLORS` order.
PALETTE_NAMES = (None, *COLORS)
PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)  # [7, 3]


@dataclass(frozen=True)
class PictureCheck:
    """What a picture shows: ``kind`` (one of `SHAPES`) and ``color`` (one of `COLORS`), both
    None for a blank picture; ``iou`` of the picture's mask with the best reference mask (1.0:
    an exact single-shape render); ``pixels``: how many pixels are not background."""

    kind: str | None
    color: str | None
    iou: float
    pixels: int

    def shows(self, kind=None, color=None):
        """True when the picture shows ``kind`` and ``color`` (None: not asked)."""
        return (kind is None or self.kind == kind) and (color is None or self.color == color)


def single_shape_keys():
    """The image key of every single still shape: kinds x colours x sizes x positions (240)."""
    return [scene_to_key(Scene((Shape(k, c, s, p),))) for k, c, s, p in itertools.product(SHAPES, COLORS, SIZES,
                                                                                           POSITIONS)]


# Reference shapes: every kind at every size the dataset draws (small, large, and large in a 2x
# close-up), each at a few sub-pixel phases, since at 16-32 pixels the rasterisation of a small
# shape changes with where exactly its centre falls.
_SCALES = (("small", None), ("large", None), ("large", "center"))
_PHASES = (0.0, 1 / 3, 2 / 3)


@lru_cache(maxsize=8)
def _reference_masks(side):
    """(kinds ``[R]`` as indices into `SHAPES`, float32 masks ``[R, 1, k, k]``): one centred shape
    of every kind, scale and sub-pixel phase drawn at ``side`` pixels (the colour does not change a
    mask), all cropped to the same ``k x k`` box around the largest."""
    kinds, masks = [], []
    for kind, (size, zoom), dx, dy in itertools.product(SHAPES, _SCALES, _PHASES, _PHASES):
        # A close-up doubles every offset, so halve it to keep the same sub-pixel phase.
        per_mille = [round(1000 * d / side / (2 if zoom else 1)) for d in (dx, dy)]
        scene = Scene((Shape(kind, "red", size, "center", tuple(per_mille)),), zoom=zoom)
        kinds.append(SHAPES.index(kind))
        masks.append((np.asarray(render(scene, side)) != BACKGROUND).any(-1))
    masks = np.stack(masks)
    rows, cols = np.nonzero(masks.any(0))
    box = masks[:, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    return np.array(kinds), torch.from_numpy(box.astype(np.float32))[:, None]


def _best_match(mask):
    """(kind index, IoU) of the reference that overlaps ``mask`` (bool ``[S, S]``) best at any
    shift: the intersections at every relative shift are one correlation (conv2d) per reference,
    so where the shape is does not matter."""
    kinds, references = _reference_masks(mask.shape[0])
    k = references.shape[-1]
    picture = torch.from_numpy(mask.astype(np.float32))[None, None]
    inter = F.conv2d(picture, references, padding=k - 1)[0]  # [R, S + k - 1, S + k - 1]
    union = float(mask.sum()) + references.sum((1, 2, 3))[:, None, None] - inter
    iou = (inter / union).flatten(1).amax(1)  # [R]
    best = int(iou.argmax())
    return int(kinds[best]), float(iou[best])


def _pixels(picture):
    """A PIL image, or a uint8 ``[S, S, 3]`` array -> float32 ``[S, S, 3]`` in 0..255."""
    pixels = np.asarray(picture.convert("RGB") if hasattr(picture, "convert") else picture)
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] != pixels.shape[1]:
        raise ValueError(f"picture must be a square RGB image ([S, S, 3]), got shape {pixels.shape}")
    return pixels.astype(np.float32)


def check_picture(picture):
    """Classifies one square RGB picture (PIL or uint8 ``[S, S, 3]``). Returns a `PictureCheck`."""
    pixels = _pixels(picture)
    side = pixels.shape[0]
    # Nearest palette entry of every pixel: [S*S, 7] squared distances -> [S*S] labels.
    labels = ((pixels.reshape(-1, 1, 3) - PALETTE[None]) ** 2).sum(-1).argmin(1)
    mask = labels > 0
    count = int(mask.sum())
    if count == 0:
        return PictureCheck(None, None, 0.0, 0)
    color = PALETTE_NAMES[int(np.bincount(labels[mask], minlength=len(PALETTE)).argmax())]
    kind, iou = _best_match(mask.reshape(side, side))
    return PictureCheck(SHAPES[kind], color, iou, count)


def score(pictures, truths):
    """Accuracies of ``pictures`` against ``truths`` (one ``(kind, colour)`` per picture).
    Returns a dict: ``kind``, ``color``, ``both`` (fractions right), ``count``, and the chance
    levels of a uniform guess (``chance_kind`` 1/4, ``chance_color`` 1/6, ``chance_both`` 1/24)."""
    pictures, truths = list(pictures), list(truths)
    if len(pictures) != len(truths) or not pictures:
        raise ValueError(f"need one (kind, colour) truth per picture and at least one picture, "
                         f"got {len(pictures)} pictures and {len(truths)} truths")
    checks = [check_picture(p) for p in pictures]
    kind = [c.kind == k for c, (k, _) in zip(checks, truths)]
    color = [c.color == col for c, (_, col) in zip(checks, truths)]
    n = len(checks)
    return {"kind": sum(kind) / n, "color": sum(color) / n, "both": sum(a and b for a, b in zip(kind, color)) / n,
            "count": n, "chance_kind": 1 / len(SHAPES), "chance_color": 1 / len(COLORS),
            "chance_both": 1 / (len(SHAPES) * len(COLORS))}


def parse_request(prompt):
    """The (kind, colour) a prompt asks for, from its words: ``"Generate an image of a red
    circle"`` -> ``("circle", "red")``; None for what it does not name (or names twice
    differently)."""
    words = re.findall(r"[a-z]+", prompt.lower())
    kinds = {w for w in words if w in SHAPES}
    colors = {w for w in words if w in COLORS}
    return (kinds.pop() if len(kinds) == 1 else None), (colors.pop() if len(colors) == 1 else None)

