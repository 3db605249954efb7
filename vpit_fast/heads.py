"""`VPiTHeads`: the module that owns the LM head and the vision head and computes the fused loss
in its forward, so FSDP2 (or DeepSpeed ZeRO-3) gathers their weights once for forward and
backward instead of a loss function reading ``lm_head.weight`` from outside the module."""

from torch import nn

from vpit_fast.ops.head_loss import head_loss


class VPiTHeads(nn.Module):
    """LM head ``[V, H]`` plus vision head (``"linear"``: ``nn.Linear(H, Dv)``; ``"mlp"``:
    ``nn.Linear(H, H) -> GELU -> nn.Linear(H, Dv)``).

    Args:
        hidden_size, vocab_size, visual_dim: H, V and Dv.
        vision_head: ``"linear"`` or ``"mlp"``.
        lm_head: an existing ``nn.Linear(H, V, bias=False)`` to wrap (its Parameter is shared,
            e.g. a Hugging Face model's ``lm_head``); a new one when None.
    """

    def __init__(self, hidden_size, vocab_size, visual_dim, vision_head="linear", lm_head=None):
        super().__init__()
        if lm_head is None:
            lm_head = nn.Linear(hidden_size, vocab_size, bias=False)
        if not isinstance(lm_head, nn.Linear) or lm_head.bias is not None:
            raise ValueError("lm_head must be an nn.Linear without bias")
        if tuple(lm_head.weight.shape) != (vocab_size, hidden_size):
            raise ValueError(f"lm_head must be [{vocab_size}, {hidden_size}], got {tuple(lm_head.weight.shape)}")
        self.lm_head = lm_head
        # DeepSpeed ZeRO-3 gathers only a called module's own parameters; the loss reads the
        # children's weights without calling them, so ZeRO-3 must treat this module as one leaf
        # (gather everything under it for forward and backward). The flag is DeepSpeed's
        # `set_z3_leaf_module` contract; it means nothing to anything else.
        self._z3_leaf = True
        if vision_head == "linear":
            self.vision_head = nn.Linear(hidden_size, visual_dim)
        elif vision_head == "mlp":
            self.vision_head = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(),
                                             nn.Linear(hidden_size, visual_dim))
        else:
            raise ValueError(f'vision_head must be "linear" or "mlp", got {vision_head!r}')

    def forward(self, hidden, labels, visual_rows, visual_targets, **kwargs):
        """`vpit_fast.head_loss` with this module's weights; returns a `HeadLoss`."""
        return head_loss(hidden, self.lm_head.weight, labels, visual_rows, visual_targets,
                         self.vision_head, **kwargs)
