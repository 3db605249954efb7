"""The training run's configuration: dataclasses, named presets, YAML files and command-line
overrides (``vpit-train --preset tiny optim.lr=3e-4 data.budget=512``).

Presets:
    tiny          the embedded default: a tiny LLaMA, a tiny 1-layer SigLIP whose tokens are local
                  (`vpit_fast.presets.ENCODERS`, "tiny-local"), standardised and L2-normalised, and
                  the procedural shapes data with text-to-image and image-QA weighted up, noisy
                  image inputs for generation targets, condition dropout and the visual loss
                  weighted 3x; trains on two CPU cores in about 9 minutes.
    paper-stage1  MetaMorph stage 1 (adapter pretraining, Table 2: lr 4.90e-5, wd 0, batch 768)
                  on LLaMA-3.1-8B-Instruct and SigLIP-so400m@384, by hub name (or local paths).
    paper-stage2  stage 2 (everything but the vision tower, lr 6.93e-5, wd 0, batch 1536, one
                  epoch), starting from a stage-1 export (``model.init``).
    bench-1b      LLaMA-3.2-1B shapes with random weights, a SigLIP-so400m-shaped frozen tower,
                  packed 4096-token rows of the shapes data (the benchmark's training step).
    bench-8b      the same at LLaMA-3-8B shapes with activation checkpointing, saving nothing:
                  the multi-GPU throughput run (``torchrun --nproc-per-node 2 -m vpit_fast.train
                  --preset bench-8b``; ZeRO-3 through FSDP2).
The paper's batch sizes count samples; with packing, a row holds several samples, so the presets
set rows per step that give about the same number of samples (``batch_size * grad_accum * world``).
"""

from dataclasses import dataclass, field, replace

from vpit_fast.train.overrides import apply_overrides, load_yaml_into

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # torch.compile's, for the decoder blocks

__all__ = ["DataConfig", "ModelConfig", "OptimConfig", "PRESETS", "TrainConfig", "resolve_config"]


@dataclass
class ModelConfig:
    """llm: a preset of `vpit_fast.presets.LLMS` (random weights) or a causal LM's hub name / path.
    tokenizer: name / path; empty: the LLM's own, or the embedded word-level tokenizer for presets.
    encoder: a preset of `vpit_fast.presets.ENCODERS` or a SigLIP name / path.
    init: a `VPiTModel.save_pretrained` directory to start from (e.g. stage 1's export).
    normalize_visual: L2-normalise the visual tokens.
    standardize_visual: standardise the visual tokens with statistics of the training images (the
        mean token, the per-channel std; `VisualTokens.fit_standardization`),
        saved with the exported encoder. The tiny preset turns it on: its random-weight tower makes
        tokens that share most of their direction across images.
    target_noise: noise on the input copies of generation-target visual tokens in training
        (`vpit_fast.VPiTConfig.target_noise`; not in the paper).
    dtype: parameters' compute dtype on GPU (bfloat16 or float32); the CPU runs in float32.
    vocab_size: embedding rows of a preset LLM (0: the tokenizer's size). The benchmark presets
        take LLaMA-3's 128256, so the embeddings and the LM head cost what they do in the real
        model although the embedded tokenizer uses few of the rows.
    """

    llm: str = "tiny"
    tokenizer: str = ""
    encoder: str = "tiny"
    init: str = ""
    vision_head: str = "linear"
    normalize_visual: bool = False
    standardize_visual: bool = False
    text_weight: float = 1.0
    visual_weight: float = 1.0
    target_noise: float = 0.0
    dtype: str = "bfloat16"
    vocab_size: int = 0


@dataclass
class DataConfig:
    """source: ``shapes`` (the procedural dataset) or a LLaVA-style ``.json``/``.jsonl`` file
    (images under ``image_root``). budget: tokens per packed row (0: plain padded batches).
    batch_size: rows per rank per micro-batch. flatten: a packed micro-batch reaches the model as
    one row of its rows' real tokens (`vpit_fast.data.flatten_packed`), so no compute goes to the
    rows' padding tails; the rows still bound what one micro-batch holds. precompute: encode every image once before training
    (the tower then never runs in the loop). shapes_*: size, image side and seed of the shapes data
    (``eval_size`` records of its held-out split are evaluated); shapes_tasks: the train split's
    task cycle (a name may repeat to weigh the mix; empty: every task once), the held-out split
    always cycles through every task. uncond_fraction: condition dropout for classifier-free
    guidance: this fraction of the train text-to-image records get an empty user message
    (`vpit_fast.data.conversations.drop_conditions`; not in the paper)."""

    source: str = "shapes"
    image_root: str = ""
    budget: int = 1024
    batch_size: int = 4
    flatten: bool = True
    num_workers: int = 0
    precompute: bool = True
    on_error: str = "skip"
    shapes_size: int = 8000
    shapes_image_size: int = 108
    shapes_seed: int = 0
    shapes_tasks: tuple[str, ...] = ()
    eval_size: int = 1050  # 150 records of each task: 150 generation prompts, 150 image questions
    uncond_fraction: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 30
    decay: str = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    fused: str = "auto"


@dataclass
class TrainConfig:
    """stage: ``stage1`` (adapter and vision head), ``stage2`` or ``full`` (everything but the
    vision tower). steps: optimizer steps (0: one epoch). Checkpoints go to ``out_dir/checkpoints``
    every ``save_every`` steps and at the end; ``resume`` continues from the latest one. save:
    false writes no checkpoint and no export (throughput runs, where an 8B model's optimizer state
    would put over 100 GB on disk); the metrics and the plot are still written. fused_norms: LLaMA
    models fold each residual add into the next RMSNorm (`vpit_fast.packed_llama`; off until its
    CUDA kernel has run on a GPU). compile_mode: torch.compile's mode for the blocks
    (`vpit_fast.train.parallel.apply_compile`; not yet measured on a GPU beyond "default").
    fp32_grad_accum: with bf16 parameters on one GPU and
    grad_accum > 1, the micro-batches' gradients are summed in fp32 (`vpit_fast.train.grad_accum`),
    not in bf16 by autograd."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    stage: str = "full"
    steps: int = 1000
    grad_accum: int = 1
    seed: int = 0
    out_dir: str = "runs/tiny"
    device: str = "auto"
    log_every: int = 10
    save_every: int = 200
    keep_last: int = 2
    resume: bool = False
    save: bool = True
    activation_checkpointing: bool = False
    compile: bool = False
    compile_mode: str = "default"
    fused_norms: bool = False
    fp32_grad_accum: bool = True
    evaluate: bool = True
    progress: bool = True

    def validate(self):
        choices = {"stage": ("stage1", "stage2", "full"), "optim.decay": ("cosine", "linear", "constant"),
                   "data.on_error": ("skip", "raise"), "model.vision_head": ("linear", "mlp"),
                   "model.dtype": ("bfloat16", "float32"), "compile_mode": COMPILE_MODES}
        values = {"stage": self.stage, "optim.decay": self.optim.decay, "data.on_error": self.data.on_error,
                  "model.vision_head": self.model.vision_head, "model.dtype": self.model.dtype,
                  "compile_mode": self.compile_mode}
        for key, allowed in choices.items():
            if values[key] not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {values[key]!r}")
        for key, value in (("steps", self.steps), ("data.budget", self.data.budget),
                           ("model.vocab_size", self.model.vocab_size)):
            if value < 0:
                raise ValueError(f"{key} must be >= 0, got {value}")
        if not 0.0 <= self.data.uncond_fraction <= 1.0:
            raise ValueError(f"data.uncond_fraction must be in [0, 1], got {self.data.uncond_fraction}")
        if not self.model.target_noise >= 0.0:
            raise ValueError(f"model.target_noise must be >= 0, got {self.model.target_noise}")
        for key, value in (("grad_accum", self.grad_accum), ("data.batch_size", self.data.batch_size),
                           ("log_every", self.log_every), ("save_every", self.save_every),
                           ("keep_last", self.keep_last)):
            if value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        return self


def _paper(stage, lr, rows, init=""):
    # 768 / 1536 samples per step at about 4 samples per 4096-token row on 8 GPUs.
    return TrainConfig(
        model=ModelConfig(llm="meta-llama/Llama-3.1-8B-Instruct", encoder="google/siglip-so400m-patch14-384",
                          init=init),
        data=DataConfig(source="", budget=4096, batch_size=2, num_workers=8, precompute=True),
        optim=OptimConfig(lr=lr, betas=(0.9, 0.999), weight_decay=0.0, warmup_steps=100, decay="cosine",
                          min_lr_ratio=0.0),
        stage=stage, steps=0, grad_accum=rows // 16, out_dir=f"runs/paper-{stage}", save_every=500,
        activation_checkpointing=True, evaluate=False)


# The tiny preset's task cycle: text-to-image and image QA five times each in 15 samples, every
# other task once. Video samples (four or five frames) are the longest: counted in tokens, this
# cycle gives text-to-image 23% of a step and image QA 19%, against 17% and 13% when every task
# but those two came once in 11 samples (benchmarks/RESULTS.md, "The embedded default").
TINY_TASKS = ("image_qa", "text_to_image", "image_editing", "image_qa", "text_to_image", "video_qa",
              "image_qa", "text_to_image", "visual_thinking", "image_qa", "text_to_image", "frame_prediction",
              "image_qa", "text_to_image", "frame_reordering")

LLAMA3_VOCAB = 128256

PRESETS = {
    "tiny": TrainConfig(
        # Noise on the input copies of generated images (target_noise), 10% of text-to-image
        # prompts emptied (uncond_fraction, for guidance) and the visual loss weighted 3x: without
        # them this 0.85M-parameter model continues whatever image it is fed instead of drawing
        # the prompt (held-out generation accuracy 0.053 against 0.39 with them; image QA 0.69
        # against 0.60; benchmarks/RESULTS.md, "The embedded default").
        model=ModelConfig(encoder="tiny-local", normalize_visual=True, standardize_visual=True, visual_weight=3.0,
                          target_noise=3.0),
        data=DataConfig(shapes_tasks=TINY_TASKS, uncond_fraction=0.1),
        steps=1600),
    "paper-stage1": _paper("stage1", 4.90e-5, 192),
    "paper-stage2": _paper("stage2", 6.93e-5, 384, init="runs/paper-stage1/export"),
    "bench-1b": TrainConfig(
        model=ModelConfig(llm="llama3.2-1b", encoder="siglip-so400m", vocab_size=LLAMA3_VOCAB),
        data=DataConfig(budget=4096, batch_size=1, shapes_size=2000, shapes_image_size=384, num_workers=4),
        optim=OptimConfig(lr=1e-4, warmup_steps=10),
        steps=20, out_dir="runs/bench-1b", save_every=10_000, evaluate=False),
    "bench-8b": TrainConfig(
        model=ModelConfig(llm="llama3-8b", encoder="siglip-so400m", vocab_size=LLAMA3_VOCAB),
        data=DataConfig(budget=4096, batch_size=1, shapes_size=400, shapes_image_size=384, num_workers=4),
        optim=OptimConfig(lr=1e-5, warmup_steps=5),
        steps=12, log_every=4, out_dir="runs/bench-8b", save=False, evaluate=False, activation_checkpointing=True),
}


def resolve_config(preset="tiny", yaml_path=None, overrides=()):
    """The preset, then the YAML file's values, then the ``key=value`` overrides; validated.
    Returns a new `TrainConfig`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    base = PRESETS[preset]
    config = replace(base, model=replace(base.model), data=replace(base.data), optim=replace(base.optim))
    if yaml_path:
        load_yaml_into(config, yaml_path)
    apply_overrides(config, list(overrides))
    return config.validate()
