"""Gradient accumulation in fp32 for low-precision parameters (one GPU, no FSDP).

Autograd adds each micro-batch's gradient into ``.grad`` in the parameter's dtype: with bf16
parameters every micro-batch rounds the running sum to 8 bits of mantissa, and a small gradient
added to a large sum can vanish (256 + 1 is 256 in bf16). `Fp32GradSum` keeps the sum in fp32
between micro-batches instead and rounds it to the parameter's dtype once, after the last one,
so the optimizer (and clipping) see what a single bf16 gradient of the whole step would be.
FSDP2 needs none of this: its sharded gradients are fp32 already (``reduce_dtype``).

Cost per element and micro-batch after the first: one bf16 read plus an fp32 read and write
(10 bytes, against autograd's 6 for a bf16 sum); an fp32 buffer per parameter lives during the
step.
"""

from vpit_fast.train.master_adamw import LOW_PRECISION

__all__ = ["Fp32GradSum"]


class Fp32GradSum:
    """Sums the ``.grad`` of the low-precision parameters among ``params`` in fp32.

    After each micro-batch's backward call `collect` (``last=True`` after the step's last one):
    before the last, the gradients move into the fp32 sums and ``.grad`` is released (`fold`);
    after it, ``.grad`` becomes the whole sum rounded once to the parameter's dtype (`finish`).
    fp32 parameters are left to autograd.
    """

    def __init__(self, params):
        self.params = [p for p in params if p.requires_grad and p.dtype in LOW_PRECISION]
        self.sums = {}

    def collect(self, last):
        if last:
            self.finish()
        else:
            self.fold()

    def fold(self):
        for p in self.params:
            if p.grad is None:
                continue
            total = self.sums.get(p)
            if total is None:
                self.sums[p] = p.grad.float()
            else:
                total.add_(p.grad)
            p.grad = None

    def finish(self):
        for p, total in self.sums.items():
            if p.grad is not None:
                total.add_(p.grad)
            p.grad = total.to(p.dtype)
        self.sums = {}
