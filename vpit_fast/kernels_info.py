"""Facts about the kernels' memory traffic, shared by benchmarks and docs."""

import torch
import torch.nn.functional as F


def bilinear_source_tokens(in_size, out_size):
    """How many distinct input tokens bilinear interpolation (align_corners=False) reads with a
    non-zero weight: the bytes floor of the forward pass is (these + outputs) * channels."""
    in_h, in_w = in_size
    eye = torch.eye(in_h * in_w, dtype=torch.float64).view(-1, 1, in_h, in_w)
    weights = F.interpolate(eye, size=tuple(out_size), mode="bilinear", align_corners=False)
    return int((weights.flatten(1).abs().sum(1) > 0).sum())
