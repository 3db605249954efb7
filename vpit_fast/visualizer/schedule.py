"""The visualizer's learning-rate schedule (MetaMorph appendix A.2): a logarithmic warm-up from
zero to the peak over the first ``warmup_steps`` (2000 in the paper), then a linear decay to zero
over the next ``decay_steps`` (12000).

With ``n`` the 1-based number of the optimizer step (``n = s + 1`` for the scheduler's 0-based
step ``s``), ``W = warmup_steps`` and ``D = decay_steps``, the lr of step ``n`` is::

    peak * log(1 + n) / log(1 + W)      for n <= W      (peak exactly at n = W)
    peak * (1 - (n - W) / D)            for W < n <= W + D
    0                                   after

The paper says only "logarithmic warm-up ... from zero"; this form starts at
``peak * log 2 / log(1 + W)`` (9% of the peak for W = 2000) so no step is wasted at lr 0, and
rises fast at first, slowly near the peak.
"""

import math

import torch

__all__ = ["LogWarmupLinearDecay", "build_scheduler"]


class LogWarmupLinearDecay:
    """The lr multiplier at the scheduler's 0-based step ``s`` (see the module docstring); a
    callable object so ``LambdaLR.state_dict()`` keeps its parameters."""

    def __init__(self, warmup_steps, decay_steps):
        for name, value in (("warmup_steps", warmup_steps), ("decay_steps", decay_steps)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        if warmup_steps + decay_steps < 1:
            raise ValueError("warmup_steps + decay_steps must be at least 1")
        self.warmup_steps, self.decay_steps = warmup_steps, decay_steps

    @property
    def total_steps(self):
        return self.warmup_steps + self.decay_steps

    def __call__(self, step):
        n, warmup = step + 1, self.warmup_steps
        if n <= warmup:
            return math.log1p(n) / math.log1p(warmup)
        if self.decay_steps == 0:
            return 0.0
        return max(0.0, 1.0 - (n - warmup) / self.decay_steps)


def build_scheduler(optimizer, warmup_steps, decay_steps):
    """``LambdaLR`` applying `LogWarmupLinearDecay` to every group's initial lr (the peak); call
    ``scheduler.step()`` after each ``optimizer.step()``."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=LogWarmupLinearDecay(warmup_steps, decay_steps))
