"""Decode attention (vpit_fast.ops.decode_attention) against a float64 ground truth on CPU and
(when present) CUDA: grouped heads, ragged masks, chunk boundaries, strided and misaligned caches,
NaN in invalid slots, empty rows, CUDA graphs, torch.compile and bad inputs."""

import math

import pytest
import torch

from vpit_fast import decode_attention
from vpit_fast.ops import reference

from conftest import DEVICES, HAS_CUDA, SLACK, poison, rel_error, requires_cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (batch, heads, kv_heads, head_dim, cache_len): MHA, LLaMA-3.2-1B's 4 query heads per KV head,
# Qwen2.5-7B's 7, 16 (two blocks of 8), chunk edges (127, 128, 129), vector-less head dims
# (20 in bf16, 6), the largest head dim, and batches large enough that a CUDA block walks
# several tiles of the cache (online softmax across tiles; left padding skips whole tiles).
SHAPES = [
    (1, 4, 4, 64, 1),
    (2, 8, 2, 64, 127),
    (3, 8, 2, 64, 128),
    (1, 32, 8, 64, 129),
    (2, 28, 4, 128, 700),
    (1, 32, 2, 32, 300),
    (4, 6, 1, 20, 257),
    (2, 3, 3, 6, 50),
    (1, 4, 2, 256, 390),
    (16, 8, 4, 64, 2176),
    (64, 4, 4, 64, 1000),
    (40, 16, 2, 128, 520),
]


def make_inputs(batch, heads, kv_heads, dim, length, dtype, device, valid="random"):
    q = torch.randn(batch, heads, dim, device=device).to(dtype)
    k = torch.randn(batch, kv_heads, length, dim, device=device).to(dtype)
    v = torch.randn(batch, kv_heads, length, dim, device=device).to(dtype)
    if valid == "random":
        mask = torch.rand(batch, length, device=device) < 0.7
        if length:
            mask[:, -1] = True
    else:  # generation: left padding, then the filled part, then empty slots
        mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        for b in range(batch):
            start = int(torch.randint(0, max(length // 4, 1), ()))
            end = int(torch.randint(start + 1, length + 1, ()))
            mask[b, start:end] = True
    return q, k, v, mask


def nan_invalid(k, v, mask):
    """Invalid slots hold NaN: they must never reach the output."""
    gone = ~mask[:, None, :, None]
    return k.masked_fill(gone, float("nan")), v.masked_fill(gone, float("nan"))


def check_against_float64(q, k, v, mask, scale, out):
    """Our error against float64 is within plain PyTorch's error in the same dtype plus SLACK."""
    exact = reference.decode_attention(q.double(), k.double(), v.double(), mask, scale)
    plain = reference.decode_attention(q, k.nan_to_num(0), v.nan_to_num(0), mask, scale)
    ours = rel_error(out, exact)
    assert ours <= rel_error(plain, exact) + SLACK[q.dtype], (ours, rel_error(plain, exact))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("valid", ["random", "generation"])
def test_matches_float64(device, dtype, shape, valid):
    q, k, v, mask = make_inputs(*shape, dtype, device, valid)
    k, v = nan_invalid(k, v, mask)
    scale = 1 / math.sqrt(shape[3])
    poison(device)
    out = decode_attention(q, k, v, mask)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    check_against_float64(q, k, v, mask, scale, out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_without_valid_slots_are_zero(device, dtype):
    q, k, v, mask = make_inputs(4, 8, 2, 64, 300, dtype, device)
    mask[1] = False
    mask[3] = False
    k, v = nan_invalid(k, v, mask)
    poison(device)
    out = decode_attention(q, k, v, mask)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[3], torch.zeros_like(out[3]))
    check_against_float64(q, k, v, mask, 1 / 8, out)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_shapes(device):
    for batch, heads, kv_heads, length in [(0, 8, 2, 16), (2, 0, 0, 16), (2, 8, 2, 0)]:
        q, k, v, mask = make_inputs(batch, heads, kv_heads, 64, length, torch.bfloat16, device)
        out = decode_attention(q, k, v, mask)
        assert out.shape == (batch, heads, 64)
        assert torch.equal(out, torch.zeros_like(out))  # no slot: zeros


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_and_misaligned_inputs(device, dtype):
    """A cache slice (longer slot stride), a query read through a transpose, a cache starting one
    element into its storage (no 16-byte alignment), a strided mask: all read in place, same answer."""
    q, k, v, mask = make_inputs(3, 8, 2, 64, 200, dtype, device)
    scale = 0.1
    expected = decode_attention(q, k, v, mask, scale)
    big_k = torch.randn(3, 2, 260, 64, device=device).to(dtype)
    big_k[:, :, 30:230] = k
    query_t = q.transpose(0, 1).contiguous().transpose(0, 1)  # [B, H, D] with batch stride D
    flat = torch.empty(v.numel() + 1, device=device, dtype=dtype)
    shifted_v = flat[1:].view_as(v)
    shifted_v.copy_(v)
    wide_mask = torch.zeros(3, 400, dtype=torch.bool, device=device)
    wide_mask[:, ::2] = mask
    out = decode_attention(query_t, big_k[:, :, 30:230], shifted_v, wide_mask[:, ::2], scale)
    # Without 16-byte alignment the CUDA kernel moves single elements and sums in another order,
    # so the two agree to the dtype's rounding (torch.testing's default tolerances for it).
    torch.testing.assert_close(out, expected)
    check_against_float64(q, k, v, mask, scale, out)


@pytest.mark.parametrize("device", DEVICES)
def test_scale(device):
    q, k, v, mask = make_inputs(2, 4, 2, 16, 40, torch.float32, device)
    out = decode_attention(q, k, v, mask, scale=0.37)
    check_against_float64(q, k, v, mask, 0.37, out)


def test_impl_torch_is_the_reference_with_gradients():
    q, k, v, mask = make_inputs(2, 4, 2, 16, 40, torch.float64, "cpu")
    q.requires_grad_()
    out = decode_attention(q, k, v, mask, impl="torch")
    torch.testing.assert_close(out, reference.decode_attention(q, k, v, mask, 0.25))
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with pytest.raises(RuntimeError, match="inference only"):
        decode_attention(q.float(), k.float(), v.float(), mask).sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    q, k, v, mask = make_inputs(2, 8, 2, 64, 150, torch.bfloat16, device)
    torch.library.opcheck(torch.ops.vpit_fast.decode_attention.default, (q, k, v, mask, 0.125),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    q, k, v, mask = make_inputs(2, 8, 2, 32, 150, torch.float32, device)
    compiled = torch.compile(lambda *a: decode_attention(*a) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, mask), decode_attention(q, k, v, mask) * 2)


@requires_cuda
def test_cuda_graph_replay_follows_the_cache_and_the_mask():
    q, k, v, mask = make_inputs(2, 32, 8, 64, 600, torch.bfloat16, "cuda", valid="generation")
    out = decode_attention(q, k, v, mask)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_attention(q, k, v, mask)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = decode_attention(q, k, v, mask)
    for _ in range(3):  # a decode step: new query, one more slot written and valid
        q.copy_(torch.randn_like(q))
        slot = int(mask[0].nonzero().max()) + 1 if mask[0].any() else 0
        if slot < mask.shape[1]:
            k[:, :, slot] = torch.randn_like(k[:, :, slot])
            mask[:, slot] = True
        graph.replay()
        torch.testing.assert_close(captured, decode_attention(q, k, v, mask), rtol=0, atol=0)
    assert not torch.equal(captured, out)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    q, k, v, mask = make_inputs(2, 8, 2, 64, 30, torch.float32, device)
    cases = [
        ((q[0], k, v, mask), ValueError, "query must be"),
        ((q, k[0], v, mask), ValueError, "key must be"),
        ((q, k, v[:, :, :5], mask), ValueError, "value must have key's shape"),
        ((q[:, :7], k, v, mask), ValueError, "multiple of key's 2 kv_heads"),
        ((q[:1], k, v, mask), ValueError, "key must be \\[1"),
        ((q, k, v, mask.float()), ValueError, "key_valid must be"),
        ((q, k, v, mask[:, :5]), ValueError, "key_valid must be"),
        ((q.long(), k, v, mask), TypeError, "query must be float32"),
        ((q.double(), k.double(), v.double(), mask), TypeError, "float64 with impl"),
        ((q, k.half(), v, mask), TypeError, "share a dtype"),
        ((q, k, v, "mask"), TypeError, "key_valid must be a torch.Tensor"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            decode_attention(*args)
    with pytest.raises(ValueError, match="scale must be a finite"):
        decode_attention(q, k, v, mask, float("nan"))
    with pytest.raises(ValueError, match="at most 256"):
        decode_attention(torch.randn(1, 2, 264, device=device), *make_inputs(1, 2, 2, 264, 4, torch.float32,
                                                                            device)[1:])
    if HAS_CUDA and device == "cpu":
        with pytest.raises(ValueError, match="share a device"):
            decode_attention(q, k.cuda(), v, mask)
    with pytest.raises(ValueError, match="impl"):
        decode_attention(q, k, v, mask, impl="triton")


@pytest.mark.parametrize("device", DEVICES)
def test_op_checks_at_the_torch_boundary(device):
    """Calling the registered op directly (as other libraries may) gets the C++ checks."""
    q, k, v, mask = make_inputs(2, 8, 2, 64, 30, torch.float32, device)
    with pytest.raises(RuntimeError, match="vpit_fast.decode_attention: .*multiple"):
        torch.ops.vpit_fast.decode_attention(q[:, :7], k, v, mask, 0.1)
    with pytest.raises(RuntimeError, match="vpit_fast.decode_attention: key_valid must be"):
        torch.ops.vpit_fast.decode_attention(q, k, v, mask[:, :3], 0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_generation_attention_function_uses_the_op(device, monkeypatch):
    """The decode step's transformers attention function: the fused op where it applies, the
    packed SDPA path otherwise, the same answer from both."""
    from vpit_fast import generation

    q, k, v, mask = make_inputs(3, 8, 2, 32, 90, torch.float32, device, valid="generation")
    calls = []
    monkeypatch.setattr(generation, "fused_decode_attention",
                        lambda *a: calls.append(1) or decode_attention(*a))
    fused, _ = generation.decode_attention(None, q[:, :, None], k, v, mask[:, None, None], scaling=0.2)
    assert calls and fused.shape == (3, 1, 8, 32)
    sdpa, _ = generation.decode_attention(None, q[:, :, None], k, v, mask[:, None, None].float().log(), scaling=0.2)
    assert len(calls) == 1  # a float mask takes the SDPA path
    torch.testing.assert_close(fused, sdpa, rtol=1e-5, atol=1e-5)
