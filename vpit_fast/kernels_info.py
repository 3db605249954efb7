"""Facts about the kernels' memory traffic and the bilinear weights, shared by benchmarks and docs."""

import torch
import torch.nn.functional as F


def bilinear_weights(in_size, out_size, dtype=torch.float64, device=None):
    """The ``[oh*ow, h*w]`` matrix of bilinear weights (align_corners=False): output tokens =
    this matrix @ input tokens. Built by interpolating the identity, so it is PyTorch's own."""
    in_h, in_w = in_size
    eye = torch.eye(in_h * in_w, dtype=dtype, device=device).view(-1, 1, in_h, in_w)
    weights = F.interpolate(eye, size=tuple(out_size), mode="bilinear", align_corners=False)
    return weights.flatten(1).t().contiguous()


def bilinear_source_tokens(in_size, out_size):
    """How many distinct input tokens bilinear interpolation reads with a non-zero weight: the
    bytes floor of the forward pass is (these + outputs) * channels."""
    return int((bilinear_weights(in_size, out_size).abs().sum(0) > 0).sum())
