"""Processes, devices and parallelisation, applied in one fixed order (torchtitan's): activation
checkpointing, torch.compile, then FSDP2 per decoder block, the final norm and heads in one unit,
the rest (embeddings, adapter) in the root unit.

FSDP2 (``torch.distributed.fsdp.fully_shard``) is ZeRO-3: parameters, gradients and optimizer
state are sharded over the ranks; each unit's parameters are gathered for its forward and
backward only. Parameters compute in bf16, gradients are reduced in fp32, the sharded master
copy and the optimizer state stay fp32. A single GPU runs without FSDP (no process group): the
model computes in its bf16 parameters and `vpit_fast.train.master_adamw.MasterWeightAdamW` keeps
the fp32 masters, which skips the copies FSDP's all-gather and reduce-scatter make even on one
rank (measured: 1B VPiT step 184 -> 123 ms compiled, benchmarks/RESULTS.md).
"""

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vpit_fast.train.config import COMPILE_MODES

__all__ = ["Runtime", "apply_activation_checkpointing", "apply_compile", "apply_fsdp", "eager_blocks", "setup_runtime"]


@dataclass
class Runtime:
    """Where this process runs: ``rank``/``world_size`` (1 without torchrun), ``device``,
    ``distributed`` (a process group is initialised), ``fsdp`` (parameters are FSDP2-sharded)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool
    fsdp: bool

    @property
    def is_main(self):
        return self.rank == 0


def setup_runtime(device="auto"):
    """Initialises the process group when launched by torchrun (``WORLD_SIZE`` > 1); one process
    (CPU or one GPU) runs without one. ``device``: ``"auto"`` (CUDA when available), ``"cpu"`` or
    ``"cuda"``."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f'device must be "auto", "cpu" or "cuda", got {device!r}')
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but torch sees no CUDA GPU")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; start at most "
                           "that many processes per node (torchrun --nproc-per-node), or pass device=cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Runtime(rank, world_size, local_rank, dev, distributed, fsdp=distributed)


def decoder_layers(model):
    """The LLM's decoder blocks (LLaMA, Qwen2, Mistral keep them in ``base_model.layers``)."""
    layers = getattr(model.llm.base_model, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model.llm).__name__} keeps no decoder blocks in base_model.layers")
    return layers


def apply_activation_checkpointing(model):
    """Recomputes each decoder block's activations in backward instead of keeping them."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = decoder_layers(model)
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model, mode="default"):
    """torch.compile per decoder block (same code, one graph reused by every block). mode:
    ``"default"``, or ``"max-autotune-no-cudagraphs"`` (Inductor times Triton GEMM templates against
    cuBLAS and may fuse the pointwise ops after a GEMM into it; minutes of compiling; no CUDA
    graphs, which the changing batch shapes would re-record)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    layers = decoder_layers(model)
    for i, block in enumerate(layers):
        layers[i] = torch.compile(block, fullgraph=False, mode=None if mode == "default" else mode)


@contextlib.contextmanager
def eager_blocks(model):
    """Runs the decoder blocks uncompiled inside the ``with``: evaluation's no-grad forwards and
    generation's KV-cached steps would each recompile the training graph (grad mode, batch shapes,
    a guard on every block's layer index), past torch.compile's recompile limit. Blocks that FSDP2
    manages stay as they are (their hooks live on the compiled wrapper; evaluation under FSDP2
    loads the export instead)."""
    from torch.distributed.fsdp import FSDPModule

    layers = decoder_layers(model)
    compiled = {i: block for i, block in enumerate(layers)
                if hasattr(block, "_orig_mod") and not isinstance(block, FSDPModule)}
    for i, block in compiled.items():
        layers[i] = block._orig_mod
    try:
        yield model
    finally:
        for i, block in compiled.items():
            layers[i] = block


def apply_fsdp(model, param_dtype=torch.bfloat16):
    """FSDP2 units: every decoder block; the final norm with the heads (both used at the end of
    forward; with tied embeddings the heads share the root unit's embedding instead); the root
    (embeddings, adapter). The frozen vision tower, when attached, is left unsharded."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = decoder_layers(model)
    for i, block in enumerate(layers):
        # The last block's parameters are needed again first in backward: keep them gathered.
        fully_shard(block, mp_policy=policy, reshard_after_forward=i < len(layers) - 1)
    tied = model.heads.lm_head.weight is model.llm.get_input_embeddings().weight
    ignored = set(model.visual.parameters()) if model.visual is not None else set()
    if not tied:
        fully_shard([model.llm.base_model.norm, model.heads], mp_policy=policy)
        # The LM head is also reachable as llm.lm_head; the root must not manage it a second time.
        ignored.add(model.heads.lm_head.weight)
    fully_shard(model, mp_policy=policy, ignored_params=ignored or None)
    return model
