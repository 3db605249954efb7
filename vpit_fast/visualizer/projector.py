"""The MetaMorph visualizer's projector: visual tokens -> the diffusion UNet's cross-attention
context (paper, appendix A.2): Linear(Dv -> 2048) -> LayerNorm -> ReLU -> Linear(2048 -> C) ->
LayerNorm, applied to every token independently."""

import torch
from torch import nn

__all__ = ["TokenProjector"]


class TokenProjector(nn.Module):
    """Maps ``[B, T, visual_dim]`` visual tokens to ``[B, T, cross_attention_dim]``.

    Args:
        visual_dim: Dv, the width of the visual tokens (1152 for SigLIP-so400m).
        cross_attention_dim: C, the UNet's ``cross_attention_dim`` (768 for Stable Diffusion 1.5).
        hidden_dim: width of the middle layer (2048 in the paper; smaller for tiny models).
    """

    def __init__(self, visual_dim, cross_attention_dim, hidden_dim=2048):
        super().__init__()
        for name, value in (("visual_dim", visual_dim), ("cross_attention_dim", cross_attention_dim),
                            ("hidden_dim", hidden_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.visual_dim, self.cross_attention_dim, self.hidden_dim = visual_dim, cross_attention_dim, hidden_dim
        self.net = nn.Sequential(
            nn.Linear(visual_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, cross_attention_dim), nn.LayerNorm(cross_attention_dim))

    def forward(self, visual_tokens):
        """``[B, T, visual_dim]`` (any float dtype) -> ``[B, T, cross_attention_dim]`` in the
        projector's dtype (or the autocast dtype)."""
        if not isinstance(visual_tokens, torch.Tensor) or visual_tokens.dim() != 3:
            shape = tuple(visual_tokens.shape) if isinstance(visual_tokens, torch.Tensor) else type(visual_tokens)
            raise ValueError(f"visual_tokens must be a [B, T, {self.visual_dim}] tensor, got {shape}")
        if visual_tokens.shape[-1] != self.visual_dim:
            raise ValueError(f"visual_tokens must have width visual_dim={self.visual_dim}, "
                             f"got shape {tuple(visual_tokens.shape)}")
        return self.net(visual_tokens.to(self.net[0].weight.dtype))

    def extra_repr(self):
        return f"visual_dim={self.visual_dim}, hidden_dim={self.hidden_dim}, out={self.cross_attention_dim}"
