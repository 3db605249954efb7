"""Training the visualizer, top to bottom (``python -m vpit_fast.visualizer.train``).

    python -m vpit_fast.visualizer.train                          # preset "tiny": shapes, pixel space
    python -m vpit_fast.visualizer.train --preset tiny steps=3000 batch_size=256
    python -m vpit_fast.visualizer.train --preset tiny-cpu        # for runs/tiny/export, on a CPU
    python -m vpit_fast.visualizer.train --preset paper init=/models/stable-diffusion-v1-5 \\
        encoder=google/siglip-so400m-patch14-384 data=/data/images

Sections: set-up -> encoder and tokens (computed once, then the encoder is dropped) -> images ->
visualizer -> optimizer and schedule -> the loop (bf16 autocast on GPU, fp32 on CPU; condition
dropout; gradient clipping; metrics JSONL; tqdm) -> the end (save, sample grid, the check of
held-out pictures of one shape).

Presets:
    tiny    the embedded default: the tiny random-weight SigLIP (encoder "tiny") over the shapes
            images (2717 of them; 72 pictures of one shape are now kept out for the check), the
            "tiny" pixel-space visualizer at 32x32; batch 256, lr 1e-3, log warm-up 100 steps,
            linear decay over 1900. On one H100 (measured before the check existed): 18.6 steps/s
            (about 2 minutes); held-out images decode to the right shapes, colours and positions
            (pixel MSE 0.18 in [-1, 1] units). On two CPU cores: about 60 images/s.
    tiny-cpu  the embedded default's visualizer on two CPU cores: the tokens of the exported
            VPiT model's own encoder (``runs/tiny/export``: run ``vpit-train`` first), the
            "tiny-cpu" preset (24x24, spatial conditioning); batch 64, lr 2e-3, 1500 steps (about
            15 minutes on one thread; 600 steps decoded the held-out pictures' kind 0.76 of the
            time, 1500 steps 0.90); writes
            ``runs/tiny/visualizer``. Like every shapes run it keeps 72 pictures of one shape out
            of training and checks at the end that their true tokens decode to the right kind and
            colour (``check.json``; README gives the measured figures).
    paper   MetaMorph appendix A.2: Stable Diffusion 1.5 (``init`` = a local diffusers-format
            directory; random SD-1.5-shaped weights without one), SigLIP-so400m tokens, AdamW
            (0.9, 0.999), wd 0.01, log warm-up over 2000 steps to 1.1e-5, linear decay to zero
            over 12000 more, batch 2112 (33 x 64 accumulated), condition dropout 0.7 (the
            paper's "CFG level").

Not implemented: resuming an interrupted run with its optimizer state (``init`` restarts from
saved weights only), EMA weights, several GPUs.
"""

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from vpit_fast.train.metrics import GpuMonitor, MetricsLogger, progress_bar
from vpit_fast.train.optim import build_optimizer
from vpit_fast.train.overrides import apply_overrides, load_yaml_into, save_yaml
from vpit_fast.visualizer.schedule import build_scheduler

__all__ = ["TRAIN_PRESETS", "VisualizerTrainConfig", "main", "resolve_config", "train_visualizer"]


@dataclass
class VisualizerTrainConfig:
    """model: a preset of `vpit_fast.visualizer.presets` (random weights) used when ``init`` is
    empty. init: a `Visualizer.save_pretrained` directory (continue from its weights) or a
    local Stable Diffusion directory in diffusers format (``unet/``, ``vae/``).
    image_size / projector_hidden_dim: 0 keeps the preset's.
    encoder: a preset of `vpit_fast.presets.ENCODERS`, a VPiT export directory or a SigLIP name /
    path (see `vpit_fast.visualizer.data.load_encoder`). tokens_dir: an existing precomputed
    tokens directory to train on (its keys are the training images; e.g. ``runs/tiny/visual_tokens``
    of a VPiT run); empty: precompute into ``out_dir/visual_tokens`` (reused when it covers the
    images). data: ``shapes`` or an image folder. cache: hold every image and its tokens on the
    device (small data sets) instead of a DataLoader.
    steps: optimizer steps (0: ``warmup_steps + decay_steps``). batch_size * grad_accum images
    per step. sample_every: write a sample grid every so many steps (0: at the end only).
    check_count: with data=shapes, that many pictures of one shape (a multiple of 24, see
    `vpit_fast.visualizer.evaluate.held_out_keys`) are kept out of training; at the end their true
    tokens are decoded and checked for kind and colour (``check.json``; 0: no check).
    """

    model: str = "tiny"
    init: str = ""
    image_size: int = 0
    projector_hidden_dim: int = 0
    encoder: str = "tiny"
    normalize_visual: bool = False
    tokens_dir: str = ""
    data: str = "shapes"
    shapes_size: int = 3000
    shapes_seed: int = 0
    check_count: int = 72
    cache: bool = True
    num_workers: int = 4
    batch_size: int = 256
    grad_accum: int = 1
    steps: int = 0
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    warmup_steps: int = 100
    decay_steps: int = 1900
    cond_dropout: float = 0.1
    grad_clip: float = 1.0
    compile: bool = False
    seed: int = 0
    device: str = "auto"
    out_dir: str = "runs/visualizer-tiny"
    log_every: int = 10
    sample_every: int = 0
    sample_count: int = 8
    sample_steps: int = 50
    guidance_scale: float = 1.0
    progress: bool = True

    def validate(self):
        for key in ("batch_size", "grad_accum", "log_every", "sample_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("steps", "warmup_steps", "decay_steps", "image_size", "projector_hidden_dim", "sample_every",
                    "sample_count", "num_workers", "check_count"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.total_steps < 1:
            raise ValueError("steps, or warmup_steps + decay_steps, must be at least 1")
        if not 0.0 <= self.cond_dropout <= 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1], got {self.cond_dropout}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f'device must be "auto", "cpu" or "cuda", got {self.device!r}')
        return self

    @property
    def total_steps(self):
        return self.steps or self.warmup_steps + self.decay_steps


TRAIN_PRESETS = {
    "tiny": VisualizerTrainConfig(),
    # The embedded default's visualizer on two CPU cores: the tokens of the exported VPiT model's
    # own encoder (run `vpit-train` first), the small "tiny-cpu" UNet at 24x24.
    "tiny-cpu": VisualizerTrainConfig(
        model="tiny-cpu", encoder="runs/tiny/export", batch_size=64, lr=2e-3, warmup_steps=50, decay_steps=1450,
        out_dir="runs/tiny/visualizer", sample_steps=25, num_workers=0),
    "paper": VisualizerTrainConfig(
        model="sd15", encoder="google/siglip-so400m-patch14-384", data="", cache=False, num_workers=8,
        batch_size=64, grad_accum=33, lr=1.1e-5, betas=(0.9, 0.999), weight_decay=0.01, warmup_steps=2000,
        decay_steps=12000, cond_dropout=0.7, out_dir="runs/visualizer-sd15", log_every=20,
        sample_every=1000),
}


def resolve_config(preset="tiny", yaml_path=None, overrides=()):
    """The preset, then the YAML file's values, then ``key=value`` overrides; validated. Returns
    a new `VisualizerTrainConfig`."""
    if preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown visualizer training preset {preset!r}; choose one of {sorted(TRAIN_PRESETS)}")
    config = replace(TRAIN_PRESETS[preset])
    if yaml_path:
        load_yaml_into(config, yaml_path)
    apply_overrides(config, list(overrides))
    return config.validate()


def log(message):
    print(f"[vpit-train-visualizer] {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# Set-up pieces

def pick_device(name):
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but torch sees no CUDA GPU")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def precomputed_tokens(config, keys, draw, device):
    """(keys, `PrecomputedTokens`): ``config.tokens_dir`` as it is (its keys become the
    training images), or the images' tokens computed once into ``out_dir/visual_tokens`` by the
    encoder of ``config.encoder`` (reused when a previous run there covers every key)."""
    from vpit_fast.visual_tokens import load_precomputed
    from vpit_fast.visualizer.data import load_encoder

    if config.tokens_dir:
        if not Path(config.tokens_dir, "index.json").is_file():
            raise FileNotFoundError(f"tokens_dir {config.tokens_dir!r} has no index.json "
                                    f"(write one with VisualTokens.precompute)")
        tokens = load_precomputed(config.tokens_dir)
        return list(tokens.keys()), tokens
    tokens_dir = Path(config.out_dir, "visual_tokens")
    encoder = load_encoder(config.encoder, normalize=config.normalize_visual).to(device)
    size = encoder.tower.config.image_size
    if (tokens_dir / "index.json").is_file():
        tokens = load_precomputed(tokens_dir)
        # Reused only when they cover every key and this encoder remakes them (a run with another
        # encoder in the same out_dir must not train on stale tokens).
        if all(k in tokens for k in keys) and _same_tokens(encoder, tokens, keys[0], draw(keys[0], size)):
            log(f"reusing the visual tokens in {tokens_dir}")
            return keys, tokens
    log(f"encoding {len(keys)} images once into {tokens_dir}")
    tokens = encoder.precompute(keys, lambda key: draw(key, size), tokens_dir, progress=config.progress)
    return keys, tokens


def _same_tokens(encoder, tokens, key, image):
    """True when ``encoder`` turns ``image`` (the picture of ``key``) into the stored tokens."""
    fresh = encoder.encode_images([image])[0].float()
    stored = tokens[key].float()
    return fresh.shape == stored.shape and torch.allclose(fresh, stored, rtol=1e-4, atol=1e-5)


def token_source(tokens):
    """What the visualizer records about its tokens' encoder."""
    fields = ("name_or_path", "layer", "in_grid", "out_grid", "normalize", "hidden_size", "num_tokens", "dtype")
    return {"tokens_dir": tokens.out_dir, **{k: getattr(tokens, k) for k in fields}}


def build_visualizer(config, visual_dim, num_tokens, source):
    from vpit_fast.visualizer.model import CONFIG_FILE, Visualizer

    image_size = config.image_size or None
    hidden = config.projector_hidden_dim or None
    if config.init and Path(config.init, CONFIG_FILE).is_file():
        visualizer = Visualizer.from_pretrained(config.init)
        if (visualizer.visual_dim, visualizer.num_tokens) != (visual_dim, num_tokens):
            raise ValueError(f"init {config.init!r} takes [{visualizer.num_tokens}, {visualizer.visual_dim}] tokens, "
                             f"the data has [{num_tokens}, {visual_dim}]")
        return visualizer
    if config.init:
        return Visualizer.from_stable_diffusion(config.init, visual_dim, num_tokens=num_tokens,
                                                projector_hidden_dim=hidden or 2048, image_size=image_size,
                                                token_source=source)
    if config.model == "sd15":
        log("no init: the sd15 visualizer starts from random weights (give init=<local SD-1.5 directory>)")
    return Visualizer.from_preset(config.model, visual_dim, num_tokens=num_tokens, image_size=image_size,
                                  projector_hidden_dim=hidden, token_source=source)


def save_samples(visualizer, images, tokens, path, config, device):
    """Decodes ``tokens`` and writes a grid: the originals above, the pictures below. Returns the
    mean squared pixel error (images in [-1, 1]) between the two."""
    from vpit_fast.visualizer.data import to_unit_range
    from vpit_fast.visualizer.model import to_pil

    visualizer.eval()
    generator = torch.Generator().manual_seed(config.seed)
    with _autocast(device):
        decoded = visualizer.decode(tokens.to(device), steps=config.sample_steps, guidance_scale=config.guidance_scale,
                                    generator=generator, output_type="pt")
    visualizer.train()
    originals = to_unit_range(images.to(device))
    grid = torch.cat([torch.cat(list(originals), dim=2), torch.cat(list(decoded), dim=2)], dim=1)
    to_pil(grid[None])[0].save(path)
    return float((decoded - originals).pow(2).mean())


def _autocast(device):
    # bf16 on GPU; on the CPU the run stays in fp32 (CPU bf16 matmuls are slow and less exact).
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


# ----------------------------------------------------------------------------------------------
# The run

def train_visualizer(config):
    """Runs ``config`` (a `VisualizerTrainConfig`). Returns a dict: ``step``, ``losses`` (one
    float per optimizer step), ``steps_per_s`` (after the first step), ``images_per_s``,
    ``out_dir``, ``visualizer`` (the saved directory), ``samples`` (the grid PNG),
    ``sample_mse`` (pixel MSE of the grid's pictures), ``train_seconds`` (from the call to the last
    step: encoding the tokens included, saving and the check not) and ``check`` (`vpit_fast.visualizer.evaluate`'s
    accuracies on the held-out pictures of one shape, or None)."""
    from vpit_fast.visualizer.data import (PairedImages, image_source, loader_batches, materialise, random_batches,
                                           to_unit_range)
    from vpit_fast.visualizer.evaluate import evaluate_visualizer, format_result, held_out_keys

    # ---- set-up ------------------------------------------------------------------------------
    run_started = time.perf_counter()
    config.validate()
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_yaml(config, out_dir / "config.yaml")
    device = pick_device(config.device)
    torch.manual_seed(config.seed)

    # ---- tokens (the encoder runs once, here) and images -------------------------------------
    if not config.data:
        raise ValueError("data is empty: give data=shapes or data=<image folder> (tokens_dir holds only tokens)")
    keys, draw = image_source(config.data, config.shapes_size, config.shapes_seed)
    # Pictures of one shape kept out of training, to check at the end that unseen tokens decode
    # to the right kind and colour (shapes only; see `vpit_fast.visualizer.evaluate`).
    check_keys = held_out_keys(config.check_count, config.shapes_seed) if config.data == "shapes" else []
    keys, tokens = precomputed_tokens(config, sorted(set(keys) | set(check_keys)), draw, device)
    check_keys = [k for k in check_keys if k in tokens]
    num_tokens, visual_dim = tokens.num_tokens, tokens.hidden_size

    # ---- visualizer --------------------------------------------------------------------------
    visualizer = build_visualizer(config, visual_dim, num_tokens, token_source(tokens)).to(device)
    visualizer.train()
    if config.compile:
        visualizer.unet.compile()
    trainable = sum(p.numel() for p in visualizer.parameters() if p.requires_grad)

    # A few images never trained on show in the sample grid how well unseen tokens decode: some of
    # the check's pictures (spread over kinds and colours), else a random few.
    checked = set(check_keys)
    keys = [k for k in keys if k not in checked]
    if check_keys:
        held_out = random.Random(config.seed).sample(check_keys, min(config.sample_count, len(check_keys)))
        train_keys = keys
    else:
        order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(config.seed)).tolist()
        held_out = [keys[i] for i in order[:config.sample_count]]
        train_keys = [keys[i] for i in order[config.sample_count:]]
    dataset = PairedImages(train_keys, draw, tokens, visualizer.image_size)
    sample_images, sample_tokens = materialise(PairedImages(held_out, draw, tokens, visualizer.image_size),
                                               progress=False)
    if config.cache:
        images, all_tokens = materialise(dataset, progress=config.progress)
        batches = random_batches(images.to(device), all_tokens.to(device), config.batch_size, seed=config.seed)
    else:
        batches = loader_batches(dataset, config.batch_size, config.num_workers, seed=config.seed)
    log(f"{trainable / 1e6:.2f}M trainable parameters; {len(dataset)} training images "
        f"({len(check_keys) or len(held_out)} held out) of {visualizer.image_size}px with "
        f"[{num_tokens}, {visual_dim}] tokens; "
        f"{config.batch_size * config.grad_accum} images per step on {device}")

    # ---- optimizer and schedule --------------------------------------------------------------
    steps = config.total_steps
    optimizer = build_optimizer(visualizer, config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay)
    scheduler = build_scheduler(optimizer, min(config.warmup_steps, steps), max(0, steps - config.warmup_steps))

    # ---- the loop ----------------------------------------------------------------------------
    metrics = MetricsLogger(out_dir / "metrics.jsonl", enabled=True)
    gpu = GpuMonitor(device) if device.type == "cuda" else None
    bar = progress_bar(steps, enabled=config.progress)
    params = [p for p in visualizer.parameters() if p.requires_grad]
    # Losses stay on the device until a log step, so the CPU can queue the next steps meanwhile.
    losses, pending, paused = [], [], 0.0
    started = first_done = time.perf_counter()
    for step in range(1, steps + 1):
        step_loss = 0.0
        for _ in range(config.grad_accum):
            batch_images, batch_tokens = next(batches)
            batch_images = to_unit_range(batch_images.to(device, non_blocking=True))
            with _autocast(device):
                loss = visualizer.training_loss(batch_images, batch_tokens.to(device, non_blocking=True),
                                                cond_dropout=config.cond_dropout)
            (loss / config.grad_accum).backward()
            step_loss += loss.detach() / config.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        pending.append(step_loss)
        if step == 1:  # the first step carries start-up costs (allocator, kernels' first launch)
            float(step_loss)
            first_done = time.perf_counter()
        if step % config.log_every == 0 or step == steps:
            window = torch.stack(pending).tolist()
            if not all(math.isfinite(v) for v in window):
                raise FloatingPointError(f"a loss in steps {step - len(window) + 1}..{step} is not finite "
                                         f"({window}); lower lr or raise warmup_steps")
            losses += window
            pending = []
            elapsed = time.perf_counter() - first_done - paused
            steps_per_s = (step - 1) / elapsed if step > 1 else 1.0 / (first_done - started)
            record = {"step": step, "loss": sum(window) / len(window), "lr": scheduler.get_last_lr()[0],
                      "grad_norm": float(grad_norm), "steps_per_s": steps_per_s,
                      "images_per_s": steps_per_s * config.batch_size * config.grad_accum,
                      **(gpu.read() if gpu else {})}
            metrics.log(record)
            bar.set_postfix_str(f"loss {record['loss']:.4f} | {record['images_per_s']:.0f} img/s")
        if config.sample_every and config.sample_count and step % config.sample_every == 0 and step < steps:
            pause = time.perf_counter()
            mse = save_samples(visualizer, sample_images, sample_tokens, out_dir / f"samples-{step:06d}.png", config,
                               device)
            metrics.log(step=step, sample_mse=mse)
            paused += time.perf_counter() - pause
        bar.update(1)
    bar.close()
    finished = time.perf_counter()
    steps_per_s = (steps - 1) / (finished - first_done - paused) if steps > 1 else 1.0 / (finished - started)

    # ---- the end: save, sample grid ----------------------------------------------------------
    save_dir = out_dir / "visualizer"
    visualizer.save_pretrained(save_dir)
    samples = out_dir / "samples.png"
    mse = None
    if config.sample_count:
        mse = save_samples(visualizer, sample_images, sample_tokens, samples, config, device)
        metrics.log(step=steps, sample_mse=mse)
    train_seconds = finished - run_started
    check = None
    if check_keys:
        # The held-out pictures' true tokens -> pictures -> do they show the right kind and colour?
        visualizer.eval()
        check_tokens = torch.stack([tokens[k] for k in check_keys]).float()
        check, _ = evaluate_visualizer(visualizer, check_tokens, check_keys, steps=config.sample_steps,
                                       seed=config.seed, progress=config.progress)
        metrics.log(step=steps, **{f"check_{k}": v for k, v in check.items()})
        (out_dir / "check.json").write_text(json.dumps(check, indent=2))
        log(f"check: {format_result(check)}")
    metrics.close()
    log(f"done: {steps} steps in {train_seconds:.0f} s ({steps_per_s:.2f} steps/s); loss {losses[0]:.4f} -> "
        f"{losses[-1]:.4f}; visualizer {save_dir}"
        + (f"; samples {samples} (pixel MSE {mse:.4f})" if mse is not None else ""))
    return {"step": steps, "losses": losses, "steps_per_s": steps_per_s, "train_seconds": train_seconds,
            "images_per_s": steps_per_s * config.batch_size * config.grad_accum, "out_dir": str(out_dir),
            "visualizer": str(save_dir), "samples": str(samples) if config.sample_count else None, "sample_mse": mse,
            "check": check}


# ----------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="vpit-train-visualizer",
        description="Train the diffusion visualizer (visual tokens -> pictures). Overrides are key=value pairs "
                    "such as steps=3000 batch_size=256 lr=5e-4.")
    parser.add_argument("--preset", default="tiny", choices=sorted(TRAIN_PRESETS), help="starting configuration")
    parser.add_argument("--config", help="a YAML file applied over the preset")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied last")
    args = parser.parse_args(argv)
    return resolve_config(args.preset, args.config, args.overrides)


def main(argv=None):
    try:
        train_visualizer(parse_args(argv))
    except FloatingPointError as error:
        print(f"[vpit-train-visualizer] stopped: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
