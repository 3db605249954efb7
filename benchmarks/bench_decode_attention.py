"""Decode attention (one query token per row against a static KV cache, the decode step of
generation) against the PyTorch paths in the same process, per layer.

Shapes: LLaMA-3.2-1B (32 query heads, 8 KV heads, head dim 64) and LLaMA-3-8B (32 / 8 / 128), a
2176-slot cache (the generation benchmark's 2048-token prompt + 96 new tokens, rounded up to 128)
with 2112 slots filled, batch 1, 4, 8 and 16 (where the split-K op and dense SDPA cross over;
`vpit_fast.generation.FUSED_DECODE_MAX_PAIRS` picks between them). Peers: SDPA with the grouped query heads packed per KV
head and a boolean mask (what the decode step used before), transformers' sdpa path (KV heads
repeated, masked SDPA), and SDPA over exactly the filled slots without a mask (not usable in a
CUDA graph, whose cache length is fixed; shown as the best case of a dense kernel). Each is timed
as CUDA-graph replays of 16 calls (GPU time, no host dispatch). The floor: the filled keys and
values read once at the copy bandwidth."""

import pytest
import torch
import torch.nn.functional as F

import vpit_fast

from conftest import H100_COPY_BYTES_PER_S, graph_replay, measure, requires_cuda

CACHE, FILLED = 2176, 2112
MODELS = {"llama3.2-1b": (32, 8, 64), "llama3-8b": (32, 8, 128)}
CALLS = 16


def inputs(batch, heads, kv_heads, dim):
    q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, kv_heads, CACHE, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    valid = torch.zeros(batch, CACHE, dtype=torch.bool, device="cuda")
    valid[:, :FILLED] = True
    return q, k, v, valid


def ours(q, k, v, valid):
    return vpit_fast.decode_attention(q, k, v, valid)


def sdpa_packed(q, k, v, valid):
    B, H, D = q.shape
    Hkv = k.shape[1]
    return F.scaled_dot_product_attention(q.view(B, Hkv, H // Hkv, D), k, v, attn_mask=valid[:, None, None])


def sdpa_repeated(q, k, v, valid):
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q[:, :, None], k.repeat_interleave(group, 1),
                                          v.repeat_interleave(group, 1), attn_mask=valid[:, None, None])


def sdpa_exact_length(q, k, v, valid):
    B, H, D = q.shape
    Hkv = k.shape[1]
    return F.scaled_dot_product_attention(q.view(B, Hkv, H // Hkv, D), k[:, :, :FILLED], v[:, :, :FILLED])


IMPLS = {"vpit_fast": ours, "sdpa_packed_masked": sdpa_packed, "hf_sdpa_repeat_kv": sdpa_repeated,
         "sdpa_exact_length": sdpa_exact_length}


@requires_cuda
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("batch", [1, 4, 8, 16])
@pytest.mark.parametrize("model", list(MODELS))
def test_decode_attention(benchmark, model, batch, impl):
    heads, kv_heads, dim = MODELS[model]
    args = inputs(batch, heads, kv_heads, dim)
    fn = IMPLS[impl]
    reference = ours(*args).float()
    got = fn(*args).reshape(reference.shape).float()
    assert (got - reference).abs().max().item() < 2e-2  # every peer computes the same thing
    replay = graph_replay(lambda: fn(*args), CALLS)
    ms = measure(benchmark, replay, calls_per_run=CALLS, model=model, batch=batch, impl=impl, cache=CACHE,
                 filled=FILLED)
    floor_ms = 2 * batch * kv_heads * FILLED * dim * 2 / H100_COPY_BYTES_PER_S * 1e3
    benchmark.extra_info.update(floor_ms=floor_ms, fraction_of_floor=floor_ms / ms)
