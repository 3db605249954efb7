"""The visualizer: a diffusion "autoencoder" that turns visual tokens back into pictures
(MetaMorph section 2.3, appendix A.2).

Visual tokens ``[B, T, Dv]`` go through the `TokenProjector` and become the cross-attention
context of a diffusers ``UNet2DConditionModel`` (where Stable Diffusion has CLIP text embeddings).
The UNet denoises VAE latents (``AutoencoderKL``, frozen) or, with no VAE, the pixels themselves.
Classifier-free guidance: training replaces a random fraction of the contexts with a learned
null context ``[T, C]`` (zeros at the start); sampling mixes the two predictions (noise or velocity),
``pred = pred_null + guidance_scale * (pred_cond - pred_null)``.

Spatial conditioning (``spatial_condition=True``, the "tiny-cpu" preset; not in the paper): the
context, seen as its token grid (8x8), is also resized to the UNet's input and concatenated to
it as C extra channels. The tokens of a grid cell describe that part of the picture, so a tiny
UNet only has to decode them locally; through cross-attention alone (whose keys carry no
position) it must first learn where every token belongs, which a few CPU minutes do not teach.

Saved layout (`Visualizer.save_pretrained`)::

    visualizer_config.json   widths, token count, image size, where the tokens come from
    projector.safetensors    the projector and the null context
    unet/  vae/  scheduler/  diffusers formats (vae/ only in latent space)
"""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vpit_fast.visualizer.presets import SCHEDULERS, preset
from vpit_fast.visualizer.projector import TokenProjector

__all__ = ["Visualizer", "resolve_directory"]

CONFIG_FILE = "visualizer_config.json"
WEIGHTS_FILE = "projector.safetensors"
CONFIG_FORMAT = 1
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class Visualizer(nn.Module):
    """Projector + UNet (+ frozen VAE) + noise schedule.

    Args:
        unet: a diffusers ``UNet2DConditionModel``; its ``cross_attention_dim`` must equal the
            projector's output width, its ``in_channels`` the VAE's latent channels (3 without
            a VAE).
        projector: a `TokenProjector`.
        scheduler: a diffusers ``DDPMScheduler`` (the training noise schedule; its config also
            builds the sampler).
        vae: a diffusers ``AutoencoderKL`` (frozen here), or None for pixel space.
        num_tokens: T, visual tokens per image (64 = 8x8).
        image_size: side of the images in pixels (a multiple of the UNet's and VAE's total
            downsampling).
        token_source: optional JSON-serialisable description of the tokens' encoder (e.g.
            `VisualTokens.settings()`), saved with the model.
        spatial_condition: also feed the context as a channel map (see the module docstring);
            ``num_tokens`` must be a square grid and the UNet must take C more input channels.
    """

    def __init__(self, unet, projector, scheduler, vae=None, num_tokens=64, image_size=32, token_source=None,
                 spatial_condition=False):
        super().__init__()
        cross = unet.config.cross_attention_dim
        if projector.cross_attention_dim != cross:
            raise ValueError(f"projector's output width {projector.cross_attention_dim} differs from the UNet's "
                             f"cross_attention_dim {cross}")
        channels = 3 if vae is None else vae.config.latent_channels
        extra = cross if spatial_condition else 0
        if unet.config.in_channels != channels + extra or unet.config.out_channels != channels:
            raise ValueError(f"the UNet must take {channels + extra} and give {channels} channels "
                             f"({'pixels' if vae is None else 'VAE latents'}"
                             f"{f' + a {extra}-channel token map' if extra else ''}), got in_channels="
                             f"{unet.config.in_channels}, out_channels={unet.config.out_channels}")
        if spatial_condition and (not isinstance(num_tokens, int) or math.isqrt(num_tokens) ** 2 != num_tokens):
            raise ValueError(f"spatial_condition needs a square token grid, got num_tokens={num_tokens!r}")
        if scheduler.config.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"scheduler prediction_type must be one of {PREDICTION_TYPES}, "
                             f"got {scheduler.config.prediction_type!r}")
        if not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
        self.unet, self.projector, self.scheduler, self.vae = unet, projector, scheduler, vae
        self.num_tokens = num_tokens
        self.image_size = self._check_image_size(image_size)
        self.token_source = token_source
        self.spatial_condition = bool(spatial_condition)
        self.null_condition = nn.Parameter(torch.zeros(num_tokens, cross))
        if vae is not None:
            vae.requires_grad_(False)
            vae.eval()

    # ---- constructors ------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name, visual_dim, num_tokens=64, image_size=None, projector_hidden_dim=None,
                    token_source=None):
        """A visualizer with random weights in the shapes of preset ``name`` (see
        `vpit_fast.visualizer.presets`); ``image_size`` and ``projector_hidden_dim`` override the
        preset's."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        configs = preset(name)
        image_size = configs["image_size"] if image_size is None else image_size
        vae = None if configs["vae"] is None else AutoencoderKL(**configs["vae"])
        unet_fields = dict(configs["unet"])
        if isinstance(image_size, int) and image_size > 0:
            unet_fields["sample_size"] = image_size // _vae_factor(vae)
        unet = UNet2DConditionModel(**unet_fields)
        projector = TokenProjector(visual_dim, unet.config.cross_attention_dim,
                                   projector_hidden_dim or configs["projector_hidden_dim"])
        return cls(unet, projector, DDPMScheduler(**configs["scheduler"]), vae, num_tokens=num_tokens,
                   image_size=image_size, token_source=token_source, spatial_condition=configs["spatial_condition"])

    @classmethod
    def from_stable_diffusion(cls, path, visual_dim, num_tokens=64, projector_hidden_dim=2048, image_size=None,
                              token_source=None, dtype=None):
        """Starts from a local Stable Diffusion 1.5 checkpoint in diffusers format: ``path/unet``
        and ``path/vae`` are loaded (the text encoder is not used), ``path/scheduler`` gives the
        noise schedule when present (else SD-1.5's), and a new projector maps ``visual_dim``-wide
        tokens to the UNet's cross-attention width. ``image_size`` defaults to the UNet's
        ``sample_size`` times the VAE's downsampling (512 for SD-1.5). Nothing is downloaded:
        a missing directory raises FileNotFoundError."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        path = Path(path)
        missing = [sub for sub in ("unet", "vae") if not (path / sub / "config.json").is_file()]
        if missing:
            raise FileNotFoundError(f"{str(path)!r} is not a local Stable Diffusion checkpoint in diffusers format: "
                                    f"no {', '.join(s + '/config.json' for s in missing)} (nothing is downloaded; "
                                    f"give the directory of e.g. stable-diffusion-v1-5)")
        kwargs = {} if dtype is None else {"torch_dtype": dtype}
        unet = UNet2DConditionModel.from_pretrained(path / "unet", **kwargs)
        vae = AutoencoderKL.from_pretrained(path / "vae", **kwargs)
        if (path / "scheduler").is_dir():
            # SD ships a PNDM config; its betas carry over. Latents are never clipped.
            scheduler = DDPMScheduler.from_pretrained(path / "scheduler", clip_sample=False)
        else:
            scheduler = DDPMScheduler(**SCHEDULERS["sd15"])
        if image_size is None:
            image_size = unet.config.sample_size * _vae_factor(vae)
        projector = TokenProjector(visual_dim, unet.config.cross_attention_dim, projector_hidden_dim)
        if dtype is not None:
            projector.to(dtype)
        return cls(unet, projector, scheduler, vae, num_tokens=num_tokens, image_size=image_size,
                   token_source=token_source)

    # ---- properties --------------------------------------------------------------------------

    @property
    def visual_dim(self):
        return self.projector.visual_dim

    @property
    def device(self):
        return self.null_condition.device

    @property
    def dtype(self):
        return self.null_condition.dtype

    @property
    def latent_size(self):
        """Side of what the UNet denoises: ``image_size`` over the VAE's downsampling."""
        return self.image_size // _vae_factor(self.vae)

    def _check_image_size(self, image_size):
        # The UNet halves the resolution once per level but the last; the VAE more on top.
        multiple = _vae_factor(self.vae) * 2 ** (len(self.unet.config.block_out_channels) - 1)
        if not isinstance(image_size, int) or image_size < 1 or image_size % multiple:
            raise ValueError(f"image_size must be a positive multiple of {multiple} for this UNet"
                             f"{' and VAE' if self.vae is not None else ''}, got {image_size!r}")
        return image_size

    def train(self, mode=True):
        """The VAE stays in eval mode (it is frozen)."""
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()
        return self

    def extra_repr(self):
        space = "pixels" if self.vae is None else f"latents {self.latent_size}x{self.latent_size}"
        return f"num_tokens={self.num_tokens}, image_size={self.image_size}, {space}"

    # ---- conditioning ------------------------------------------------------------------------

    def _check_tokens(self, visual_tokens, batch=None):
        if not isinstance(visual_tokens, torch.Tensor) or visual_tokens.dim() != 3:
            shape = tuple(visual_tokens.shape) if isinstance(visual_tokens, torch.Tensor) else type(visual_tokens)
            raise ValueError(f"visual_tokens must be a [B, {self.num_tokens}, {self.visual_dim}] tensor, got {shape}")
        if tuple(visual_tokens.shape[1:]) != (self.num_tokens, self.visual_dim):
            raise ValueError(f"visual_tokens must be [B, {self.num_tokens}, {self.visual_dim}] (num_tokens, "
                             f"visual_dim of this visualizer), got {tuple(visual_tokens.shape)}")
        if not visual_tokens.is_floating_point():
            raise ValueError(f"visual_tokens must be a float tensor, got {visual_tokens.dtype}")
        if batch is not None and visual_tokens.shape[0] != batch:
            raise ValueError(f"visual_tokens hold {visual_tokens.shape[0]} images but images hold {batch}")
        return visual_tokens.to(self.device)

    def condition(self, visual_tokens, drop=None):
        """The UNet's cross-attention context ``[B, T, C]``: the projected tokens, with the rows
        where ``drop`` (a ``[B]`` bool tensor) is true replaced by the null context."""
        context = self.projector(self._check_tokens(visual_tokens))
        if drop is not None:
            null = self.null_condition.to(context.dtype).expand_as(context)
            context = torch.where(drop.to(context.device)[:, None, None], null, context)
        return context

    def predict(self, sample, t, context):
        """The UNet's prediction (noise, velocity or sample, as the schedule says) for ``sample``
        ``[B, c, s, s]`` at timesteps ``t`` given the context ``[B, T, C]``; with
        ``spatial_condition`` the context's token grid, resized to ``s x s`` (bilinear), is
        concatenated to the input as C more channels."""
        if self.spatial_condition:
            side = math.isqrt(self.num_tokens)
            grid = context.transpose(1, 2).reshape(context.shape[0], -1, side, side)  # tokens are row-major
            grid = F.interpolate(grid.float(), size=sample.shape[-2:], mode="bilinear", align_corners=False)
            sample = torch.cat([sample, grid.to(sample.dtype)], dim=1)
        return self.unet(sample.to(self.unet.dtype), t, encoder_hidden_states=context).sample

    # ---- training ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_images(self, images, generator=None):
        """Images ``[B, 3, S, S]`` in [-1, 1] -> what the UNet denoises: scaled VAE latents
        (a sample of the posterior, times the VAE's ``scaling_factor``) or the pixels."""
        if self.vae is None:
            return images
        latents = self.vae.encode(images.to(self.vae.dtype)).latent_dist.sample(generator)
        return latents * self.vae.config.scaling_factor

    def training_loss(self, images, visual_tokens, cond_dropout=0.1, generator=None):
        """The denoising loss of one batch: a uniform random timestep per image, noise added by
        the schedule, MSE between the UNet's prediction and the schedule's target (the noise for
        ``epsilon``, the velocity for ``v_prediction``, the clean input for ``sample``).

        Args:
            images: ``[B, 3, image_size, image_size]`` float in [-1, 1].
            visual_tokens: ``[B, num_tokens, visual_dim]``, the images' tokens.
            cond_dropout: probability that an image's context is replaced by the null context.
            generator: optional ``torch.Generator`` on the model's device for timesteps, noise
                and dropout (None: the global RNG).

        Returns:
            a 0-d float32 tensor with autograd history.
        """
        expected = (3, self.image_size, self.image_size)
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
            raise ValueError(f"images must be a [B, 3, {self.image_size}, {self.image_size}] tensor, got {shape}")
        if not 0.0 <= cond_dropout <= 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1], got {cond_dropout!r}")
        batch, device = images.shape[0], self.device
        visual_tokens = self._check_tokens(visual_tokens, batch)
        clean = self.encode_images(images.to(device), generator)
        noise = torch.randn(clean.shape, generator=generator, device=device, dtype=clean.dtype)
        steps = self.scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (batch,), generator=generator, device=device)
        drop = torch.rand(batch, generator=generator, device=device) < cond_dropout
        noisy = self.scheduler.add_noise(clean, noise, t)
        prediction = self.predict(noisy, t, self.condition(visual_tokens, drop))
        kind = self.scheduler.config.prediction_type
        target = noise if kind == "epsilon" else clean if kind == "sample" else \
            self.scheduler.get_velocity(clean, noise, t)
        return F.mse_loss(prediction.float(), target.float())

    # ---- sampling ----------------------------------------------------------------------------

    def sampler(self):
        """A fresh DDIM sampler over the training schedule ("trailing" timestep spacing, so the
        first step starts from pure noise at the last training timestep)."""
        from diffusers import DDIMScheduler

        return DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing", set_alpha_to_one=True)

    @torch.no_grad()
    def decode(self, visual_tokens, steps=50, guidance_scale=1.0, generator=None, output_type="pil", eta=0.0):
        """Pictures of visual tokens by DDIM sampling with classifier-free guidance.

        Args:
            visual_tokens: ``[M, num_tokens, visual_dim]`` (e.g. what the VPiT model predicted).
            steps: DDIM steps.
            guidance_scale: ``pred = pred_null + guidance_scale * (pred_cond - pred_null)`` (the
                UNet's noise or velocity predictions); 1 (the default) is unguided: only the
                conditional prediction runs, half the work; 0 ignores the tokens. The tokens
                fix the whole picture, so conditional and null predictions differ a lot and
                scales above 1 over-saturate: on the shapes, pixel MSE 0.18 at 1, 0.38 at 2,
                0.95 at 4.
            generator: ``torch.Generator`` for the initial noise (and for DDIM's noise when
                ``eta > 0``); the noise is drawn on the generator's device, so a CPU generator
                gives the same pictures on any device.
            output_type: ``"pil"`` (a list of M RGB ``PIL.Image``) or ``"pt"`` (a float32
                ``[M, 3, image_size, image_size]`` tensor in [-1, 1] on the model's device).
            eta: DDIM's stochasticity (0: deterministic given the initial noise).

        Returns:
            as ``output_type`` says.
        """
        if output_type not in ("pil", "pt"):
            raise ValueError(f'output_type must be "pil" or "pt", got {output_type!r}')
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        tokens = self._check_tokens(visual_tokens)
        count, device = tokens.shape[0], self.device
        sampler = self.sampler()
        sampler.set_timesteps(steps, device=device)
        guided = guidance_scale != 1.0
        context = self.condition(tokens)
        if guided:
            context = torch.cat([self.null_condition.to(context.dtype).expand_as(context), context])
        shape = (count, self.unet.config.out_channels, self.latent_size, self.latent_size)
        noise_device = generator.device if generator is not None else device
        sample = torch.randn(shape, generator=generator, device=noise_device, dtype=torch.float32).to(device)
        sample = sample * sampler.init_noise_sigma
        for t in sampler.timesteps:
            model_input = sampler.scale_model_input(torch.cat([sample] * 2) if guided else sample, t)
            prediction = self.predict(model_input, t, context).float()
            if guided:
                uncond, cond = prediction.chunk(2)
                prediction = uncond + guidance_scale * (cond - uncond)
            sample = sampler.step(prediction, t, sample, eta=eta, generator=generator).prev_sample
        if self.vae is not None:
            sample = self.vae.decode((sample / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        images = sample.float().clamp(-1.0, 1.0)
        return images if output_type == "pt" else to_pil(images)

    # ---- persistence -------------------------------------------------------------------------

    def config_dict(self):
        """What `save_pretrained` writes to ``visualizer_config.json``."""
        return {"format": CONFIG_FORMAT, "visual_dim": self.visual_dim, "num_tokens": self.num_tokens,
                "projector_hidden_dim": self.projector.hidden_dim,
                "cross_attention_dim": self.projector.cross_attention_dim, "image_size": self.image_size,
                "pixel_space": self.vae is None, "token_source": self.token_source,
                "spatial_condition": self.spatial_condition}

    def save_pretrained(self, directory):
        """Writes the layout of the module docstring into ``directory`` (created if missing)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(directory / "unet")
        if self.vae is not None:
            self.vae.save_pretrained(directory / "vae")
        self.scheduler.save_pretrained(directory / "scheduler")
        own = {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        own["null_condition"] = self.null_condition.data
        save_file({k: v.detach().contiguous().cpu() for k, v in own.items()}, str(directory / WEIGHTS_FILE))
        with open(directory / CONFIG_FILE, "w") as f:
            json.dump(self.config_dict(), f, indent=2)

    @classmethod
    def from_pretrained(cls, directory, dtype=None, device=None):
        """Loads what `save_pretrained` wrote (``directory``, or the ``visualizer/`` inside a
        `vpit-train-visualizer` out_dir), in eval mode; ``dtype`` and ``device`` place every
        part."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from safetensors.torch import load_file

        directory = resolve_directory(directory)
        with open(directory / CONFIG_FILE) as f:
            config = json.load(f)
        if config.get("format") != CONFIG_FORMAT:
            raise ValueError(f"unsupported visualizer format {config.get('format')!r} in {directory}")
        unet = UNet2DConditionModel.from_pretrained(directory / "unet")
        vae = None if config["pixel_space"] else AutoencoderKL.from_pretrained(directory / "vae")
        scheduler = DDPMScheduler.from_pretrained(directory / "scheduler")
        projector = TokenProjector(config["visual_dim"], config["cross_attention_dim"], config["projector_hidden_dim"])
        model = cls(unet, projector, scheduler, vae, num_tokens=config["num_tokens"], image_size=config["image_size"],
                    token_source=config.get("token_source"), spatial_condition=config.get("spatial_condition", False))
        state = load_file(str(directory / WEIGHTS_FILE))
        model.projector.load_state_dict({k[len("projector."):]: v for k, v in state.items()
                                         if k.startswith("projector.")})
        model.null_condition.data.copy_(state["null_condition"])
        if dtype is not None or device is not None:
            model.to(device=device, dtype=dtype)
        return model.eval()


def resolve_directory(directory):
    """``directory`` when it holds a saved visualizer, else its ``visualizer/`` subdirectory when
    that does (the out_dir of a `vpit-train-visualizer` run); FileNotFoundError otherwise."""
    for candidate in (Path(directory), Path(directory, "visualizer")):
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"{str(directory)!r} has no {CONFIG_FILE} (nor visualizer/{CONFIG_FILE}): not a "
                            f"Visualizer directory (nor a vpit-train-visualizer out_dir)")


def _vae_factor(vae):
    """How much the VAE downsamples (8 for SD's), 1 without a VAE."""
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


def to_pil(images):
    """``[M, 3, S, S]`` float in [-1, 1] -> a list of M RGB ``PIL.Image``."""
    from PIL import Image

    pixels = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]
