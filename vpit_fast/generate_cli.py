"""`vpit-generate`: text and images from a trained `VPiTModel` checkpoint.

    vpit-generate "Generate an image of a red circle" --checkpoint DIR [--image in.png ...]
                  [--out-dir DIR] [--visualizer DIR] [sampling options]

Prints the generated text (each generated image shows as ``<image>``) on stdout. When images were
generated, writes their visual tokens to ``OUT_DIR/visual_tokens.safetensors`` (one tensor
``visual_tokens`` ``[M, 64, Dv]``, the prompt and text in the metadata) and, with
``--visualizer``, the pictures the visualizer decodes from them as ``OUT_DIR/image_<i>.png``.
The visualizer (`vpit_fast.visualizer.Visualizer`) is imported only when asked for. With
``--check`` (for the shapes of the embedded default), every picture is classified by
`vpit_fast.visualizer.check` and compared with the kind and colour the prompt names.
"""

import argparse
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser():
    parser = argparse.ArgumentParser(prog="vpit-generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("prompt", help="the user message; <image> marks where --image pictures go")
    parser.add_argument("--checkpoint", required=True, help="a directory VPiTModel.save_pretrained wrote")
    parser.add_argument("--image", action="append", default=[], help="an input picture (repeatable)")
    parser.add_argument("--out-dir", default=".", help="where visual tokens and PNGs go (default: .)")
    parser.add_argument("--visualizer", default=None,
                        help="a visualizer checkpoint (or a vpit-train-visualizer out_dir): decode generated images "
                             "to PNG")
    parser.add_argument("--decode-steps", type=int, default=50, help="the visualizer's DDIM steps (default 50)")
    parser.add_argument("--check", action="store_true",
                        help="shapes only: say whether each picture shows the kind and colour the prompt names")
    parser.add_argument("--encoder", default=None, help="SigLIP name/path when the checkpoint has no encoder/")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--min-new-tokens", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--cfg-scale", type=float, default=None,
                        help="classifier-free guidance for visual tokens (an extension beyond the paper)")
    parser.add_argument("--response-prefix", default=None, help='text the answer starts with, e.g. "<image_start>"')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--cuda-graph", action="store_true", help="capture the decode step in a CUDA graph")
    return parser


def _load_visualizer(directory):
    """`vpit_fast.visualizer.Visualizer.from_pretrained(directory)`, or SystemExit saying why not."""
    try:
        from vpit_fast.visualizer import Visualizer
    except ImportError as error:
        raise SystemExit(f"vpit-generate: --visualizer needs vpit_fast.visualizer.Visualizer, which this "
                         f"installation does not provide ({error})") from error
    try:
        return Visualizer.from_pretrained(directory)
    except FileNotFoundError as error:
        raise SystemExit(f"vpit-generate: --visualizer: {error}") from error


def _report_checks(pictures, prompt):
    """Prints, per picture, what `vpit_fast.visualizer.check` sees against what ``prompt`` asks."""
    from vpit_fast.visualizer.check import check_picture, parse_request

    kind, color = parse_request(prompt)
    asked = " ".join(w for w in (color, kind) if w) or "nothing the checker knows"
    for i, picture in enumerate(pictures):
        seen = check_picture(picture)
        shown = " ".join(w for w in (seen.color, seen.kind) if w) or "nothing (a blank picture)"
        verdict = "" if kind is None and color is None else \
            (" -> right" if seen.shows(kind, color) else " -> wrong")
        print(f"vpit-generate: check image_{i}: shows {shown} (shape match IoU {seen.iou:.2f}); asked {asked}{verdict}",
              file=sys.stderr)


def _load_images(paths):
    from PIL import Image

    images = []
    for path in paths:
        if not Path(path).is_file():
            raise SystemExit(f"vpit-generate: --image {path}: no such file")
        images.append(Image.open(path).convert("RGB"))
    return images


def main(argv=None):
    """Runs the CLI; returns the exit code (0)."""
    args = _parser().parse_args(argv)
    from safetensors.torch import save_file

    from vpit_fast.generation import generate
    from vpit_fast.model import VPiTModel

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if not Path(args.checkpoint, "vpit_config.json").is_file():
        raise SystemExit(f"vpit-generate: --checkpoint {args.checkpoint} is not a VPiTModel directory "
                         f"(no vpit_config.json)")
    if args.check and not args.visualizer:
        raise SystemExit("vpit-generate: --check needs --visualizer (it checks the decoded pictures)")
    visualizer = _load_visualizer(args.visualizer) if args.visualizer else None  # fail before the slow part
    images = _load_images(args.image)
    model = VPiTModel.from_pretrained(args.checkpoint, dtype=dtype, device=device, encoder=args.encoder)
    if images and model.visual is None:
        raise SystemExit("vpit-generate: --image needs an encoder: the checkpoint has no encoder/ (give --encoder)")

    torch.manual_seed(args.seed)
    try:
        result = generate(model, args.prompt, [images] if images else None, max_new_tokens=args.max_new_tokens,
                          min_new_tokens=args.min_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, max_images=args.max_images, cfg_scale=args.cfg_scale,
                          response_prefix=args.response_prefix, cuda_graph=args.cuda_graph)[0]
    except ValueError as error:
        raise SystemExit(f"vpit-generate: {error}") from error
    print(result.text)
    if not result.visual_tokens:
        print("vpit-generate: no image was generated", file=sys.stderr)
        return 0

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = torch.stack(result.visual_tokens)
    path = out_dir / "visual_tokens.safetensors"
    save_file({"visual_tokens": tokens.contiguous()}, str(path), metadata={"prompt": args.prompt, "text": result.text})
    print(f"vpit-generate: wrote {tokens.shape[0]} image(s) of visual tokens to {path}", file=sys.stderr)
    if visualizer is not None:
        pictures = visualizer.decode(tokens.float(), steps=args.decode_steps,
                                     generator=torch.Generator().manual_seed(args.seed))
        for i, picture in enumerate(pictures):
            picture.save(out_dir / f"image_{i}.png")
        print(f"vpit-generate: wrote {tokens.shape[0]} PNG(s) to {out_dir}", file=sys.stderr)
        if args.check:
            _report_checks(pictures, args.prompt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
