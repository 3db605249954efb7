"""Causal attention over a packed 1B-shaped batch (LLaMA-3.2-1B: 32 query heads, 8 K/V heads,
head_dim 64) of MetaMorph-like short samples: our short-segment kernels (`segment`) against
PyTorch's FlashAttention-2 (ATen's varlen ops with grouped K/V, what `torch_varlen` runs on this
torch) and, when importable, the flash_attn package, in the same process.

One layer's forward + backward (and forward alone) over 30360 tokens in segments of 20-200
tokens (mean ~110). The floor is the HBM traffic: forward reads q, k, v and writes out (and lse);
backward reads q, k, v, out, dout, lse and writes dq, dk, dv, at the measured copy rate.
Run: pytest benchmarks/bench_segment_attention.py --benchmark-only
"""

import pytest
import torch

from conftest import H100_COPY_BYTES_PER_S, measure, requires_cuda

TOKENS, HEADS, KV_HEADS, HEAD_DIM = 30360, 32, 8, 64


def segments(seed=1):
    generator = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < TOKENS:
        lengths.append(int(torch.randint(20, 201, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - TOKENS
    return lengths


def floor_bytes(backward):
    q_bytes = TOKENS * HEADS * HEAD_DIM * 2
    kv_bytes = TOKENS * KV_HEADS * HEAD_DIM * 2
    lse_bytes = TOKENS * HEADS * 4
    forward = q_bytes + 2 * kv_bytes + q_bytes + lse_bytes
    if not backward:
        return forward
    return forward + (q_bytes + 2 * kv_bytes + 2 * q_bytes + lse_bytes) + (q_bytes + 2 * kv_bytes)


def backends():
    from vpit_fast import attention

    def segment(q, k, v, cu, m):
        return attention.varlen_attention(q, k, v, cu, m, backend="segment")

    def aten_flash(q, k, v, cu, m):
        return attention._GroupedFlashVarlen.apply(q, k, v, cu, m, None, None)

    found = {"segment": segment, "torch-flash-attention-2": aten_flash}
    if attention._flash_attn_varlen_func() is not None:
        found["flash_attn"] = lambda q, k, v, cu, m: attention.varlen_attention(q, k, v, cu, m, backend="flash_attn")
    return found


@requires_cuda
@pytest.mark.parametrize("name", ["segment", "torch-flash-attention-2", "flash_attn"])
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward+backward"])
def test_packed_attention(benchmark, name, backward):
    fns = backends()
    if name not in fns:
        pytest.skip(f"{name} is not importable here")
    fn = fns[name]
    lengths = segments()
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    torch.manual_seed(0)
    q = torch.randn(TOKENS, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
    k, v = (torch.randn(TOKENS, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
            for _ in range(2))
    grad_out = torch.randn_like(q)

    def run():
        if backward:
            out = fn(q, k, v, cu, max(lengths))
            torch.autograd.grad(out, (q, k, v), grad_out)
        else:
            with torch.no_grad():
                fn(q, k, v, cu, max(lengths))

    ms = measure(benchmark, run, tokens=TOKENS, segments=len(lengths), max_seqlen=max(lengths),
                 heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM)
    benchmark.extra_info["fraction_of_memory_floor"] = floor_bytes(backward) / H100_COPY_BYTES_PER_S / (ms / 1e3)
