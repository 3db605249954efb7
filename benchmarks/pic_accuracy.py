"""In-distribution picture accuracy of a shapes run: does generation give the asked shape?

    python benchmarks/pic_accuracy.py --checkpoint runs/tiny/export [--visualizer runs/tiny/visualizer]
        [--count 96] [--cfg 1.5 2 3] [--prompts train|short] [--pipeline 24]

Prompts: single still shapes whose (kind, colour) pair is generated in training (not `HELD_OUT`),
with the training templates (`T2I_PROMPTS`, "a large red circle in the top left"), or with
``--prompts short`` the README's form ("Generate an image of a red circle."). Retrieval: the
generated tokens' nearest image (mean cosine over the 64 tokens) among ALL 240 single still shapes
(as `vpit_fast.train.evaluate` does over its own candidates); accuracy per attribute against
chance (kind 1/4, colour 1/6, kind+colour 1/24, all four 1/240), also by asked size. With ``--visualizer``, the first
``--pipeline`` prompts also go through the visualizer and `vpit_fast.visualizer.check`.
"""

import argparse
import itertools
import json
import random
import time

import torch
import torch.nn.functional as F

from vpit_fast.data.shapes import (COLORS, HELD_OUT, POSITIONS, SHAPES, SIZES, T2I_PROMPTS, Scene, Shape, _text,
                                   render, scene_to_key)


def prompts(count, form, seed=0, held_out=False):
    rng = random.Random(f"pic-accuracy/{seed}")
    pairs = [(k, c) for k, c in itertools.product(SHAPES, COLORS) if ((k, c) in HELD_OUT) == held_out]
    out = []
    for i in range(count):
        kind, color = pairs[i % len(pairs)]
        shape = Shape(kind, color, rng.choice(SIZES), rng.choice(POSITIONS))
        if form == "train":
            description = _text("describe", size=shape.size, color=color, kind=kind, position=shape.position)
            text = _text(rng.choice(T2I_PROMPTS), description=description)
        else:
            text = f"Generate an image of a {color} {kind}."
        out.append((text, shape))
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default="runs/tiny/export")
    p.add_argument("--visualizer", default=None)
    p.add_argument("--count", type=int, default=96)
    p.add_argument("--pipeline", type=int, default=24)
    p.add_argument("--cfg", type=float, nargs="*", default=[])
    p.add_argument("--prompts", choices=("train", "short"), default="train")
    p.add_argument("--held-out", action="store_true", help="held-out (kind, colour) pairs instead")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from vpit_fast.generation import generate
    from vpit_fast.model import VPiTModel

    torch.manual_seed(0)
    model = VPiTModel.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    n = model.config.num_visual_tokens
    image_size = 108
    keys = [scene_to_key(Scene((Shape(k, c, s, q),))) for k, c, s, q in itertools.product(SHAPES, COLORS, SIZES, POSITIONS)]
    shapes_of = [Scene((Shape(k, c, s, q),)).shapes[0] for k, c, s, q in itertools.product(SHAPES, COLORS, SIZES, POSITIONS)]
    with torch.no_grad():
        pool = F.normalize(model.visual.encode_images([render(k, image_size) for k in keys]).float(), dim=-1)
    visualizer = None
    if args.visualizer:
        from vpit_fast.visualizer import Visualizer
        visualizer = Visualizer.from_pretrained(args.visualizer)
    items = prompts(args.count, args.prompts, held_out=args.held_out)
    results = {}
    for scale in [None, *args.cfg]:
        t0 = time.time()
        right = {"kind": 0, "color": 0, "kind_color": 0, "all": 0, "with_image": 0}
        confusion = {asked: {got: 0 for got in SHAPES} for asked in SHAPES}  # asked kind -> retrieved kinds
        by_size = {size: {"count": 0, "kind": 0, "kind_color": 0} for size in SIZES}  # by asked size
        generated = []
        for start in range(0, len(items), 16):
            chunk = items[start:start + 16]
            with torch.no_grad():
                outs = generate(model, [t for t, _ in chunk], max_new_tokens=n + 24, max_images=1, cfg_scale=scale)
            for (text, shape), out in zip(chunk, outs):
                if not out.visual_tokens:
                    generated.append(None)
                    continue
                right["with_image"] += 1
                g = F.normalize(out.visual_tokens[0].float(), dim=-1)
                generated.append(out.visual_tokens[0].float())
                got = shapes_of[int((pool * g).sum(-1).mean(-1).argmax())]
                k, c = got.kind == shape.kind, got.color == shape.color
                confusion[shape.kind][got.kind] += 1
                right["kind"] += k
                right["color"] += c
                right["kind_color"] += k and c
                right["all"] += k and c and got.size == shape.size and got.position == shape.position
                by_size[shape.size]["count"] += 1
                by_size[shape.size]["kind"] += k
                by_size[shape.size]["kind_color"] += k and c
        res = {name: v / len(items) for name, v in right.items()}
        res["chance"] = {"kind": 1 / 4, "color": 1 / 6, "kind_color": 1 / 24, "all": 1 / 240}
        res["kind_confusion"] = confusion
        res["by_size"] = {size: {"count": v["count"], "kind": v["kind"] / max(v["count"], 1),
                                 "kind_color": v["kind_color"] / max(v["count"], 1)} for size, v in by_size.items()}
        if visualizer is not None and args.pipeline:
            from vpit_fast.visualizer.check import check_picture
            m = min(args.pipeline, len(items))
            idx = [i for i in range(m) if generated[i] is not None]
            pics = visualizer.decode(torch.stack([generated[i] for i in idx]), steps=50,
                                     generator=torch.Generator().manual_seed(0)) if idx else []
            pk = pc = pb = 0
            verdicts = []
            both_by_size = {size: [0, 0] for size in SIZES}  # [right, count] by asked size
            for i, pic in zip(idx, pics):
                shape = items[i][1]
                seen = check_picture(pic)
                pk += seen.kind == shape.kind
                pc += seen.color == shape.color
                pb += seen.shows(shape.kind, shape.color)
                both_by_size[shape.size][0] += seen.shows(shape.kind, shape.color)
                both_by_size[shape.size][1] += 1
                verdicts.append((items[i][0], f"{seen.color} {seen.kind}", seen.shows(shape.kind, shape.color)))
            res["pipeline"] = {"count": m, "kind": pk / m, "color": pc / m, "both": pb / m,
                               "both_by_size": {size: f"{r} of {n}" for size, (r, n) in both_by_size.items()}}
            res["pipeline_verdicts"] = verdicts
        res["seconds"] = round(time.time() - t0, 1)
        results[str(scale)] = res
        print(f"cfg={scale}: " + json.dumps({k: v for k, v in res.items() if k != "pipeline_verdicts"}), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
