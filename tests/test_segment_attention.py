"""The short-segment attention kernels (`vpit_fast.ops.segment_attention`, backend "segment"):
forward and backward against a float64 reference over a grid of segment lengths and head
layouts, under torch.compile, and their input checks and backend choice (those run on the CPU)."""

import zlib

import pytest
import torch

from vpit_fast.attention import available_backends, backend_name, varlen_attention
from vpit_fast.ops.segment_attention import MAX_SEQLEN, segment_attention

from conftest import poison, rel_error, requires_cuda

BF16_TOL = 1e-2


def reference(q, k, v, cu, scale):
    """float64 causal attention per segment, K/V heads repeated for GQA."""
    q, k, v = (x.double() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs = q[start:end].transpose(0, 1)
        ks = k[start:end].transpose(0, 1).repeat_interleave(group, 0)
        vs = v[start:end].transpose(0, 1).repeat_interleave(group, 0)
        scores = qs @ ks.transpose(1, 2) * scale
        mask = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).tril()
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out[start:end] = (probs @ vs).transpose(0, 1)
    return out


def boundaries(lengths, device):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


LENGTH_SETS = {
    "one-token": [1],
    "tile-edges": [15, 16, 17, 31, 32, 33],
    "chunk-edges": [63, 64, 65, 128, 129],
    "longest": [MAX_SEQLEN, 3, MAX_SEQLEN - 1],
    "with-empty": [0, 40, 0, 0, 7, 0],
    "ragged-random": None,  # 30 random lengths in [1, 200]
}
HEADS = [(4, 4, 64), (4, 2, 64), (8, 1, 64), (4, 2, 128)]  # (query heads, K/V heads, head_dim)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("heads,kv_heads,head_dim", HEADS, ids=lambda x: str(x))
@pytest.mark.parametrize("lengths", list(LENGTH_SETS), ids=str)
def test_forward_and_backward_match_float64_reference(lengths, heads, kv_heads, head_dim):
    torch.manual_seed(zlib.crc32(repr((lengths, heads, kv_heads, head_dim)).encode()))
    sizes = LENGTH_SETS[lengths] or torch.randint(1, 201, (30,)).tolist()
    cu = boundaries(sizes, "cuda")
    n, scale = int(cu[-1]), head_dim ** -0.5 * 1.3
    q = torch.randn(n, heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(n, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    grad_out = torch.randn(n, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    poison("cuda")
    out = segment_attention(q, k, v, cu, max(sizes), scale=scale)
    poison("cuda")
    got = torch.autograd.grad(out, (q, k, v), grad_out)

    x = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want_out = reference(*x, cu, scale)
    want = torch.autograd.grad(want_out, x, grad_out.double())
    assert rel_error(out, want_out) <= BF16_TOL
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        # floor: a one-token segment's dq is zero up to rounding (its softmax is constant)
        assert rel_error(g, w, floor=1e-3) <= BF16_TOL, name


@pytest.mark.cuda
@requires_cuda
def test_rows_outside_the_longest_tile_are_independent_of_max_seqlen():
    """A larger max_seqlen (more, partly empty chunks per segment) changes nothing."""
    torch.manual_seed(1)
    cu = boundaries([70, 9, 130], "cuda")
    q, k, v = (torch.randn(209, 4, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    a = segment_attention(q, k, v, cu, 130)
    b = segment_attention(q, k, v, cu, MAX_SEQLEN)
    assert torch.equal(a, b)


@pytest.mark.cuda
@requires_cuda
def test_is_available_for_short_bf16_segments_and_compiles_in_one_graph():
    torch.manual_seed(2)
    sizes = torch.randint(1, 150, (12,)).tolist()
    cu, n = boundaries(sizes, "cuda"), sum(sizes)
    assert "segment" in available_backends("cuda", head_dim=64, max_seqlen=max(sizes))
    assert "segment" not in available_backends("cuda", head_dim=64, max_seqlen=MAX_SEQLEN + 1)
    assert "segment" not in available_backends("cuda", torch.float16, head_dim=64, max_seqlen=100)
    assert "segment" not in available_backends("cuda", head_dim=96, max_seqlen=100)
    # FlashAttention is faster where it exists; segment comes before the per-segment loop
    assert backend_name("cuda", head_dim=64, max_seqlen=100) in ("flash_attn", "torch_varlen", "segment")
    q = torch.randn(n, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(n, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    grad_out = torch.randn_like(q)

    def attend(q, k, v):
        return varlen_attention(q, k, v, cu, max(sizes), backend="segment")

    results = []
    for fn in (attend, torch.compile(attend, fullgraph=True, dynamic=False)):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*x)
        results.append((out, *torch.autograd.grad(out, x, grad_out)))
    x = [t.double().requires_grad_() for t in (q, k, v)]
    want_out = reference(*x, cu, 64 ** -0.5)
    want = (want_out, *torch.autograd.grad(want_out, x, grad_out.double()))
    for name, eager, compiled, w in zip(["out", "dq", "dk", "dv"], results[0], results[1], want):
        assert torch.equal(eager, compiled), name
        assert rel_error(eager, w) <= BF16_TOL, name


# ---- checks and backend choice (CPU) ------------------------------------------------------------

def test_cpu_machines_never_choose_segment():
    assert backend_name("cpu", torch.bfloat16, head_dim=64, max_seqlen=100) == "sdpa_per_segment"
    assert "segment" not in available_backends("cpu", head_dim=64, max_seqlen=100)
    cu = boundaries([3, 4], "cpu")
    q = torch.randn(7, 2, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="backend 'segment' cannot run this call: segment needs a CUDA device"):
        varlen_attention(q, q, q, cu, 4, backend="segment")


@pytest.mark.parametrize("change, message", [
    (dict(dtype=torch.float32), "bfloat16"),
    (dict(head_dim=80), "head_dim"),
    (dict(max_seqlen=MAX_SEQLEN + 1), f"at most {MAX_SEQLEN} tokens"),
    (dict(max_seqlen=0), f"at most {MAX_SEQLEN} tokens"),
])
def test_unsupported_calls_name_what_is_wrong(change, message):
    from vpit_fast.ops.segment_attention import call_unsupported_reason, unsupported_reason

    args = dict(dtype=torch.bfloat16, head_dim=64, max_seqlen=100) | change
    assert call_unsupported_reason(torch.bfloat16, 64, 100) is None
    assert message in call_unsupported_reason(**args)
    reason = unsupported_reason("cuda", **args)
    assert message in reason or "CUDA" in reason  # (a machine without a GPU fails the first check)


def test_backend_choice_keeps_a_symbolic_longest_segment_in_one_graph():
    """Inside a compiled block the longest segment is symbolic; a batch whose longest segment is
    past `MAX_SEQLEN` gets another backend without splitting the graph (an f-string of the
    symbolic value in the reason did) and without one graph per value."""
    from torch._dynamo.utils import counters

    from vpit_fast.ops.segment_attention import call_unsupported_reason

    def pick(x, max_seqlen):
        usable = call_unsupported_reason(torch.bfloat16, 64, max_seqlen) is None
        return x * 2 if usable else x * 3

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(pick, fullgraph=True, dynamic=True)
    x = torch.ones(3)
    for max_seqlen, factor in ((300, 3), (301, 3), (4000, 3), (100, 2), (101, 2), (256, 2), (257, 3)):
        assert torch.equal(compiled(x, max_seqlen), x * factor), max_seqlen
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])  # one per side of the limit


def test_bad_shapes_raise_value_errors():
    cu = boundaries([3], "cpu")
    with pytest.raises(ValueError, match="query must be a 3-D tensor"):
        segment_attention(torch.zeros(3, 64), torch.zeros(3, 1, 64), torch.zeros(3, 1, 64), cu, 3)
    with pytest.raises(ValueError, match="CUDA"):
        q = torch.zeros(3, 2, 64, dtype=torch.bfloat16)
        segment_attention(q, q, q, cu, 3)


@pytest.mark.cuda
@requires_cuda
def test_mismatched_cuda_inputs_raise_value_errors():
    q = torch.zeros(5, 2, 64, device="cuda", dtype=torch.bfloat16)
    cu = boundaries([5], "cuda")
    with pytest.raises(ValueError, match="key must be torch.bfloat16"):
        segment_attention(q, q.float(), q, cu, 5)
    with pytest.raises(ValueError, match="cu_seqlens is on cpu"):
        segment_attention(q, q, q, cu.cpu(), 5)
    with pytest.raises(ValueError, match="at most 256 tokens"):
        segment_attention(q, q, q, cu, 300)
