"""vpit_fast: fused kernels and a lean training stack for Visual-Predictive Instruction Tuning.

Public API:
    interpolate_tokens  -- SigLIP patch tokens -> a smaller grid (64 tokens), bilinear, fused L2 norm
    build_info          -- what the compiled extension was built with
"""

__version__ = "0.1.0"

from vpit_fast._extension import build_info
from vpit_fast.ops.interpolate_tokens import interpolate_tokens

__all__ = ["__version__", "build_info", "interpolate_tokens"]
