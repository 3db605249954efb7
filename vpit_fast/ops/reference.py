"""Pure-PyTorch versions of every op: the ground truth of the tests, the peers of the benchmarks,
and what `impl="torch"` runs."""

import torch
import torch.nn.functional as F

from vpit_fast.ops.types import HeadLoss


def interpolate_tokens(x, out_size, in_size, normalize=False):
    """The official MetaMorph path: [B, h*w, C] -> grid -> bilinear (align_corners=False) in fp32
    (float64 for float64 input) -> optional L2 normalisation over C -> cast back -> [B, oh*ow, C]."""
    batch, _, channels = x.shape
    (in_h, in_w), (out_h, out_w) = in_size, out_size
    math_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    grid = x.reshape(batch, in_h, in_w, channels).permute(0, 3, 1, 2).contiguous()
    y = F.interpolate(grid.to(math_dtype), size=(out_h, out_w), mode="bilinear", align_corners=False)
    if normalize:
        y = F.normalize(y, dim=1, eps=1e-12)
    return y.to(x.dtype).permute(0, 2, 3, 1).reshape(batch, out_h * out_w, channels)


def head_loss(hidden, lm_weight, labels, visual_rows, visual_targets, vision_head,
              text_weight=1.0, visual_weight=1.0, ignore_index=-100, reduction="mean"):
    """The plain-PyTorch response-only heads and loss: the text rows (label != ignore_index) go
    through the LM head in the input dtype and cross-entropy in fp32; the visual rows go through
    vision_head in the input dtype and ``1 - cosine_similarity(eps=1e-8)`` in fp32. Float64
    inputs keep float64 throughout (the tests' ground truth). Inputs are trusted: the public
    `vpit_fast.head_loss` checks them. Returns a `HeadLoss`; only ``loss`` carries gradients."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f'reduction must be "mean" or "sum", got {reduction!r}')
    math_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32

    # Rows are selected before the heads run, so prompt rows cost nothing; sums over no rows are
    # 0 with zero gradients, and the mean divides by max(count, 1) so an empty modality is 0.
    text_rows = (labels != ignore_index).nonzero().squeeze(1)
    logits = hidden.index_select(0, text_rows) @ lm_weight.t()
    text_sum = F.cross_entropy(logits.to(math_dtype), labels.index_select(0, text_rows), reduction="sum")

    pred = vision_head(hidden.index_select(0, visual_rows))
    cos = F.cosine_similarity(pred.to(math_dtype), visual_targets.to(math_dtype), dim=-1, eps=1e-8)
    visual_sum = (1 - cos).sum()

    n_text, n_visual = text_rows.numel(), visual_rows.numel()
    if reduction == "mean":
        text_part, visual_part = text_sum / max(n_text, 1), visual_sum / max(n_visual, 1)
    else:
        text_part, visual_part = text_sum, visual_sum
    loss = text_weight * text_part + visual_weight * visual_part

    def count(n):
        return torch.tensor(n, dtype=torch.int64, device=hidden.device)

    return HeadLoss(loss, text_part.detach(), visual_part.detach(), count(n_text), count(n_visual))
