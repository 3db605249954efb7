"""Images -> visual tokens, exactly as the official MetaMorph code makes them.

A frozen transformers SigLIP vision tower runs on preprocessed images; the hidden states of one
layer (default ``-2``, the penultimate, as in MetaMorph) are viewed as the patch grid (27x27 for
SigLIP-so400m@384) and bilinearly resampled to a small grid (8x8 = 64 tokens) by
`vpit_fast.interpolate_tokens`, with optional L2 normalisation. The same component serves the
model (input tokens and vision-head targets) and the visualizer, so both see identical tokens.

Optional standardisation (`VisualTokens.fit_standardization`): subtract the training images' mean
token and divide by the per-channel standard deviation, after the
interpolation and before any L2 normalisation. It is for towers whose tokens share a large
component across images (the random-weight tiny SigLIP: mean cosine 0.9 between different images),
where that component dominates the cosine loss and the retrieval; the statistics travel with the
tower (`save_pretrained` / `from_pretrained`), so every consumer of the tokens uses the same space.

Public API:
    VisualTokens        -- the module: ``forward(pixel_values) -> [B, oh*ow, D]``, `encode_images`,
                           `precompute` (a dataset's tokens into safetensors shards)
    load_precomputed    -- reads what `VisualTokens.precompute` wrote: ``tokens[key] -> [T, D]``
    PrecomputedTokens   -- what `load_precomputed` returns
    tiny_siglip_config  -- a SigLIP vision config with a 27x27 patch grid, for tests and the
                           embedded default
"""

import json
import os

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, SiglipVisionConfig, SiglipVisionModel

from vpit_fast.ops.interpolate_tokens import _pair, interpolate_tokens

__all__ = ["PrecomputedTokens", "VisualTokens", "load_precomputed", "tiny_siglip_config"]

INDEX_FILE = "index.json"
SHARD_NAME = "tokens-{:05d}.safetensors"
INDEX_FORMAT = 1
STANDARDIZATION_FILE = "visual_standardization.safetensors"  # next to the tower's config.json


def tiny_siglip_config(**overrides):
    """A tiny `SiglipVisionConfig` whose patch grid is 27x27 (image 108, patch 4), like
    SigLIP-so400m@384, so the real 27 -> 8 interpolation path runs: hidden 32, 2 layers, 2 heads,
    MLP 64. Keyword arguments override any field."""
    fields = dict(image_size=108, patch_size=4, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=2, intermediate_size=64)
    fields.update(overrides)
    return SiglipVisionConfig(**fields)


def _default_processor(image_size):
    """SigLIP's own preprocessing (resize to image_size, bicubic, rescale to [0, 1], normalise
    with mean = std = 0.5), for a tower saved without a preprocessor_config.json."""
    import transformers
    from transformers.utils import is_torchvision_available

    # transformers >= 5 has a PIL-only processor class for machines without torchvision.
    processor_class = transformers.SiglipImageProcessor
    if not is_torchvision_available() and hasattr(transformers, "SiglipImageProcessorPil"):
        processor_class = transformers.SiglipImageProcessorPil
    return processor_class(size={"height": image_size, "width": image_size})


class VisualTokens(nn.Module):
    """A frozen SigLIP vision tower and the token resampling on top of it.

    Args:
        tower: a `transformers.SiglipVisionModel`; it is frozen here (``requires_grad=False``,
            kept in eval mode).
        processor: the tower's image processor (used by `encode_images` and `precompute`);
            default: SigLIP preprocessing at the config's image size.
        layer: which entry of ``hidden_states`` to take (``0`` = the patch embeddings,
            ``num_hidden_layers`` or ``-1`` = the last encoder layer before the post-layernorm;
            default ``-2``, the penultimate, as in MetaMorph).
        out_size: output grid ``(oh, ow)`` or an int; default ``(8, 8)`` = 64 tokens.
        normalize: L2-normalise every output token (fused into the interpolation, or after the
            standardisation when there is one).
        name_or_path: where the tower came from, recorded by `precompute`.
        standardization: None, or ``(mean, std)``: ``mean`` ``[D]`` (the mean token), ``std``
            ``[D]`` (per channel, > 0); tokens become ``(t - mean) / std``.
            See `fit_standardization`.
    """

    def __init__(self, tower, processor=None, layer=-2, out_size=(8, 8), normalize=False, name_or_path=None,
                 standardization=None):
        super().__init__()
        config = tower.config
        num_states = config.num_hidden_layers + 1  # the embeddings, then one per encoder layer
        if not isinstance(layer, int) or not -num_states <= layer < num_states:
            raise ValueError(f"layer must be an int in [{-num_states}, {num_states - 1}] for a tower with "
                             f"{config.num_hidden_layers} layers, got {layer!r}")
        # The patch embedding is a stride-patch_size convolution without padding: a side of
        # image_size // patch_size patches (SigLIP-so400m: 384 px, patch 14 -> 27, 2 px unused).
        if config.image_size < config.patch_size:
            raise ValueError(f"image_size {config.image_size} is smaller than patch_size {config.patch_size}")
        self.tower = tower
        self.processor = processor if processor is not None else _default_processor(config.image_size)
        self.layer = layer
        self.normalize = bool(normalize)
        self.name_or_path = name_or_path
        self._out_grid = _pair(out_size, "out_size")
        side = config.image_size // config.patch_size
        self._in_grid = (side, side)
        self.tower.requires_grad_(False)
        self.tower.eval()
        # Not persistent: the statistics are saved with the tower (save_pretrained), not in
        # training checkpoints, which rebuild them the same way.
        self.register_buffer("token_mean", None, persistent=False)
        self.register_buffer("token_std", None, persistent=False)
        if standardization is not None:
            self.set_standardization(*standardization)

    # ---- constructors ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, layer=-2, out_size=(8, 8), normalize=False, dtype=None, device=None):
        """Loads the tower with `SiglipVisionModel.from_pretrained` and its image processor with
        `AutoImageProcessor.from_pretrained` (built from the config's image size when the path
        has none), and the standardisation statistics when the directory holds them (written by
        `save_pretrained`). ``dtype`` (e.g. ``torch.bfloat16``) and ``device`` place the tower."""
        kwargs = {} if dtype is None else {"dtype": dtype}
        tower = SiglipVisionModel.from_pretrained(name_or_path, **kwargs)
        if device is not None:
            tower = tower.to(device)
        try:
            processor = AutoImageProcessor.from_pretrained(name_or_path)
        except OSError:  # no preprocessor_config.json at that path
            processor = None
        standardization = None
        stats_path = os.path.join(str(name_or_path), STANDARDIZATION_FILE)
        if os.path.isfile(stats_path):
            from safetensors.torch import load_file

            stats = load_file(stats_path)
            standardization = (stats["mean"], stats["std"])
        return cls(tower, processor, layer=layer, out_size=out_size, normalize=normalize,
                   name_or_path=str(name_or_path), standardization=standardization)

    def save_pretrained(self, directory):
        """Writes the tower and its image processor (transformers format) and, when set, the
        standardisation statistics (``visual_standardization.safetensors``: ``mean`` and ``std``
        ``[D]``, float32), all loadable with `from_pretrained`."""
        from safetensors.torch import save_file

        self.tower.save_pretrained(directory)
        self.processor.save_pretrained(directory)
        path = os.path.join(str(directory), STANDARDIZATION_FILE)
        if self.standardized:
            save_file({"mean": self.token_mean.cpu().contiguous(), "std": self.token_std.cpu().contiguous()}, path)
        elif os.path.exists(path):  # statistics of an earlier save would standardise these tokens
            os.remove(path)

    @classmethod
    def from_config(cls, vision_config, layer=-2, out_size=(8, 8), normalize=False, dtype=None, device=None):
        """A tower with random weights from a `SiglipVisionConfig` (or a dict of its fields), for
        tests and benchmarks."""
        if isinstance(vision_config, dict):
            vision_config = SiglipVisionConfig(**vision_config)
        tower = SiglipVisionModel(vision_config)
        if dtype is not None or device is not None:
            tower = tower.to(device=device, dtype=dtype)
        return cls(tower, layer=layer, out_size=out_size, normalize=normalize)

    # ---- properties --------------------------------------------------------------------------

    @property
    def hidden_size(self):
        """D, the width of every token (1152 for SigLIP-so400m)."""
        return self.tower.config.hidden_size

    @property
    def in_grid(self):
        """(h, w) of the tower's patch grid (27x27 for so400m@384)."""
        return self._in_grid

    @property
    def out_grid(self):
        """(oh, ow) of the resampled grid."""
        return self._out_grid

    @property
    def num_tokens(self):
        """oh * ow, tokens per image (64 by default)."""
        return self._out_grid[0] * self._out_grid[1]

    @property
    def standardized(self):
        """True when tokens are standardised (see `fit_standardization`)."""
        return self.token_mean is not None

    @property
    def dtype(self):
        return next(self.tower.parameters()).dtype

    @property
    def device(self):
        return next(self.tower.parameters()).device

    def extra_repr(self):
        return (f"layer={self.layer}, in_grid={self.in_grid}, out_grid={self.out_grid}, "
                f"normalize={self.normalize}, standardized={self.standardized}")

    # ---- standardisation ---------------------------------------------------------------------

    def set_standardization(self, mean, std):
        """Sets the statistics: ``mean`` ``[D]``, ``std`` ``[D]`` (all > 0); kept in float32 on
        the tower's device."""
        mean, std = torch.as_tensor(mean), torch.as_tensor(std)
        if tuple(mean.shape) != (self.hidden_size,) or tuple(std.shape) != (self.hidden_size,):
            raise ValueError(f"standardization needs mean and std of shape [{self.hidden_size}], got "
                             f"{tuple(mean.shape)} and {tuple(std.shape)}")
        if not bool((std > 0).all()):
            raise ValueError("standardization std must be positive in every channel")
        self.token_mean = mean.to(self.device, torch.float32)
        self.token_std = std.to(self.device, torch.float32)

    def standardization_digest(self):
        """A SHA-256 of the statistics (None without): tells precomputed token sets apart."""
        if not self.standardized:
            return None
        import hashlib

        digest = hashlib.sha256()
        for t in (self.token_mean, self.token_std):
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        return "sha256:" + digest.hexdigest()

    def clear_standardization(self):
        self.token_mean = self.token_std = None

    def fit_standardization(self, images, batch_size=32):
        """Sets the statistics from ``images`` (PIL images, e.g. a sample of the training set):
        the mean token and each channel's standard deviation, over the images and the ``oh*ow``
        positions, of the raw tokens (before L2 normalisation). One mean for all positions, not
        one per position: a per-position mean would make the tokens of a place that is
        background in most images nearly zero, and a cosine target of nearly zero is noise.
        Returns self."""
        normalize, self.normalize = self.normalize, False
        self.clear_standardization()
        try:
            tokens = self.encode_images(images, batch_size=batch_size).float()
        finally:
            self.normalize = normalize
        if tokens.shape[0] < 2:
            raise ValueError(f"fit_standardization needs at least 2 images, got {tokens.shape[0]}")
        flat = tokens.reshape(-1, self.hidden_size)
        mean, std = flat.mean(0), flat.std(0).clamp_min(1e-6)
        self.set_standardization(mean, std)
        return self

    # ---- the forward path --------------------------------------------------------------------

    def train(self, mode=True):
        """The tower stays in eval mode whatever the parent asks (it is frozen; dropout or other
        train-mode behaviour would change the targets)."""
        super().train(mode)
        self.tower.eval()
        return self

    @torch.no_grad()  # not inference_mode: its tensors could not be saved by the adapter's backward
    def forward(self, pixel_values):
        """Visual tokens of preprocessed images.

        Args:
            pixel_values: ``[B, C, H, W]`` as the processor makes them, with C the tower's
                channel count and ``H = W = image_size``; cast to the tower's dtype and device.

        Returns:
            ``[B, oh*ow, D]`` in the tower's dtype, on its device, without autograd history.
        """
        config = self.tower.config
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"pixel_values must be a [B, C, H, W] tensor, got {shape}")
        if pixel_values.shape[1] != config.num_channels:
            raise ValueError(f"pixel_values must have {config.num_channels} channels, "
                             f"got shape {tuple(pixel_values.shape)}")
        if tuple(pixel_values.shape[2:]) != (config.image_size, config.image_size):
            raise ValueError(f"pixel_values must be {config.image_size}x{config.image_size} images "
                             f"(the tower's patch grid is fixed), got shape {tuple(pixel_values.shape)}")
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states[self.layer]
        # The compiled kernels take fp32/bf16/fp16; a float64 tower uses the PyTorch reference.
        impl = "torch" if hidden.dtype == torch.float64 else "auto"
        tokens = interpolate_tokens(hidden, out_size=self._out_grid, in_size=self._in_grid,
                                    normalize=self.normalize and not self.standardized, impl=impl)
        if not self.standardized:
            return tokens
        tokens = (tokens.float() - self.token_mean) / self.token_std
        if self.normalize:
            tokens = F.normalize(tokens, dim=-1, eps=1e-12)
        return tokens.to(hidden.dtype)

    def encode_images(self, images, batch_size=32):
        """PIL images -> the processor -> `forward` in batches of ``batch_size``.

        Returns:
            ``[N, oh*ow, D]`` tensor in the tower's dtype, on the CPU (``N`` may be 0).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        images = list(images)
        out = torch.empty(len(images), self.num_tokens, self.hidden_size, dtype=self.dtype)
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            pixel_values = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            out[start:start + len(batch)] = self(pixel_values).cpu()
        return out

    # ---- precomputation ----------------------------------------------------------------------

    def settings(self):
        """What determines the tokens, as recorded in a precomputed index (JSON-serialisable)."""
        return {"name_or_path": self.name_or_path, "config": self.tower.config.to_dict(),
                "layer": self.layer, "in_grid": list(self.in_grid), "out_grid": list(self.out_grid),
                "normalize": self.normalize, "standardization": self.standardization_digest(),
                "dtype": str(self.dtype).removeprefix("torch."),
                "hidden_size": self.hidden_size, "num_tokens": self.num_tokens}

    def precompute(self, keys, load_image, out_dir, shard_size=1024, batch_size=32, progress=True):
        """Encodes a whole image set once, so training can skip the tower.

        Writes ``out_dir/tokens-00000.safetensors``, ... (tensor ``"tokens"``: ``[rows, oh*ow, D]``
        in the tower's dtype, at most ``shard_size`` rows each) and, last, ``out_dir/index.json``
        holding `settings` plus ``shards`` (file names) and ``keys`` (``key -> [shard, row]``).

        Args:
            keys: distinct string keys, e.g. ``ShapesDataset.image_keys()``.
            load_image: ``key -> PIL.Image``, e.g. ``ShapesDataset.image``.
            out_dir: created if missing; existing shards and index there are replaced.
            shard_size: images per shard.
            batch_size: images per tower forward.
            progress: show a tqdm bar over images.

        Returns:
            the `PrecomputedTokens` over what was written.
        """
        from safetensors.torch import save_file

        keys = list(keys)
        if not all(isinstance(k, str) for k in keys):
            raise ValueError("keys must be strings (they become JSON keys of the index)")
        if len(set(keys)) != len(keys):
            raise ValueError("keys must be distinct")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        os.makedirs(out_dir, exist_ok=True)
        index_path = os.path.join(out_dir, INDEX_FILE)
        if os.path.exists(index_path):  # a stale index must never point at new shards
            os.remove(index_path)

        shards, where = [], {}
        with tqdm(total=len(keys), desc="visual tokens", unit="img", disable=not progress) as bar:
            for shard, start in enumerate(range(0, len(keys), shard_size)):
                shard_keys = keys[start:start + shard_size]
                tokens = torch.empty(len(shard_keys), self.num_tokens, self.hidden_size, dtype=self.dtype)
                # Load images one batch at a time so only a batch of PIL images is ever in memory.
                for b in range(0, len(shard_keys), batch_size):
                    batch_keys = shard_keys[b:b + batch_size]
                    tokens[b:b + len(batch_keys)] = self.encode_images([load_image(k) for k in batch_keys],
                                                                       batch_size=batch_size)
                    bar.update(len(batch_keys))
                name = SHARD_NAME.format(shard)
                save_file({"tokens": tokens}, os.path.join(out_dir, name))
                shards.append(name)
                where.update((k, [shard, row]) for row, k in enumerate(shard_keys))

        index = {"format": INDEX_FORMAT, **self.settings(), "num_images": len(keys), "shards": shards,
                 "keys": where}
        tmp = index_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(index, f)
        os.replace(tmp, index_path)  # atomic: a reader sees either no index or a complete one
        return load_precomputed(out_dir)


class PrecomputedTokens:
    """Read-only view of a `VisualTokens.precompute` output directory. Shards are memory-mapped
    and read row by row, so a large set costs no RAM up front; picklable (DataLoader workers
    reopen the shards).

    Attributes: ``name_or_path``, ``config`` (dict), ``layer``, ``in_grid``, ``out_grid``,
    ``normalize``, ``standardization`` (the statistics' digest, or None), ``dtype`` (str),
    ``hidden_size``, ``num_tokens``, ``index`` (the whole index dict).
    """

    def __init__(self, out_dir):
        self.out_dir = str(out_dir)
        with open(os.path.join(self.out_dir, INDEX_FILE)) as f:
            self.index = json.load(f)
        if self.index.get("format") != INDEX_FORMAT:
            raise ValueError(f"unsupported index format {self.index.get('format')!r} in {self.out_dir}")
        for name in ("name_or_path", "config", "layer", "normalize", "dtype", "hidden_size", "num_tokens"):
            setattr(self, name, self.index[name])
        self.in_grid, self.out_grid = tuple(self.index["in_grid"]), tuple(self.index["out_grid"])
        self.standardization = self.index.get("standardization")  # absent from older indices
        self._keys = self.index["keys"]
        self._handles = {}

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key):
        return key in self._keys

    def keys(self):
        """The image keys, in the order they were precomputed."""
        return self._keys.keys()

    def __getitem__(self, key):
        """Returns the ``[num_tokens, hidden_size]`` tokens of ``key`` (a CPU tensor in the
        recorded dtype); raises KeyError for an unknown key."""
        shard, row = self._keys[key]
        return self._shard(shard).get_slice("tokens")[row:row + 1][0]

    def _shard(self, shard):
        handle = self._handles.get(shard)
        if handle is None:
            from safetensors import safe_open

            path = os.path.join(self.out_dir, self.index["shards"][shard])
            handle = self._handles[shard] = safe_open(path, framework="pt")
        return handle

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"] = {}  # open file handles do not pickle
        return state

    def __repr__(self):
        return (f"PrecomputedTokens({self.out_dir!r}, images={len(self)}, layer={self.layer}, "
                f"out_grid={self.out_grid}, normalize={self.normalize}, dtype={self.dtype})")


def load_precomputed(out_dir):
    """Opens what `VisualTokens.precompute` wrote to ``out_dir``; returns `PrecomputedTokens`."""
    return PrecomputedTokens(out_dir)
