"""Visualizer shapes by name: the diffusers configs of the UNet, the VAE and the noise schedule.

    tiny   pixel space (no VAE), 32x32 RGB, a two-level UNet (32, 64 channels, one resnet per
           level, cross-attention at the lower level and in the middle), cross-attention dim 64,
           projector hidden 256 (1.0M trainable parameters): about 60 images/s of training on
           two CPU cores (1 step/s at batch 64).
    tiny-cpu  pixel space, 24x24 (the smallest side at which the checker of
           `vpit_fast.visualizer.check` still tells every small shape apart), two levels (16, 32
           channels), cross-attention 32, projector hidden 128, and spatial conditioning (the
           token grid also enters as 32 input channels; see `Visualizer`): 0.27M parameters, for
           the embedded default on two CPU cores.
    small  pixel space, 64x64, three levels (64, 128, 128), cross-attention 128, projector hidden
           512 (6.8M trainable parameters): shapes drawn at twice tiny's resolution, for a GPU.
    sd15   the shapes of Stable Diffusion 1.5: a 4-channel latent UNet (320, 640, 1280, 1280),
           cross-attention 768, its VAE (8x downsampling, scaling factor 0.18215), 512x512
           images, the paper's projector (hidden 2048). Random weights when built from the
           preset; `Visualizer.from_stable_diffusion` loads real SD-1.5 weights from a local path.

The noise schedules are diffusers ``DDPMScheduler`` configs (training); sampling uses a
``DDIMScheduler`` built from the same config (see `Visualizer.decode`).
"""

__all__ = ["SCHEDULERS", "UNETS", "VAES", "VISUALIZERS", "preset"]

UNETS = {
    "tiny": dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                 cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8),
    # in_channels: the pixels and the 32-channel token map of spatial conditioning.
    "tiny-cpu": dict(sample_size=24, in_channels=35, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                     cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8),
    "small": dict(sample_size=64, in_channels=3, out_channels=3, block_out_channels=(64, 128, 128), layers_per_block=1,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  cross_attention_dim=128, attention_head_dim=4, norm_num_groups=16),
    # runwayml/stable-diffusion-v1-5 unet/config.json
    "sd15": dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
}

VAES = {
    # runwayml/stable-diffusion-v1-5 vae/config.json
    "sd15": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                 layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512,
                 scaling_factor=0.18215),
}

SCHEDULERS = {
    # Pixel space: the cosine schedule of improved DDPM (better than linear at low resolution)
    # with v-prediction (Salimans & Ho 2022): near the last timestep the input is almost pure noise
    # (alpha_bar ~ 1e-9), so an epsilon model learns nothing there about the picture, while a
    # v model predicts the picture itself. x0 estimates are clipped to [-1, 1] while sampling.
    "pixel": dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                  clip_sample=True),
    # Stable Diffusion 1.5's training schedule; latents are not clipped.
    "sd15": dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 prediction_type="epsilon", clip_sample=False),
}

VISUALIZERS = {
    "tiny": dict(unet="tiny", vae=None, scheduler="pixel", projector_hidden_dim=256, image_size=32),
    "tiny-cpu": dict(unet="tiny-cpu", vae=None, scheduler="pixel", projector_hidden_dim=128, image_size=24,
                     spatial_condition=True),
    "small": dict(unet="small", vae=None, scheduler="pixel", projector_hidden_dim=512, image_size=64),
    "sd15": dict(unet="sd15", vae="sd15", scheduler="sd15", projector_hidden_dim=2048, image_size=512),
}


def preset(name):
    """The configs of visualizer preset ``name``: a dict with ``unet`` (UNet2DConditionModel
    fields), ``vae`` (AutoencoderKL fields, or None for pixel space), ``scheduler``
    (DDPMScheduler fields), ``projector_hidden_dim``, ``image_size`` and ``spatial_condition``.
    New dicts each call."""
    if name not in VISUALIZERS:
        raise ValueError(f"unknown visualizer preset {name!r}; choose one of {sorted(VISUALIZERS)}")
    entry = VISUALIZERS[name]
    return {"unet": dict(UNETS[entry["unet"]]),
            "vae": None if entry["vae"] is None else dict(VAES[entry["vae"]]),
            "scheduler": dict(SCHEDULERS[entry["scheduler"]]),
            "projector_hidden_dim": entry["projector_hidden_dim"], "image_size": entry["image_size"],
            "spatial_condition": entry.get("spatial_condition", False)}
