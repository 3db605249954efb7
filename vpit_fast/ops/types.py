"""Result types shared by the ops, their references and the modules that wrap them."""

from typing import NamedTuple

import torch


class HeadLoss(NamedTuple):
    """What `vpit_fast.head_loss` (and its reference) returns.

    Fields:
        loss: float32 scalar, ``text_weight * text_loss + visual_weight * visual_loss``. The only
            field that carries gradients (to hidden, the LM-head weight and the vision head).
        text_loss: float32 scalar, detached. Cross-entropy over the text rows (rows whose label is
            not ignore_index): their mean, or their sum with ``reduction="sum"``; 0 when none.
        visual_loss: float32 scalar, detached. ``1 - cos(vision_head(hidden[visual_rows]),
            visual_targets)`` over the visual rows: mean or sum as above; 0 when none.
        text_count: int64 scalar on hidden's device, the number of text rows.
        visual_count: int64 scalar on hidden's device, the number of visual rows.

    The reference run in float64 returns float64 losses (it is the tests' ground truth).
    """

    loss: torch.Tensor
    text_loss: torch.Tensor
    visual_loss: torch.Tensor
    text_count: torch.Tensor
    visual_count: torch.Tensor
