"""`VPiTModel`: a Hugging Face causal LM that reads and predicts visual tokens (VPiT, MetaMorph).

Parts: the LLM (any ``AutoModelForCausalLM``: LLaMA, Qwen2, Mistral), the frozen visual-token
component (`VisualTokens`: SigLIP tower, layer choice, interpolation to 64 tokens; optional when the
data brings precomputed tokens), the adapter ``Linear(Dv, H) -> GELU -> Linear(H, H)`` that turns
visual tokens into input embeddings, and `VPiTHeads` (the LLM's own LM head plus a vision head
``H -> Dv``) that computes the fused cross-entropy + cosine loss.

The tokenizer gains ``<image>`` (the slot placeholder), ``<image_start>`` and ``<image_end>``; their
input and output embedding rows, and the rows added to pad the vocabulary to a multiple of 128, start
at the mean of the existing rows. Rows at or beyond ``config.text_vocab_size`` are padding: nothing
in the data targets them and generation never samples them.

Shift convention (the data is not shifted, see `vpit_fast.data.conversations`): the hidden state at
position ``t`` predicts ``labels[t + 1]`` through the LM head, and the first visual token of a
response image is predicted from its ``<image_start>`` position, the last one from the slot before
it.
"""

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.utils import ModelOutput

from vpit_fast.data.conversations import IGNORE_INDEX
from vpit_fast.data.shapes import IMAGE
from vpit_fast.data.tokenizer import IMAGE_END, IMAGE_START
from vpit_fast.heads import VPiTHeads
from vpit_fast.packed_llama import is_packed_llama, packed_llama_forward

__all__ = ["VPiTConfig", "VPiTModel", "VPiTOutput"]

CONFIG_FILE = "vpit_config.json"
WEIGHTS_FILE = "vpit_modules.safetensors"  # adapter and vision head; the LLM and encoder have their own
LLM_DIR, ENCODER_DIR = "llm", "encoder"
IMAGE_TOKENS = (IMAGE, IMAGE_START, IMAGE_END)
PACKED_ATTENTION = "vpit_varlen"


@dataclass
class VPiTConfig:
    """What a `VPiTModel` adds to its LLM (saved as ``vpit_config.json``).

    vision_head: ``"linear"`` (``H -> Dv``, the official default) or ``"mlp"`` (``H -> H -> Dv``).
    visual_dim: Dv, the visual tokens' width (1152 for SigLIP-so400m).
    num_visual_tokens: tokens per image (a square grid: 64 = 8x8).
    encoder_layer: the tower's hidden state used (default -2, the penultimate).
    normalize_visual: L2-normalise visual tokens (inputs and targets).
    standardize_visual: the encoder standardises its tokens with statistics of training images
        (`VisualTokens.fit_standardization`, saved with the encoder); inputs, targets, generated
        tokens and retrieval then all live in that space.
    text_weight, visual_weight: loss = text_weight * CE + visual_weight * (1 - cos).
    target_noise: training only (not in the paper): the input copies of generation-target visual
        tokens get Gaussian noise, per image of relative norm ``sigma ~ U(0, target_noise)`` (then
        re-normalised when ``normalize_visual``); the targets stay clean. Each generated token
        must then come from the prompt more than from a copy of the previous tokens, which is what
        free-running generation (fed its own imperfect tokens) needs. 0: off.
    vocab_multiple: embedding rows are padded to a multiple of this.
    text_vocab_size, image_token_id, image_start_id, image_end_id: set when the tokens are added.
    """

    vision_head: str = "linear"
    visual_dim: int = 1152
    num_visual_tokens: int = 64
    encoder_layer: int = -2
    normalize_visual: bool = False
    standardize_visual: bool = False
    text_weight: float = 1.0
    visual_weight: float = 1.0
    target_noise: float = 0.0
    vocab_multiple: int = 128
    text_vocab_size: int = 0
    image_token_id: int = -1
    image_start_id: int = -1
    image_end_id: int = -1

    def __post_init__(self):
        if self.vision_head not in ("linear", "mlp"):
            raise ValueError(f'vision_head must be "linear" or "mlp", got {self.vision_head!r}')
        side = round(self.num_visual_tokens ** 0.5)
        if self.num_visual_tokens < 1 or side * side != self.num_visual_tokens:
            raise ValueError(f"num_visual_tokens must be a square number (8x8 = 64), got {self.num_visual_tokens}")
        if self.visual_dim < 1 or self.vocab_multiple < 1:
            raise ValueError("visual_dim and vocab_multiple must be positive")
        if not self.target_noise >= 0:
            raise ValueError(f"target_noise must be >= 0, got {self.target_noise!r}")

    @property
    def grid(self):
        side = round(self.num_visual_tokens ** 0.5)
        return (side, side)

    def save(self, directory):
        Path(directory, CONFIG_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory):
        values = json.loads(Path(directory, CONFIG_FILE).read_text())
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{Path(directory, CONFIG_FILE)} has unknown fields {sorted(unknown)}")
        return cls(**values)


@dataclass
class VPiTOutput(ModelOutput):
    """What `VPiTModel.forward` returns (a transformers ``ModelOutput``, so HF Trainer reads its
    ``loss``).

    loss, text_loss, visual_loss, text_count, visual_count: as in `vpit_fast.HeadLoss` (None
        without labels).
    hidden: ``[B, T, H]`` the LLM's last hidden states (after its final norm).
    """

    loss: torch.Tensor = None
    text_loss: torch.Tensor = None
    visual_loss: torch.Tensor = None
    text_count: torch.Tensor = None
    visual_count: torch.Tensor = None
    hidden: torch.Tensor = None


def add_image_tokens(tokenizer):
    """Adds ``<image>``, ``<image_start>`` and ``<image_end>`` as special tokens where missing.
    Returns their ids in that order."""
    missing = [t for t in IMAGE_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return tuple(tokenizer.convert_tokens_to_ids(t) for t in IMAGE_TOKENS)


def _load_llm(llm, dtype, attn_implementation):
    from transformers import AutoModelForCausalLM

    if isinstance(llm, (str, os.PathLike)):
        kwargs = {} if dtype is None else {"dtype": dtype}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        return AutoModelForCausalLM.from_pretrained(llm, **kwargs)
    if not isinstance(llm, nn.Module) or not hasattr(llm, "get_input_embeddings"):
        raise TypeError(f"llm must be a Hugging Face causal LM or a name/path, got {type(llm).__name__}")
    return llm


def _use_packed_attention(llm):
    """Switches the LLM to the varlen attention of `vpit_fast.attention` (registered on import)."""
    from vpit_fast.attention import register_varlen_attention

    register_varlen_attention()
    llm.set_attn_implementation(PACKED_ATTENTION)


class VPiTModel(nn.Module):
    """LLM + visual tokens + adapter + `VPiTHeads` (see the module docstring).

    Build one with `from_base` (a pretrained or configured LLM and tokenizer) or `from_pretrained`
    (a directory `save_pretrained` wrote). Attributes: ``llm``, ``visual`` (`VisualTokens` or None),
    ``adapter``, ``heads``, ``tokenizer``, ``config`` (`VPiTConfig`).
    """

    def __init__(self, llm, tokenizer, config, visual=None):
        super().__init__()
        hidden = llm.config.hidden_size
        if visual is not None and visual.hidden_size != config.visual_dim:
            raise ValueError(f"the encoder's tokens are {visual.hidden_size} wide but config.visual_dim is "
                             f"{config.visual_dim}")
        self.llm = llm
        self.visual = visual
        self.tokenizer = tokenizer
        self.config = config
        self.adapter = nn.Sequential(nn.Linear(config.visual_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        lm_head = llm.get_output_embeddings()
        self.heads = VPiTHeads(hidden, lm_head.weight.shape[0], config.visual_dim, config.vision_head,
                               lm_head=lm_head)
        weight = llm.get_input_embeddings().weight
        self.adapter.to(device=weight.device, dtype=weight.dtype)
        self.heads.vision_head.to(device=weight.device, dtype=weight.dtype)

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_base(cls, llm, tokenizer, visual=None, config=None, *, visual_dim=None, dtype=None,
                  attn_implementation=PACKED_ATTENTION):
        """Wraps a causal LM for VPiT.

        Args:
            llm: a Hugging Face causal LM, or a hub name / local path loaded with
                ``AutoModelForCausalLM.from_pretrained``.
            tokenizer: its tokenizer, or a name / path for ``AutoTokenizer``; the image tokens are
                added to it (in place).
            visual: a `VisualTokens`, a SigLIP name / path for `VisualTokens.from_pretrained`, or
                None (the data must then bring precomputed ``visual_tokens``; give ``visual_dim``).
            config: a `VPiTConfig` (its token-id fields are filled here).
            dtype: for a loaded LLM and encoder.
            attn_implementation: ``"vpit_varlen"`` (default: packed batches and padded ones) or
                any transformers implementation (padded batches only).
        """
        from transformers import AutoTokenizer

        from vpit_fast.visual_tokens import VisualTokens

        config = VPiTConfig() if config is None else VPiTConfig(**asdict(config))
        varlen = attn_implementation == PACKED_ATTENTION
        llm = _load_llm(llm, dtype, None if varlen else attn_implementation)
        if varlen:
            _use_packed_attention(llm)
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        if isinstance(visual, (str, os.PathLike)):
            visual = VisualTokens.from_pretrained(visual, layer=config.encoder_layer, out_size=config.grid,
                                                  normalize=config.normalize_visual, dtype=dtype)
        if visual is not None:
            config.visual_dim = visual.hidden_size
        elif visual_dim is not None:
            config.visual_dim = visual_dim
        _check_visual(visual, config)

        old_rows = llm.get_input_embeddings().weight.shape[0]
        known = len(tokenizer)
        ids = add_image_tokens(tokenizer)
        config.text_vocab_size = len(tokenizer)
        config.image_token_id, config.image_start_id, config.image_end_id = ids
        _resize_embeddings(llm, len(tokenizer), config.vocab_multiple, token_ids=ids, mean_of=min(known, old_rows))
        return cls(llm, tokenizer, config, visual)

    # ---- forward -----------------------------------------------------------------------------

    def embed(self, input_ids, visual_tokens, image_slots, image_batch_index):
        """Input embeddings in one pass: token embeddings everywhere, then the adapter's output
        scattered over the image slots.

        Args:
            input_ids: ``[B, T]`` int64.
            visual_tokens: ``[M, n, Dv]`` (n = num_visual_tokens) or None when M = 0.
            image_slots, image_batch_index: ``[M]`` int64, first slot and row of each image.

        Returns:
            ``[B, T, H]`` in the embedding dtype.
        """
        embeds = self.llm.get_input_embeddings()(input_ids)
        if visual_tokens is None or visual_tokens.shape[0] == 0:
            return embeds
        B, T, H = embeds.shape
        adapter_dtype = self.adapter[0].weight.dtype
        adapted = self.adapter(visual_tokens.to(adapter_dtype)).to(embeds.dtype)
        positions = self._slot_positions(image_slots, image_batch_index, T).reshape(-1)
        # index_put on [B, T, H], not index_copy on a [B * T, H] view: a view would reach the first
        # decoder block with a base tensor, and torch.compile would give that block its own graph
        return embeds.index_put((positions // T, positions % T), adapted.reshape(-1, H))

    def noisy_targets(self, visual_tokens, image_is_target, generator=None):
        """``visual_tokens`` ``[M, n, Dv]`` with the generation targets' (``image_is_target``) made
        noisy as ``config.target_noise`` says (a new tensor; the others unchanged)."""
        x = visual_tokens.float()
        target = image_is_target.to(x.device)
        sigma = torch.rand(x.shape[0], 1, 1, generator=generator, device=x.device) * self.config.target_noise
        sigma = sigma * target[:, None, None]
        noise = torch.randn(x.shape, generator=generator, device=x.device)
        noisy = x + sigma * x.norm(dim=-1, keepdim=True) * noise / x.shape[-1] ** 0.5
        if self.config.normalize_visual:
            noisy = F.normalize(noisy, dim=-1)
        return torch.where(target[:, None, None], noisy, x).to(visual_tokens.dtype)

    def _slot_positions(self, image_slots, image_batch_index, T):
        """``[M, n]`` flat positions (over ``B * T``) of every image's slots."""
        n = self.config.num_visual_tokens
        first = image_batch_index * T + image_slots
        return first[:, None] + torch.arange(n, device=first.device)

    def forward(self, input_ids, labels=None, position_ids=None, attention_mask=None, cu_seqlens=None,
                max_seqlen=None, image_slots=None, image_batch_index=None, image_is_target=None,
                pixel_values=None, visual_tokens=None, reduction="mean", text_weight=None, visual_weight=None,
                host_targets=None):
        """One forward pass, with the fused loss when ``labels`` are given.

        Args:
            input_ids, labels (not shifted, -100 off the response), position_ids: ``[B, T]`` int64.
            attention_mask: ``[B, T]`` 1/0 for padded batches, or None.
            cu_seqlens: ``[S + 1]`` int32 segment boundaries over the flattened ``B * T`` tokens
                for packed batches (`vpit_fast.data.collate_packed`); ``max_seqlen``: int.
            image_slots, image_batch_index: ``[M]`` int64; image_is_target: ``[M]`` bool.
            pixel_values: ``[M, 3, S, S]`` for the encoder, or visual_tokens: ``[M, n, Dv]``
                precomputed (one of the two when M > 0).
            reduction: ``"mean"`` or ``"sum"`` (for normalising by global token counts).
            text_weight, visual_weight: override the config's loss weights (a training loop
                folds the global token counts into them).
            host_targets: ``{"labels", "image_slots", "image_batch_index"}`` still on the host
                (`batch_inputs` adds them when it moves a batch to a GPU): the loss checks and
                counts its targets there, so the fused head loss reads nothing back from the GPU.

        Returns:
            `VPiTOutput`.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        tokens = self._visual_tokens(pixel_values, visual_tokens, image_slots, image_batch_index, image_is_target, T)
        inputs = tokens
        if self.training and self.config.target_noise > 0 and tokens is not None:
            inputs = self.noisy_targets(tokens, image_is_target)
        embeds = self.embed(input_ids, inputs, image_slots, image_batch_index)
        hidden = self._decoder(embeds, position_ids, attention_mask,
                               self._attention_kwargs(cu_seqlens, max_seqlen, B * T))
        if labels is None:
            return VPiTOutput(hidden=hidden)
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have input_ids' shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
        result = self.loss(hidden, labels, tokens, image_slots, image_batch_index, image_is_target, reduction,
                           text_weight, visual_weight, text_count=self._host_text_count(host_targets,
                                                                                        image_is_target, T))
        return VPiTOutput(loss=result.loss, text_loss=result.text_loss, visual_loss=result.visual_loss,
                          text_count=result.text_count, visual_count=result.visual_count, hidden=hidden)

    def loss(self, hidden, labels, visual_tokens, image_slots, image_batch_index, image_is_target,
             reduction="mean", text_weight=None, visual_weight=None, text_count=None):
        """The fused loss over response rows of ``hidden`` ``[B, T, H]``; returns `vpit_fast.HeadLoss`.
        text_count: the text targets, counted and checked on the host (`_host_text_count`), or None."""
        B, T, H = hidden.shape
        next_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
        Dv = self.config.visual_dim
        if visual_tokens is not None and visual_tokens.shape[0] > 0:
            # The generation targets' indices, found where the flags live: on the host (as
            # batch_inputs leaves them) that costs no device sync, unlike a boolean mask on the GPU.
            index = image_is_target.nonzero().reshape(-1)
            if index.device.type == "cpu" and visual_tokens.is_cuda:
                index = index.pin_memory()  # from pageable memory the copy would wait for the GPU
            index = index.to(visual_tokens.device, non_blocking=True)
            positions = self._slot_positions(image_slots.index_select(0, index),
                                             image_batch_index.index_select(0, index), T)
            rows = (positions - 1).reshape(-1)  # each slot is predicted from the position before it
            targets = visual_tokens.index_select(0, index).reshape(-1, Dv)
        else:
            rows = torch.zeros(0, dtype=torch.int64, device=hidden.device)
            targets = hidden.new_zeros(0, Dv)
        return self.heads(hidden.reshape(B * T, H), next_labels, rows, targets.to(hidden.dtype),
                          text_weight=self.config.text_weight if text_weight is None else text_weight,
                          visual_weight=self.config.visual_weight if visual_weight is None else visual_weight,
                          reduction=reduction, text_count=text_count)

    def _host_text_count(self, host_targets, image_is_target, T):
        """The number of text targets, counted on the host copies of the labels and image slots
        once `check_indices` (the head loss's own checks, which on the GPU cost it a device read)
        passes there; None when there are no host copies or something is invalid (the head loss
        then checks, and raises its clear error)."""
        from vpit_fast.ops.head_loss import check_indices

        if not host_targets:
            return None

        def on_host(t):
            return isinstance(t, torch.Tensor) and t.device.type == "cpu"

        labels, slots, rows_of = (host_targets.get(k) for k in ("labels", "image_slots", "image_batch_index"))
        if not on_host(labels) or labels.dim() != 2 or labels.shape[1] != T:
            return None
        next_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
        rows = torch.zeros(0, dtype=torch.int64)
        if image_is_target is not None and image_is_target.numel():
            if not (on_host(slots) and on_host(rows_of) and on_host(image_is_target)
                    and slots.shape == rows_of.shape == image_is_target.shape):
                return None
            target = image_is_target.bool()
            first, row = slots[target], rows_of[target]
            # each image inside its own row, as `loss` builds the visual rows
            if bool(((first < 1) | (first + self.config.num_visual_tokens > T) | (row < 0)
                     | (row >= labels.shape[0])).any()):
                return None
            rows = (self._slot_positions(first, row, T) - 1).reshape(-1)
        try:
            check_indices(next_labels, rows, next_labels.numel(), self.heads.lm_head.weight.shape[0], IGNORE_INDEX)
        except ValueError:
            return None
        return int((next_labels != IGNORE_INDEX).sum())

    def _visual_tokens(self, pixel_values, visual_tokens, image_slots, image_batch_index, image_is_target, T):
        n, Dv = self.config.num_visual_tokens, self.config.visual_dim
        if pixel_values is not None and visual_tokens is not None:
            raise ValueError("give pixel_values or visual_tokens, not both")
        if pixel_values is not None:
            if self.visual is None:
                raise ValueError("this model has no encoder (visual=None): give precomputed visual_tokens")
            visual_tokens = self.visual(pixel_values)
        M = 0 if visual_tokens is None else visual_tokens.shape[0]
        for name, t in (("image_slots", image_slots), ("image_batch_index", image_batch_index),
                        ("image_is_target", image_is_target)):
            count = 0 if t is None else t.numel()
            if count != M or (t is not None and t.dim() != 1):
                raise ValueError(f"{name} must be [M] with M = {M} images, got "
                                 f"{None if t is None else tuple(t.shape)}")
        if M == 0:
            return None
        if visual_tokens.dim() != 3 or tuple(visual_tokens.shape[1:]) != (n, Dv):
            raise ValueError(f"visual tokens must be [M, {n}, {Dv}], got {tuple(visual_tokens.shape)}")
        if image_slots.device.type == "cpu":  # checked where it costs no device sync
            if int(image_slots.min()) < 1 or int(image_slots.max()) + n > T:
                raise ValueError(f"image_slots must lie in [1, {T - n}] (an <image_start> before, {n} slots "
                                 f"after), got range [{int(image_slots.min())}, {int(image_slots.max())}]")
        return visual_tokens

    def _decoder(self, embeds, position_ids, attention_mask, attention_kwargs):
        """The LLM's final hidden states ``[B, T, H]``: a packed batch through LLaMA runs
        `vpit_fast.packed_llama` (no mask building; residual adds folded into the norms after
        `use_residual_norms`), anything else the model's own forward."""
        base = self.llm.base_model
        if attention_kwargs and position_ids is not None and is_packed_llama(base):
            return packed_llama_forward(base, embeds, position_ids, attention_kwargs)
        return base(inputs_embeds=embeds, position_ids=position_ids, attention_mask=attention_mask,
                    use_cache=False, **attention_kwargs).last_hidden_state

    def _attention_kwargs(self, cu_seqlens, max_seqlen, total):
        if cu_seqlens is None:
            return {}
        if self.llm.config._attn_implementation != PACKED_ATTENTION:
            raise ValueError(f"packed batches (cu_seqlens) need attn_implementation={PACKED_ATTENTION!r}; this "
                             f"model uses {self.llm.config._attn_implementation!r} (build it with from_base's default)")
        from vpit_fast.attention import packed_attention_kwargs

        return packed_attention_kwargs(cu_seqlens, max_seqlen)

    # ---- generation --------------------------------------------------------------------------

    def generate(self, prompts, images=None, **kwargs):
        """Text and images for a batch of prompts, with a static KV cache (optionally a CUDA-graph
        decode step): see `vpit_fast.generation.generate` for the arguments. Returns a list of
        `vpit_fast.generation.Generation` (text, token ids, one ``[64, Dv]`` tensor per image)."""
        from vpit_fast.generation import generate

        return generate(self, prompts, images, **kwargs)

    # ---- batches -----------------------------------------------------------------------------

    _BATCH_KEYS = ("input_ids", "labels", "position_ids", "attention_mask", "cu_seqlens", "max_seqlen",
                   "image_slots", "image_batch_index", "image_is_target", "pixel_values", "visual_tokens")

    @classmethod
    def batch_inputs(cls, batch, device=None):
        """The forward arguments of a collated batch (`vpit_fast.data.collate_packed` or
        `pad_batch` output, plus ``pixel_values`` or ``visual_tokens``), moved to ``device``;
        ``image_is_target`` stays where it is (the loss selects the generation targets with it,
        which on the host needs no device sync). Moving host tensors to a GPU, it also passes
        their host copies of the labels and image slots as ``host_targets`` (see `forward`)."""
        out = {}
        for key in cls._BATCH_KEYS:
            value = batch.get(key)
            if isinstance(value, torch.Tensor) and device is not None and key != "image_is_target":
                value = value.to(device, non_blocking=True)
            if value is not None:
                out[key] = value
        host = {key: batch.get(key) for key in ("labels", "image_slots", "image_batch_index")}
        labels = host["labels"]
        if (device is not None and torch.device(device).type != "cpu" and isinstance(labels, torch.Tensor)
                and labels.device.type == "cpu"):
            out["host_targets"] = host  # the loss checks and counts its targets here (no device read)
        return out

    # ---- persistence -------------------------------------------------------------------------

    def save_pretrained(self, directory, save_encoder=True):
        """Writes ``vpit_config.json``, the adapter and vision head (``vpit_modules.safetensors``),
        the LLM and tokenizer (``llm/``, transformers format) and, when present and
        ``save_encoder``, the encoder (``encoder/``, with its standardisation statistics)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.save(directory)
        own = {f"adapter.{k}": v for k, v in self.adapter.state_dict().items()}
        own.update({f"vision_head.{k}": v for k, v in self.heads.vision_head.state_dict().items()})
        save_file({k: v.detach().contiguous().cpu() for k, v in own.items()}, str(directory / WEIGHTS_FILE))
        self.llm.save_pretrained(directory / LLM_DIR)
        self.tokenizer.save_pretrained(directory / LLM_DIR)
        if self.visual is not None and save_encoder:
            self.visual.save_pretrained(directory / ENCODER_DIR)

    @staticmethod
    def load_visual(directory, dtype=None, encoder=None):
        """The visual-token component of a `save_pretrained` directory alone (no LLM is loaded),
        exactly as `from_pretrained` builds it: its ``encoder/`` (or ``encoder``, a name / path)
        with the saved layer, grid, normalisation and standardisation statistics (checked against
        the config). None when there is no encoder. Whatever
        space the model predicts visual tokens in, this component makes them (the visualizer
        trains on its output)."""
        from vpit_fast.visual_tokens import VisualTokens

        directory = Path(directory)
        config = VPiTConfig.load(directory)
        source = encoder if encoder is not None else (directory / ENCODER_DIR if (directory / ENCODER_DIR).is_dir() else None)
        if source is None:
            return None
        visual = VisualTokens.from_pretrained(source, layer=config.encoder_layer, out_size=config.grid,
                                              normalize=config.normalize_visual, dtype=dtype)
        _check_visual(visual, config)
        return visual

    @classmethod
    def from_pretrained(cls, directory, dtype=None, device=None, encoder=None,
                        attn_implementation=PACKED_ATTENTION):
        """Loads what `save_pretrained` wrote. ``encoder``: a name / path to load the encoder from
        when the directory has none (None: the directory's, or no encoder)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}: not a VPiTModel directory")
        config = VPiTConfig.load(directory)
        kwargs = {} if dtype is None else {"dtype": dtype}
        varlen = attn_implementation == PACKED_ATTENTION
        if not varlen:
            kwargs["attn_implementation"] = attn_implementation
        llm = AutoModelForCausalLM.from_pretrained(directory / LLM_DIR, **kwargs)
        if varlen:
            _use_packed_attention(llm)
        tokenizer = AutoTokenizer.from_pretrained(directory / LLM_DIR)
        model = cls(llm, tokenizer, config, cls.load_visual(directory, dtype=dtype, encoder=encoder))
        state = load_file(str(directory / WEIGHTS_FILE))
        model.adapter.load_state_dict({k[len("adapter."):]: v for k, v in state.items() if k.startswith("adapter.")})
        model.heads.vision_head.load_state_dict(
            {k[len("vision_head."):]: v for k, v in state.items() if k.startswith("vision_head.")})
        return model.to(device) if device is not None else model


def _check_visual(visual, config):
    """The encoder must make the tokens the config describes: grid, L2 normalisation and
    standardisation (whose statistics come with the encoder, see `VisualTokens.save_pretrained`)."""
    if visual is None:
        return
    made = (visual.out_grid, visual.normalize, visual.standardized)
    asked = (config.grid, config.normalize_visual, config.standardize_visual)
    if made != asked:
        raise ValueError(f"visual makes {made[0]} tokens (normalize={made[1]}, standardized={made[2]}) but the "
                         f"config asks for {asked[0]} (normalize={asked[1]}, standardized={asked[2]})"
                         + ("; fit the statistics with VisualTokens.fit_standardization, or load an encoder "
                            "saved with them" if asked[2] and not made[2] else ""))


@torch.no_grad()
def _resize_embeddings(llm, num_tokens, multiple, token_ids, mean_of):
    """Resizes the LLM's embeddings to hold ``num_tokens`` (and at least its current rows),
    rounded up to ``multiple``, and sets the rows of ``token_ids`` and every added row (input and
    output embeddings) to the mean of the first ``mean_of`` rows."""
    old_rows = llm.get_input_embeddings().weight.shape[0]
    rows = -(-max(num_tokens, old_rows) // multiple) * multiple
    llm.resize_token_embeddings(rows, mean_resizing=False)
    new_rows = sorted(set(token_ids) | set(range(old_rows, rows)))
    tables = [llm.get_input_embeddings().weight]
    output = llm.get_output_embeddings()
    if output is not None and output.weight is not tables[0]:
        tables.append(output.weight)
    index = torch.tensor(new_rows, dtype=torch.int64)
    for weight in tables:
        mean = weight[:mean_of].float().mean(0).to(weight.dtype)
        weight[index.to(weight.device)] = mean
