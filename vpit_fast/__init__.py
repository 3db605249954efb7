"""vpit_fast: fused kernels and a lean training stack for Visual-Predictive Instruction Tuning.

Public API:
    interpolate_tokens  -- SigLIP patch tokens -> a smaller grid (64 tokens), bilinear, fused L2 norm
    decode_attention    -- one query token per row against a KV cache (split-K on CUDA), grouped heads
    head_loss           -- fused LM head + CE on text rows and vision head + cosine on visual rows
    VPiTHeads           -- the module owning both heads, computing head_loss in its forward
    HeadLoss            -- what head_loss returns
    MasterWeightAdamW   -- AdamW for bf16/fp16 parameters keeping fp32 master weights
    build_info          -- what the compiled extension was built with
    VPiTModel, VPiTConfig -- the model on Hugging Face LLMs (imported on first use: transformers)
"""

__version__ = "0.1.0"

from vpit_fast._extension import build_info
from vpit_fast.heads import VPiTHeads
from vpit_fast.ops.decode_attention import decode_attention
from vpit_fast.ops.head_loss import head_loss
from vpit_fast.ops.interpolate_tokens import interpolate_tokens
from vpit_fast.ops.types import HeadLoss
from vpit_fast.train.master_adamw import MasterWeightAdamW

__all__ = ["__version__", "HeadLoss", "MasterWeightAdamW", "VPiTConfig", "VPiTHeads", "VPiTModel", "build_info", "decode_attention", "head_loss",
           "interpolate_tokens"]


def __getattr__(name):
    # The model pulls in transformers; the kernels alone do not need it.
    if name in ("VPiTModel", "VPiTConfig"):
        from vpit_fast import model

        return getattr(model, name)
    raise AttributeError(f"module 'vpit_fast' has no attribute {name!r}")
