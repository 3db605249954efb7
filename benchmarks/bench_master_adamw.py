"""One optimizer step of `MasterWeightAdamW` over LLaMA-3.2-1B-shaped bf16 parameters (1.24B, the
one-GPU training path): the fused vpit_fast kernel against torch's AdamW between casts, in the
same process.

- vpit_fast (``impl="vpit"``): one pass; per parameter it reads the bf16 gradient and the fp32
  master, exp_avg and exp_avg_sq and writes those three and the bf16 parameter: 28 bytes.
- torch (``impl="torch"``): the bf16 gradients cast into fp32 buffers (6 bytes), torch's fused
  AdamW on the masters (28 bytes), the masters copied into the parameters (6 bytes): 40 bytes.

The floor is 28 bytes per parameter at the copy bandwidth (2.94 TB/s on the H100: 11.8 ms).
extra_info: ms, GB/s counting each implementation's own bytes, the fraction of the floor.
Run: pytest benchmarks/bench_master_adamw.py (CUDA only).
"""

import pytest
import torch

from conftest import H100_COPY_BYTES_PER_S, measure, requires_cuda

FLOOR_BYTES_PER_PARAM = 28
BYTES_PER_PARAM = {"vpit": 28, "torch": 40}


def llama_1b_shapes():
    hidden, inter, kv, vocab = 2048, 8192, 512, 128256
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
             (hidden, inter), (hidden,), (hidden,)]
    return [(vocab, hidden)] + layer * 16 + [(hidden,)]


@requires_cuda
@pytest.mark.parametrize("impl", ["vpit", "torch"])
def test_master_adamw_step(benchmark, impl):
    from vpit_fast.train.master_adamw import MasterWeightAdamW

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=torch.bfloat16) * 0.02)
              for s in llama_1b_shapes()]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = MasterWeightAdamW(params, lr=1e-5, weight_decay=0.1, impl=impl)
    count = sum(p.numel() for p in params)
    ms = measure(benchmark, optimizer.step, warmup=3, reps=20, impl="vpit_fast" if impl == "vpit" else "torch",
                 parameters=count)
    floor_ms = count * FLOOR_BYTES_PER_PARAM / H100_COPY_BYTES_PER_S * 1e3
    benchmark.extra_info.update(ms=ms, gb_per_s=count * BYTES_PER_PARAM[impl] / (ms / 1e3) / 1e9,
                                floor_ms=floor_ms, fraction_of_floor=floor_ms / ms)
    del optimizer, params
    torch.cuda.empty_cache()
