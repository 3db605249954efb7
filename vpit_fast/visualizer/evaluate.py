"""Measuring a visualizer on the shapes: decode the TRUE visual tokens of held-out pictures of one
shape and check (`vpit_fast.visualizer.check`) that the pictures show the right kind and colour.

    python -m vpit_fast.visualizer.evaluate --visualizer runs/tiny/visualizer --encoder runs/tiny/export

The held-out scenes (`held_out_keys`) are single still shapes that `vpit-train-visualizer` on the
shapes never trains on (the same fixed choice for the same count and seed), so a right picture
means the visualizer reads kind and colour from tokens it has not seen. The same check on the
ground-truth renders at the visualizer's resolution shows what the checker itself gets right.
"""

import argparse
import json
import random
import sys
from pathlib import Path

import torch

from vpit_fast.data.shapes import COLORS, SHAPES, key_to_scene, render
from vpit_fast.visualizer.check import score, single_shape_keys

__all__ = ["evaluate_visualizer", "held_out_keys", "main", "truth"]


def held_out_keys(count=72, seed=0):
    """``count`` image keys of single still shapes, spread evenly over the 24 (kind, colour)
    pairs (``count // 24`` size-and-position scenes of each, drawn by ``seed``), in a fixed order.
    ``count`` must be a multiple of 24 between 0 and 240."""
    pairs = len(SHAPES) * len(COLORS)
    if count % pairs or not 0 <= count <= 240:
        raise ValueError(f"count must be a multiple of {pairs} in [0, 240], got {count}")
    rng = random.Random(f"vpit-visualizer-check/{seed}")
    keys = single_shape_keys()
    per_pair = len(keys) // pairs  # 10: 2 sizes x 5 positions, consecutive in `single_shape_keys`
    chosen = []
    for start in range(0, len(keys), per_pair):
        chosen += rng.sample(keys[start:start + per_pair], count // pairs)
    return chosen


def truth(key):
    """(kind, colour) of the single shape of ``key``."""
    shape = key_to_scene(key).shapes[0]
    return shape.kind, shape.color


@torch.no_grad()
def evaluate_visualizer(visualizer, tokens, keys, steps=50, seed=0, batch_size=64, progress=True):
    """Decodes ``tokens`` (``[N, T, Dv]``, the true tokens of ``keys``) and checks every picture.

    Returns:
        (`score`'s dict over the pictures, plus ``truth_<kind|color|both>``: the checker on the
        ground-truth renders at the visualizer's resolution; the list of pictures (PIL)).
    """
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    pictures = []
    for start in tqdm(range(0, len(keys), batch_size), desc="check", unit="batch", disable=not progress):
        pictures += visualizer.decode(tokens[start:start + batch_size], steps=steps, generator=generator)
    truths = [truth(k) for k in keys]
    result = score(pictures, truths)
    ground = score([render(k, visualizer.image_size) for k in keys], truths)
    result.update({f"truth_{k}": ground[k] for k in ("kind", "color", "both")})
    return result, pictures


def format_result(result):
    """One line: accuracies against chance."""
    return (f"kind {result['kind']:.3f} (chance {result['chance_kind']:.3f}), colour {result['color']:.3f} "
            f"(chance {result['chance_color']:.3f}), both {result['both']:.3f} (chance {result['chance_both']:.3f}) "
            f"on {result['count']} held-out pictures; ground-truth renders: kind {result['truth_kind']:.3f}, "
            f"colour {result['truth_color']:.3f}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vpit_fast.visualizer.evaluate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--visualizer", required=True, help="a Visualizer directory (or a training run's out_dir)")
    parser.add_argument("--encoder", required=True,
                        help="the tokens' encoder: a VPiT export directory, an encoder preset or a SigLIP path")
    parser.add_argument("--count", type=int, default=72, help="held-out scenes (a multiple of 24)")
    parser.add_argument("--holdout-seed", type=int, default=0, help="the training run's shapes_seed")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--seed", type=int, default=0, help="sampling noise")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)

    from vpit_fast.visualizer.data import load_encoder
    from vpit_fast.visualizer.model import Visualizer

    visualizer = Visualizer.from_pretrained(args.visualizer)
    encoder = load_encoder(args.encoder)
    keys = held_out_keys(args.count, args.holdout_seed)
    size = encoder.tower.config.image_size
    tokens = encoder.encode_images([render(k, size) for k in keys])
    result, _ = evaluate_visualizer(visualizer, tokens, keys, steps=args.steps, seed=args.seed)
    print(format_result(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
