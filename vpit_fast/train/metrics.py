"""What a training run shows and records: a JSON-lines metrics log, GPU memory and utilisation
through NVML (nvidia-ml-py), model FLOPs utilisation, a tqdm progress bar with a one-line
summary, and a PNG plot of the loss curves.

Metric names the plot reads: ``step``, ``text_loss``, ``visual_loss`` (training) and
``eval_text_loss``, ``eval_visual_loss`` (evaluation points, in any record).
"""

import json
import math
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Dense bf16 tensor-core peak (no sparsity), FLOP/s per GPU, by a substring of the device name;
# checked in order, so "H100 PCIe" comes before "H100".
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


def _is_rank0():
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _plain(value):
    """A JSON-safe number for tensors and numpy scalars; other values unchanged."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return value.item()
    return value


class MetricsLogger:
    """Appends one JSON object per `log` call to ``path`` (JSON lines), flushed at once so a crash
    loses nothing and ``tail -f`` works. Writes only on rank 0 (or when ``enabled`` is given);
    on other ranks `log` does nothing. Appends to an existing file, so a resumed run continues
    it (records of steps redone after a resume appear twice; `read_metrics` keeps the last)."""

    def __init__(self, path, enabled=None):
        self.path = os.fspath(path)
        self.enabled = _is_rank0() if enabled is None else bool(enabled)
        self._file = None
        if self.enabled:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, "a")

    def log(self, record=None, **metrics):
        """Writes ``{**record, **metrics}``; tensors (0-d or 1-element) become numbers."""
        if not self.enabled:
            return
        if self._file is None:
            raise ValueError(f"MetricsLogger for {self.path} is closed")
        row = {k: _plain(v) for k, v in {**(record or {}), **metrics}.items()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path):
    """The records of a metrics JSONL file, in order; where several records carry the same
    ``step`` and the same set of keys (steps redone after a resume), only the last is kept.
    Lines that do not parse (a torn last line) are skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    last = {}
    for i, r in enumerate(records):
        last[(r.get("step"), tuple(sorted(r)))] = i
    keep = set(last.values())
    return [r for i, r in enumerate(records) if i in keep or "step" not in r]


class GpuMonitor:
    """GPU memory and utilisation of one CUDA device through NVML. ``device``: a CUDA index or
    ``torch.device`` (this process's current device when None or without an index), mapped to
    NVML's numbering through CUDA_VISIBLE_DEVICES. Where NVML, its driver library or a GPU is missing, `read` returns {}."""

    def __init__(self, device=None):
        self._nvml, self._handle = None, None
        try:
            import pynvml

            if isinstance(device, (torch.device, str)):
                device = torch.device(device).index  # None for plain "cuda": the current device
            if device is None:
                if not torch.cuda.is_available():
                    return
                device = torch.cuda.current_device()
            index = int(device)
            if torch.cuda.is_available():
                index = torch.cuda._get_nvml_device_index(index)
            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
        except Exception:  # NVML missing, no driver, no such device: monitoring is optional
            self._nvml, self._handle = None, None

    @property
    def available(self):
        return self._handle is not None

    def read(self):
        """{"gpu_mem_used_gib", "gpu_mem_total_gib", "gpu_util_pct"} (device-wide, all processes),
        or {} when unavailable or when NVML fails."""
        if self._handle is None:
            return {}
        try:
            memory = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
        except Exception:
            return {}
        return {"gpu_mem_used_gib": memory.used / 2**30, "gpu_mem_total_gib": memory.total / 2**30,
                "gpu_util_pct": float(util.gpu)}


def peak_memory_per_rank(device, rank=0, world_size=1):
    """Each rank's peak of allocated CUDA memory so far, in GiB (``torch.cuda.max_memory_allocated``:
    the tensors this process held, not the allocator's cache or other processes), as a list indexed
    by rank. A collective under several ranks: every rank must call it. None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    peaks = torch.zeros(world_size, dtype=torch.float64, device=device)
    peaks[rank] = torch.cuda.max_memory_allocated(device) / 2**30
    if world_size > 1:
        torch.distributed.all_reduce(peaks)
    return peaks.tolist()


def flops_per_token(num_params_per_token, num_layers, hidden, seq_len):
    """Training FLOPs per token, ``6 N + 12 L H T`` (PaLM, Chowdhery et al. 2022, appendix B):
    forward plus backward is 3x the forward's 2 FLOPs per weight (``6 N``, N = the weights every
    token is multiplied by: not embedding lookups, and not heads that run on a few rows only, which
    `VPiTFlops` counts on their rows), plus attention scores and values (``12 L H T``, L layers,
    H hidden size, T the attention length; causal masking is not halved, as in PaLM). With packed
    sequences T is the mean sample length attention spans, not the budget."""
    for name, value in (("num_params_per_token", num_params_per_token), ("num_layers", num_layers),
                        ("hidden", hidden), ("seq_len", seq_len)):
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return 6.0 * num_params_per_token + 12.0 * num_layers * hidden * seq_len


@dataclass(frozen=True)
class VPiTFlops:
    """Where a `vpit_fast.VPiTModel`'s weights run, for counting its training FLOPs.

    The decoder runs on every token. The LM head runs only on text-target rows (the fused head
    loss never makes logits elsewhere), the vision head only on visual-target rows and the
    adapter only on image slots, so each is counted on its rows: 6 FLOPs per weight per row. The
    frozen vision encoder (forward only, outside the LLM's token stream) is not counted.

    Two totals: `decoder_flops` (``6 N + 12 L H T`` per token, N the decoder's weights: the
    stricter count, which `mfu` in the metrics reports) and `model_flops` (that plus the heads and
    adapter on their rows: ``mfu_with_heads``).
    """
    decoder: int  # decoder weights (blocks and final norm, without the embedding table)
    lm_head: int  # V x H
    vision_head: int
    adapter: int
    num_layers: int
    hidden: int

    @classmethod
    def of(cls, model):
        llm = model.llm
        embedding = llm.get_input_embeddings().weight
        decoder = sum(p.numel() for p in llm.base_model.parameters() if p is not embedding)
        return cls(decoder=decoder, lm_head=model.heads.lm_head.weight.numel(),
                   vision_head=_numel(model.heads.vision_head), adapter=_numel(model.adapter),
                   num_layers=llm.config.num_hidden_layers, hidden=llm.config.hidden_size)

    def decoder_flops(self, tokens, span):
        """FLOPs of ``tokens`` tokens through the decoder, attention spanning ``span`` on average."""
        return tokens * flops_per_token(self.decoder, self.num_layers, self.hidden, span)

    def model_flops(self, tokens, span, text_targets, visual_targets, image_tokens):
        """`decoder_flops` plus the LM head on ``text_targets`` rows, the vision head on
        ``visual_targets`` rows and the adapter on ``image_tokens`` rows."""
        for name, value in (("text_targets", text_targets), ("visual_targets", visual_targets),
                            ("image_tokens", image_tokens)):
            if value < 0:
                raise ValueError(f"{name} must be non-negative, got {value!r}")
        heads = self.lm_head * text_targets + self.vision_head * visual_targets + self.adapter * image_tokens
        return self.decoder_flops(tokens, span) + 6.0 * heads


def _numel(module):
    return sum(p.numel() for p in module.parameters())


def batch_rows(batch, num_visual_tokens):
    """(text targets, visual targets, image tokens) of a collated batch, read on the host: the
    rows the LM head, the vision head and the adapter run on."""
    labels = batch["labels"]
    text = int((labels[:, 1:] != -100).sum())  # row i predicts label i + 1, as the loss shifts
    is_target = batch.get("image_is_target")
    images = 0 if is_target is None else int(is_target.numel())
    targets = 0 if is_target is None else int(is_target.sum())
    return text, targets * num_visual_tokens, images * num_visual_tokens


def mfu(tokens_per_s, flops_per_token, peak_flops):
    """Model FLOPs utilisation, a fraction in [0, 1] for a sane run: ``tokens_per_s *
    flops_per_token / peak_flops``. ``tokens_per_s`` and ``peak_flops`` must cover the same devices
    (per GPU, or all GPUs: peak times the world size). None when ``peak_flops`` is None."""
    if peak_flops is None:
        return None
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be positive, got {peak_flops!r}")
    return tokens_per_s * flops_per_token / peak_flops


def peak_flops_for_name(name):
    """Dense bf16 peak FLOP/s of the GPU called ``name`` (e.g. "NVIDIA H100 80GB HBM3"), or None
    when unknown."""
    for key, flops in PEAK_BF16_FLOPS:
        if key.lower() in name.lower():
            return flops
    return None


def peak_flops_for_device(device=None):
    """Dense bf16 peak FLOP/s of a CUDA device (the current one when None): H100 SXM and H200
    989e12, H100 PCIe 756e12, A100 312e12; None without CUDA or for other GPUs."""
    if not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def progress_bar(total, initial=0, enabled=True):
    """A tqdm bar over optimizer steps (``initial`` for a resumed run); a disabled one (no output,
    same methods) when ``enabled`` is false, e.g. on ranks other than 0."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)


def _si(value):
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def format_postfix(text_loss=None, visual_loss=None, tokens_per_s=None, mfu=None):
    """The progress bar's summary, e.g. ``"text 2.3456 | visual 0.4567 | 12.3k tok/s | MFU 41.2%"``;
    parts given as None are left out (MFU is a fraction)."""
    parts = []
    if text_loss is not None:
        parts.append(f"text {float(text_loss):.4f}")
    if visual_loss is not None:
        parts.append(f"visual {float(visual_loss):.4f}")
    if tokens_per_s is not None:
        parts.append(f"{_si(float(tokens_per_s))} tok/s")
    if mfu is not None:
        parts.append(f"MFU {100.0 * float(mfu):.1f}%")
    return " | ".join(parts)


def _series(records, key):
    points = [(r["step"], r[key]) for r in records
              if "step" in r and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in points], [p[1] for p in points]


def plot_losses(metrics_jsonl_path, out_png):
    """Plots text and visual loss against step (training lines, evaluation points as markers) from
    a metrics JSONL file into ``out_png``, two panels side by side. Returns ``out_png``, or None
    with a warning when matplotlib is missing, the file has no loss records, or plotting fails:
    a plot never fails the run."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed; no loss plot written")
        return None
    try:
        records = read_metrics(metrics_jsonl_path)
        panels = [("text_loss", "eval_text_loss", "text loss (CE)"),
                  ("visual_loss", "eval_visual_loss", "visual loss (1 - cos)")]
        if not any(_series(records, k)[0] for train, ev, _ in panels for k in (train, ev)):
            warnings.warn(f"{metrics_jsonl_path} has no loss records; no loss plot written")
            return None
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, (train_key, eval_key, title) in zip(axes, panels):
            steps, values = _series(records, train_key)
            if steps:
                ax.plot(steps, values, lw=1, label="train")
            steps, values = _series(records, eval_key)
            if steps:
                ax.plot(steps, values, "o-", ms=4, label="eval")
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend()
        fig.tight_layout()
        os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
        fig.savefig(out_png, dpi=100)
        plt.close(fig)
        return out_png
    except Exception as e:  # noqa: BLE001 - the plot is a convenience, never a failure
        warnings.warn(f"loss plot failed: {type(e).__name__}: {e}")
        return None
