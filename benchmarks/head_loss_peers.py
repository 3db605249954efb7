"""The implementations `vpit_fast.head_loss` is measured against, as plain functions.

Every function takes the same inputs as `vpit_fast.head_loss` and returns the scalar training loss
``mean CE(text rows) + mean(1 - cos(vision_head(hidden[visual_rows]), visual_targets))``:
    hidden          [N, H]   bf16/fp16/fp32, rows aligned with their targets
    lm_weight       [V, H]   same dtype
    labels          [N]      int64, a class in [0, V) or ignore_index
    visual_rows     [Nv]     int64 rows of hidden whose target is a visual token
    visual_targets  [Nv, Dv] same dtype as hidden
    vision_head     nn.Linear(H, Dv) or Linear -> GELU -> Linear
Liger-Kernel and Cut Cross-Entropy are imported when called, so this module imports without them.
"""

import torch
import torch.nn.functional as F

from vpit_fast.ops import reference

IGNORE_INDEX = -100


def visual_cosine_loss(hidden, visual_rows, visual_targets, vision_head):
    """The visual half every peer shares: the vision head on the visual rows only, cosine in fp32."""
    pred = vision_head(hidden.index_select(0, visual_rows))
    cos = F.cosine_similarity(pred.float(), visual_targets.float(), dim=-1, eps=1e-8)
    return (1 - cos).mean()


def official_style(hidden, lm_weight, labels, visual_rows, visual_targets, vision_head):
    """MetaMorph's training path: the LM head on all N rows, the logits upcast to fp32, then
    cross-entropy that ignores the prompt and visual rows (ignore_index)."""
    logits = (hidden @ lm_weight.t()).float()
    text = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    return text + visual_cosine_loss(hidden, visual_rows, visual_targets, vision_head)


def plain_selected(hidden, lm_weight, labels, visual_rows, visual_targets, vision_head):
    """Plain PyTorch with the text rows selected before the LM head (vpit_fast's reference)."""
    return reference.head_loss(hidden, lm_weight, labels, visual_rows, visual_targets, vision_head).loss


def liger(hidden, lm_weight, labels, visual_rows, visual_targets, vision_head):
    """Liger-Kernel's fused linear cross-entropy over all N rows (its drop-in use: ignored rows
    are masked by label), plus the separate cosine."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    text = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")(lm_weight, hidden, labels)
    return text + visual_cosine_loss(hidden, visual_rows, visual_targets, vision_head)


def cut_cross_entropy(hidden, lm_weight, labels, visual_rows, visual_targets, vision_head):
    """Cut Cross-Entropy over all N rows (it compacts the non-ignored rows itself; default
    gradient filtering), plus the separate cosine."""
    from cut_cross_entropy import linear_cross_entropy

    text = linear_cross_entropy(hidden, lm_weight, labels, ignore_index=IGNORE_INDEX, reduction="mean")
    return text + visual_cosine_loss(hidden, visual_rows, visual_targets, vision_head)


def ours(hidden, lm_weight, labels, visual_rows, visual_targets, vision_head):
    """vpit_fast.head_loss (the compiled op)."""
    import vpit_fast

    return vpit_fast.head_loss(hidden, lm_weight, labels, visual_rows, visual_targets, vision_head).loss


PEERS = {
    "ours": ours,
    "official": official_style,
    "plain_selected": plain_selected,
    "liger": liger,
    "cce": cut_cross_entropy,
}
# The package each peer needs beyond torch and vpit_fast.
REQUIRES = {"liger": "liger_kernel.transformers", "cce": "cut_cross_entropy"}
