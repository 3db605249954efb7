"""`vpit-train`: the VPiT training loop, top to bottom.

    vpit-train                                  # the embedded default (preset "tiny")
    vpit-train --preset bench-1b steps=50       # any preset, then key=value overrides
    torchrun --nproc-per-node 8 -m vpit_fast.train --preset paper-stage2 --config my.yaml

Sections: set-up (processes, seed, output folder) -> model -> data -> parallelisation ->
optimizer and schedule -> resume -> the loop (micro-batches, global token-count normalisation,
clipping, logging, checkpoints) -> the end (export, evaluation, plot).

Loss normalisation: every micro-batch's loss is a sum over its rows, weighted by
``text_weight / T`` and ``visual_weight / V`` where T and V are the text and visual target counts
of the whole optimizer step over all ranks and micro-batches (counted from the labels before the
forward). The step's gradient is then exactly that of the mean over all its targets, whatever the
packing, the accumulation or the number of GPUs.
"""

import argparse
import copy
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from vpit_fast.train import checkpoint as ckpt
from vpit_fast.train.config import PRESETS, resolve_config
from vpit_fast.train.grad_accum import Fp32GradSum
from vpit_fast.train.metrics import (GpuMonitor, MetricsLogger, VPiTFlops, batch_rows, format_postfix, mfu,
                                     peak_flops_for_device, peak_memory_per_rank, plot_losses, progress_bar)
from vpit_fast.train.optim import build_optimizer, build_scheduler
from vpit_fast.train.overrides import save_yaml
from vpit_fast.train.parallel import (apply_activation_checkpointing, apply_compile, apply_fsdp, eager_blocks,
                                      setup_runtime)

__all__ = ["main", "train"]


class NonFiniteLoss(RuntimeError):
    pass


def log(runtime, message):
    if runtime.is_main:
        print(f"[vpit-train] {message}", flush=True)


# ----------------------------------------------------------------------------------------------
# Model and data

# Training images that `VisualTokens.fit_standardization` reads (model.standardize_visual): enough
# for a stable mean at each of the 64 positions; a few seconds on a CPU for the tiny tower.
STANDARDIZATION_IMAGES = 1024


def build_model(config):
    """The VPiTModel of ``config.model`` on the CPU, in float32 (FSDP2 casts for compute). With
    ``model.standardize_visual`` a new encoder's statistics are fitted on training images here
    (an ``init`` export brings its own)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from vpit_fast import presets
    from vpit_fast.data.tokenizer import build_tokenizer
    from vpit_fast.model import VPiTConfig, VPiTModel
    from vpit_fast.visual_tokens import VisualTokens

    m = config.model
    if m.init:
        model = VPiTModel.from_pretrained(m.init, dtype=torch.float32)
        model.config.target_noise = m.target_noise
        return model
    vpit_config = VPiTConfig(vision_head=m.vision_head, normalize_visual=m.normalize_visual,
                             standardize_visual=m.standardize_visual, text_weight=m.text_weight, visual_weight=m.visual_weight,
                             target_noise=m.target_noise)
    # A preset name loads its real checkpoint when it is in the local cache, else random weights.
    encoder = presets.local_pretrained(m.encoder) or m.encoder
    llm_name = presets.local_pretrained(m.llm) or m.llm
    if encoder in presets.ENCODERS:
        visual = VisualTokens.from_config(presets.encoder_config(encoder), normalize=m.normalize_visual)
    else:
        visual = VisualTokens.from_pretrained(encoder, normalize=m.normalize_visual, dtype=torch.float32)
    if m.standardize_visual and not visual.standardized:
        fit_standardization(visual, config)
    if llm_name in presets.LLMS:
        tokenizer = AutoTokenizer.from_pretrained(m.tokenizer) if m.tokenizer else build_tokenizer()
        if 0 < m.vocab_size < len(tokenizer):
            raise ValueError(f"model.vocab_size ({m.vocab_size}) is smaller than the tokenizer ({len(tokenizer)} "
                             "tokens); give at least that many rows, or 0 for the tokenizer's size")
        llm = LlamaForCausalLM(presets.llm_config(llm_name, vocab_size=m.vocab_size or len(tokenizer)))
    else:
        if m.vocab_size:
            raise ValueError(f"model.vocab_size sizes a preset LLM's random embeddings; {llm_name!r} brings its "
                             "own: leave model.vocab_size at 0")
        tokenizer = AutoTokenizer.from_pretrained(m.tokenizer or llm_name)
        llm = llm_name
    return VPiTModel.from_base(llm, tokenizer, visual, vpit_config, dtype=torch.float32)


def fit_standardization(visual, config):
    """Fits ``visual``'s standardisation on up to `STANDARDIZATION_IMAGES` distinct training
    images, taken in a seeded random order (the same on every rank)."""
    import random

    records, _, images = records_and_images(config)
    keys = image_keys(records)
    random.Random(config.seed).shuffle(keys)
    keys = [k for k in keys if images.exists(k)][:STANDARDIZATION_IMAGES]
    visual.fit_standardization([images.load(k) for k in keys])


def set_trainable(model, stage):
    """stage1: the adapter and the vision head; stage2 / full: everything but the vision tower."""
    model.requires_grad_(stage != "stage1")
    if stage == "stage1":
        model.adapter.requires_grad_(True)
        model.heads.vision_head.requires_grad_(True)
    if model.visual is not None:
        model.visual.requires_grad_(False)


def records_and_images(config):
    """(train records, eval records, image source) of ``config.data``; the source is a
    `vpit_fast.data.dataset.ImageFolder` or `ImageFunction`."""
    from vpit_fast.data.dataset import ImageFolder, ImageFunction, load_records
    from vpit_fast.data.shapes import ShapesDataset

    d = config.data
    if d.source == "shapes":
        train = ShapesDataset("train", size=d.shapes_size, seed=d.shapes_seed, image_size=d.shapes_image_size,
                              tasks=d.shapes_tasks or None)
        held_out = ShapesDataset("eval", size=d.eval_size, seed=d.shapes_seed, image_size=d.shapes_image_size)
        return list(train), list(held_out), ImageFunction(train.image)
    if not d.source:
        raise ValueError("data.source is empty: give a LLaVA-style .json/.jsonl file (data.source=PATH "
                         "data.image_root=DIR) or data.source=shapes")
    folder = ImageFolder(d.image_root or os.path.dirname(os.path.abspath(d.source)))
    return load_records(d.source), [], folder


def image_keys(records):
    """The distinct image keys the records name (an ``"image"`` string or list), sorted."""
    named = set()
    for record in records:
        entry = record.get("image") if isinstance(record, dict) else None
        named.update([entry] if isinstance(entry, str) else entry if isinstance(entry, list) else [])
    return sorted(k for k in named if isinstance(k, str))


def precompute_tokens(model, records, images, out_dir, runtime):
    """Encodes every distinct image of ``records`` that ``images`` has, once (rank 0; the others
    wait and read). Missing images are left out, so the dataset reports their records (a counted
    warning, or an error with data.on_error=raise); an image that fails to decode stops the run
    with its path."""
    from vpit_fast.data.dataset import ImageLoadError
    from vpit_fast.visual_tokens import load_precomputed

    tokens_dir = Path(out_dir, "visual_tokens")
    if runtime.is_main and not _tokens_match(tokens_dir, model.visual):
        keys = [k for k in image_keys(records) if images.exists(k)]
        log(runtime, f"encoding {len(keys)} images once into {tokens_dir}")

        def load(key):
            try:
                return images.load(key)
            except (OSError, ValueError) as error:
                raise ImageLoadError(f"image {images.where(key)} cannot be read: {error}") from error

        model.visual.to(runtime.device).precompute(keys, load, tokens_dir, progress=True)
        model.visual.to("cpu")
    if runtime.distributed:
        dist.barrier()
    return load_precomputed(tokens_dir)


def _tokens_match(tokens_dir, visual):
    """True when ``tokens_dir`` holds tokens ``visual`` made (same tower config, layer, grids,
    normalisation, standardisation statistics and dtype): a run reuses them, else re-encodes."""
    import json

    from vpit_fast.visual_tokens import INDEX_FILE

    if not (tokens_dir / INDEX_FILE).is_file():
        return False
    index = json.loads((tokens_dir / INDEX_FILE).read_text())
    ours = json.loads(json.dumps(visual.settings()))  # tuples -> lists, as the index stores them
    return all(index.get(k) == v for k, v in ours.items() if k != "name_or_path")


def build_data(config, model, runtime):
    from vpit_fast.data.dataset import VPiTDataset

    d = config.data
    train_records, eval_records, source = records_and_images(config)
    if d.uncond_fraction:
        from vpit_fast.data.conversations import drop_conditions

        train_records = drop_conditions(train_records, d.uncond_fraction, seed=config.seed)
    if d.precompute:
        images = precompute_tokens(model, train_records + eval_records, source, config.out_dir, runtime)
        processor = None
    else:
        images, processor = source, model.visual.processor
    common = dict(tokenizer=model.tokenizer, images=images, num_visual_tokens=model.config.num_visual_tokens,
                  processor=processor, budget=d.budget or None, on_error=d.on_error, seed=config.seed,
                  flatten=d.flatten)
    train_set = VPiTDataset(train_records, **common)
    eval_set = VPiTDataset(eval_records, **common) if eval_records else None
    return train_set, eval_set, eval_records


# ----------------------------------------------------------------------------------------------
# The step

def step_counts(micro_batches, num_visual_tokens, runtime):
    """(text targets, visual targets) of a whole optimizer step over all ranks, as floats."""
    rows = [batch_rows(b, num_visual_tokens) for b in micro_batches]
    text, visual = float(sum(r[0] for r in rows)), float(sum(r[1] for r in rows))
    if not runtime.distributed:  # counted on the host: no device round trip
        return [text, visual]
    counts = torch.tensor([text, visual], dtype=torch.float64, device=runtime.device)
    dist.all_reduce(counts)
    return counts.tolist()


def real_tokens(batch):
    if "segment_ids" in batch:
        return int((batch["segment_ids"] >= 0).sum())
    return int(batch["attention_mask"].sum())


def num_samples(batch):
    """Samples in a batch: packed rows list theirs per row."""
    ids = batch["sample_ids"]
    return sum(len(row) for row in ids) if "segment_ids" in batch else len(ids)


def train_step(model, micro_batches, config, runtime):
    """Forward and backward over the step's micro-batches. Returns the step's (text loss, visual
    loss) means as a float64 tensor of 2 on the device (still to be summed over ranks)."""
    from vpit_fast.model import VPiTModel

    text_total, visual_total = step_counts(micro_batches, model.config.num_visual_tokens, runtime)
    # FSDP2 averages gradients over ranks; the loss is already a global mean, so undo that.
    scale = runtime.world_size if runtime.fsdp else 1
    text_w = model.config.text_weight * scale / max(text_total, 1.0)
    visual_w = model.config.visual_weight * scale / max(visual_total, 1.0)
    sums = torch.zeros(2, dtype=torch.float64, device=runtime.device)
    # bf16 parameters without FSDP: the micro-batches' gradients are summed in fp32
    fp32_sum = (Fp32GradSum(model.parameters())
                if len(micro_batches) > 1 and not runtime.fsdp and config.fp32_grad_accum else None)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        if runtime.fsdp:  # reduce-scatter gradients once per step, after the last micro-batch
            model.set_requires_gradient_sync(last)
        out = model(**VPiTModel.batch_inputs(batch, runtime.device), reduction="sum",
                    text_weight=text_w, visual_weight=visual_w)
        out.loss.backward()
        sums += torch.stack([out.text_loss, out.visual_loss]).double()
        if fp32_sum is not None:
            fp32_sum.collect(last)
    return sums / torch.tensor([max(text_total, 1.0), max(visual_total, 1.0)], dtype=torch.float64,
                               device=runtime.device)


class Batches:
    """Micro-batches in the order of the data (epoch after epoch), from a position that resumes
    exactly: (epoch, global batches consumed in that epoch)."""

    def __init__(self, dataset, config, runtime, epoch=0, consumed=0):
        from vpit_fast.data.dataset import make_dataloader

        self.make = lambda epoch, start: make_dataloader(
            dataset, config.data.batch_size, num_workers=config.data.num_workers, seed=config.seed, epoch=epoch,
            start_batch=start, rank=runtime.rank, world_size=runtime.world_size)
        self.per_epoch = len(self.make(0, 0))
        if self.per_epoch == 0:
            raise ValueError(f"the data holds {len(dataset)} items, fewer than one global batch of "
                             f"{config.data.batch_size * runtime.world_size}: lower data.batch_size")
        self.epoch, self.consumed = epoch, consumed
        self._iter = iter(self.make(epoch, consumed))

    def next(self, count):
        out = []
        while len(out) < count:
            try:
                out.append(next(self._iter))
                self.consumed += 1
            except StopIteration:
                self.epoch, self.consumed = self.epoch + 1, 0
                self._iter = iter(self.make(self.epoch, 0))
        return out

    def position(self):
        return {"epoch": self.epoch, "consumed": self.consumed}


# ----------------------------------------------------------------------------------------------
# The run

def train(config):
    """Runs the training ``config`` (a `TrainConfig`). Returns a dict with the final step, the
    output paths and the evaluation results (rank 0; others get the same keys)."""
    from vpit_fast.train.evaluate import evaluate

    # ---- set-up ------------------------------------------------------------------------------
    out_dir = Path(config.out_dir)
    runtime = setup_runtime(config.device)
    if runtime.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(config, out_dir / "config.yaml")
    torch.manual_seed(config.seed)  # every rank builds the same initial weights
    checkpoints = out_dir / "checkpoints"
    resume_from = ckpt.latest_checkpoint(checkpoints) if config.resume else None
    if config.resume and resume_from is None:
        log(runtime, f"--resume: no checkpoint in {checkpoints}; starting from scratch")

    # ---- model -------------------------------------------------------------------------------
    model = build_model(config)
    set_trainable(model, config.stage)
    train_set, eval_set, eval_records = build_data(config, model, runtime)
    encoder = model.visual
    if config.data.precompute:
        model.visual = None  # the loop reads precomputed tokens; the tower comes back for export
    log(runtime, f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters "
                 f"({sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trainable); "
                 f"{len(train_set.samples)} samples in {len(train_set)} rows of {config.data.budget or 'padded'} "
                 f"tokens; {runtime.world_size} process(es) on {runtime.device}")

    # ---- parallelisation ---------------------------------------------------------------------
    if config.fused_norms:
        from vpit_fast.packed_llama import use_residual_norms

        if not use_residual_norms(model.llm):
            log(runtime, "fused_norms=true: this LLM has no LLaMA layers to fuse; running it unchanged")
    if config.activation_checkpointing:
        apply_activation_checkpointing(model)
    if config.compile:
        apply_compile(model, config.compile_mode)
    if runtime.fsdp:
        model.to(runtime.device)
        if model.visual is not None:
            model.visual.to(torch.bfloat16 if config.model.dtype == "bfloat16" else torch.float32)
        apply_fsdp(model, param_dtype=getattr(torch, config.model.dtype))
    elif runtime.device.type == "cuda":
        # One GPU: no FSDP. The model computes in model.dtype; with bf16 the optimizer keeps the
        # fp32 master weights (`MasterWeightAdamW`), as FSDP2's mixed precision does per rank.
        model.to(runtime.device, dtype=getattr(torch, config.model.dtype))
    model.train()
    torch.manual_seed(config.seed + runtime.rank)  # from here on, ranks draw different randomness

    # ---- optimizer, schedule, resume ---------------------------------------------------------
    o = config.optim
    batches_per_step = config.grad_accum
    steps = config.steps
    data = Batches(train_set, config, runtime)
    if steps == 0:
        steps = max(1, data.per_epoch // batches_per_step)
    optimizer = build_optimizer(model, o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                fused=o.fused)
    scheduler = build_scheduler(optimizer, min(o.warmup_steps, steps), steps, decay=o.decay, min_lr_ratio=o.min_lr_ratio)
    step = 0
    if resume_from is not None:
        extra = ckpt.load_checkpoint(resume_from, model, optimizer, scheduler)
        step = extra["step"]
        data = Batches(train_set, config, runtime, **extra["data"])
        log(runtime, f"resumed from {resume_from} at step {step}")

    # ---- the loop ----------------------------------------------------------------------------
    flop_model = VPiTFlops.of(model)
    peak = peak_flops_for_device(runtime.device) if runtime.device.type == "cuda" else None
    gpu = GpuMonitor(runtime.device) if runtime.device.type == "cuda" else None
    metrics = MetricsLogger(out_dir / "metrics.jsonl", enabled=runtime.is_main)
    bar = progress_bar(steps, initial=step, enabled=runtime.is_main and config.progress)
    window_tokens, window_samples, window_start, window_losses = 0, 0, time.perf_counter(), []
    window_rows = [0, 0, 0]  # text targets, visual targets, image tokens (the heads' and adapter's rows)
    interrupted = False

    def save(at_step):
        ckpt.save_checkpoint(checkpoints, at_step, model, optimizer, scheduler, keep_last=config.keep_last,
                             extra={"step": at_step, "data": data.position()})

    previous_handler = signal.getsignal(signal.SIGINT)
    try:
        while step < steps:
            micro_batches = data.next(batches_per_step)
            losses = train_step(model, micro_batches, config, runtime)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.requires_grad], o.grad_clip)
            if runtime.distributed:
                dist.all_reduce(losses)
            text_loss, visual_loss = losses.tolist()
            window_losses.append((text_loss, visual_loss))
            grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            if not (math.isfinite(text_loss) and math.isfinite(visual_loss) and math.isfinite(grad_norm)):
                where = (f"The last good checkpoint is in {checkpoints}. Lower optim.lr or raise "
                         f"optim.warmup_steps and resume with --resume." if config.save else
                         "No checkpoint was written (save=false). Lower optim.lr or raise optim.warmup_steps.")
                raise NonFiniteLoss(
                    f"step {step + 1}: non-finite loss or gradient (text {text_loss}, visual {visual_loss}, grad "
                    f"norm {grad_norm}); the update was not applied. {where}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            window_tokens += sum(real_tokens(b) for b in micro_batches) * runtime.world_size
            window_samples += sum(num_samples(b) for b in micro_batches) * runtime.world_size
            for b in micro_batches:
                window_rows = [w + r * runtime.world_size
                               for w, r in zip(window_rows, batch_rows(b, model.config.num_visual_tokens))]

            if step % config.log_every == 0 or step == steps:
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_tokens / max(elapsed, 1e-9)
                # Attention spans a sample in packed rows, the padded row otherwise.
                packed = "segment_ids" in micro_batches[0]
                span = window_tokens / max(window_samples, 1) if packed else micro_batches[0]["input_ids"].shape[1]
                per_gpu = tokens_per_s / runtime.world_size
                tokens = max(window_tokens, 1)
                utilisation = mfu(per_gpu, flop_model.decoder_flops(window_tokens, span) / tokens, peak)
                with_heads = mfu(per_gpu, flop_model.model_flops(window_tokens, span, *window_rows) / tokens, peak)
                # Means over the steps since the last record: packed rows group samples of similar
                # length (often one task), so single steps swing widely.
                mean_text = sum(t for t, _ in window_losses) / len(window_losses)
                mean_visual = sum(v for _, v in window_losses) / len(window_losses)
                window_losses.clear()
                record = {"step": step, "text_loss": mean_text, "visual_loss": mean_visual, "grad_norm": grad_norm,
                          "lr": scheduler.get_last_lr()[0], "tokens_per_s": tokens_per_s, "mfu": utilisation,
                          "mfu_with_heads": with_heads, "epoch": data.epoch, **(gpu.read() if gpu else {})}
                peaks = peak_memory_per_rank(runtime.device, runtime.rank, runtime.world_size)
                if peaks is not None:
                    record["gpu_peak_gib"] = peaks  # per rank
                metrics.log(record)
                bar.set_postfix_str(format_postfix(mean_text, mean_visual, tokens_per_s, utilisation))
                window_tokens, window_samples, window_start = 0, 0, time.perf_counter()
                window_rows = [0, 0, 0]
            bar.update(1)
            if config.save and step % config.save_every == 0 and step < steps:
                save(step)
    except KeyboardInterrupt:
        interrupted = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not corrupt the save
        log(runtime, f"interrupted at step {step}" + (": saving a checkpoint" if config.save else " (save=false)"))
    finally:
        bar.close()
    if config.save and step > 0 and optimizer.state:
        save(step)
    signal.signal(signal.SIGINT, previous_handler)
    if interrupted:
        if config.save:
            log(runtime, f"checkpoint saved in {checkpoints}; continue with --resume")
        metrics.close()
        return {"step": step, "interrupted": True, "out_dir": str(out_dir)}

    # ---- the end: export, evaluation, plot ---------------------------------------------------
    export_dir = out_dir / "export"
    model.visual = encoder
    if config.save:
        export_model(model, export_dir, runtime, optimizer)
    if encoder is not None and not runtime.fsdp and runtime.device.type == "cuda":  # evaluation runs on `model`
        model.visual = encoder.to(runtime.device, getattr(torch, config.model.dtype))
    results = {"step": step, "out_dir": str(out_dir)}
    if config.save:
        results["export"] = str(export_dir)
    if config.evaluate and eval_set is not None:
        with eager_blocks(model):
            results.update(evaluate(model, eval_set, eval_records, config, runtime))
        metrics.log({"step": step, **{f"eval_{k}": v for k, v in results.items() if isinstance(v, float)}})
        log(runtime, "held-out evaluation: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()
                                                          if isinstance(v, float)))
    metrics.close()
    if runtime.is_main:
        png = plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png")
        results["plot"] = str(png) if png else None
        saved = f"checkpoint {checkpoints}, export {export_dir}" if config.save else "nothing saved (save=false)"
        log(runtime, f"done: {step} steps; {saved}, metrics {out_dir / 'metrics.jsonl'}, plot {png}")
    return results


def export_model(model, export_dir, runtime, optimizer=None):
    """`VPiTModel.save_pretrained` of the trained model in fp32, loadable with
    `VPiTModel.from_pretrained`: the full weights gathered to rank 0 under FSDP2; on one GPU the
    optimizer's fp32 master weights (`MasterWeightAdamW`) where it has them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    masters = {}
    if optimizer is not None and hasattr(optimizer, "master_of"):
        # every name of a shared (tied) parameter, so each state-dict key gets the master
        masters = {name: optimizer.master_of(p) for name, p in model.named_parameters(remove_duplicate=False)}
    wrapped = any("_orig_mod." in n or "_checkpoint_wrapped_module." in n for n, _ in model.named_parameters())
    if not runtime.fsdp and not wrapped and all(m is None for m in masters.values()) and \
            all(p.dtype == torch.float32 for p in model.parameters()):
        if runtime.is_main:
            model.save_pretrained(export_dir)
        return
    visual, model.visual = model.visual, None
    if runtime.fsdp:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        state.update({k: m.detach().to("cpu", copy=True) for k, m in masters.items() if m is not None})
    model.visual = visual
    if runtime.is_main:
        from transformers import AutoModelForCausalLM

        from vpit_fast.model import VPiTModel

        # A plain CPU model of the same structure carries the gathered weights into save_pretrained;
        # activation-checkpoint and compile wrappers add name parts that the plain model lacks.
        state = {k.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", ""): v.float()
                 for k, v in state.items()}
        plain = VPiTModel(AutoModelForCausalLM.from_config(model.llm.config, dtype=torch.float32),
                          model.tokenizer, model.config,
                          copy.deepcopy(visual).to("cpu", torch.float32) if visual else None)
        missing, unexpected = plain.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("visual.")]
        if missing or unexpected:
            raise RuntimeError(f"export: the gathered weights do not fit the model (missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]})")
        plain.save_pretrained(export_dir)
    if runtime.distributed:
        dist.barrier()


# ----------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="vpit-train", description="Train a VPiT model. Overrides are key=value pairs such as "
                                       "optim.lr=3e-4 data.budget=512 steps=100.")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="starting configuration")
    parser.add_argument("--config", help="a YAML file applied over the preset")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in out_dir")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied last")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + (["resume=true"] if args.resume else [])
    return resolve_config(args.preset, args.config, overrides)


def main(argv=None):
    try:
        config = parse_args(argv)
        train(config)
    except NonFiniteLoss as error:
        print(f"[vpit-train] stopped: {error}", file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
