"""The visualizer: a diffusion model (diffusers UNet, optional VAE) conditioned on visual tokens
through the MetaMorph projector, so the tokens a VPiT model predicts become pictures.

Public API:
    Visualizer        -- projector + UNet (+ frozen VAE) + noise schedule: `training_loss`,
                         `decode` (tokens -> PIL images, classifier-free guidance),
                         `save_pretrained` / `from_pretrained`, `from_preset`,
                         `from_stable_diffusion` (a local SD-1.5 directory)
    TokenProjector    -- Linear -> LayerNorm -> ReLU -> Linear -> LayerNorm, tokens -> context
    LogWarmupLinearDecay -- the paper's learning-rate schedule (a LambdaLR multiplier)
    train_visualizer  -- the training run (`python -m vpit_fast.visualizer.train`)
    VisualizerTrainConfig, TRAIN_PRESETS -- its configuration and named presets
    check.check_picture -- does a picture show the asked shape and colour (the shapes data)
    evaluate            -- a visualizer's kind and colour accuracy on held-out true tokens
                           (`python -m vpit_fast.visualizer.evaluate`)
"""

from vpit_fast.visualizer.model import Visualizer
from vpit_fast.visualizer.projector import TokenProjector
from vpit_fast.visualizer.schedule import LogWarmupLinearDecay

_TRAIN_NAMES = ("TRAIN_PRESETS", "VisualizerTrainConfig", "train_visualizer")


def __getattr__(name):
    # The training module is imported on first use, so `python -m vpit_fast.visualizer.train` does
    # not find it already imported (runpy warns about that).
    if name in _TRAIN_NAMES:
        from vpit_fast.visualizer import train

        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["LogWarmupLinearDecay", "TRAIN_PRESETS", "TokenProjector", "Visualizer", "VisualizerTrainConfig",
           "train_visualizer"]
