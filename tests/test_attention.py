"""vpit_fast.attention: varlen attention for packed batches, registered as "vpit_varlen".

Packed rows must give what each sample gives alone under transformers' "sdpa" (logits and
parameter gradients); unpacked and padded input must give what "sdpa" gives; the op itself is
checked against a dense float64 reference; each CUDA backend against the CPU fallback."""

import importlib

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from vpit_fast.attention import (ATTN_IMPLEMENTATION, available_backends, backend_name,
                                 packed_attention_kwargs, register_varlen_attention,
                                 varlen_attention, varlen_attention_forward)
from vpit_fast.data.packing import PackedBatch, collate_packed

from conftest import rel_error, requires_cuda

VOCAB = 97
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=VOCAB, max_position_embeddings=128)
FAMILIES = {  # name: (config class, model class, overrides)
    "llama_mha": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=4)),
    "llama_gqa": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=2)),
    "qwen2_gqa": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2)),
    # window 6 < most sample lengths below, so the sliding window really cuts
    "mistral_mqa_window": (MistralConfig, MistralForCausalLM, dict(num_key_value_heads=1, sliding_window=6)),
}
TOL = 1e-5  # fp32, relative


def save_tiny(family, path):
    config_cls, model_cls, overrides = FAMILIES[family]
    model_cls(config_cls(**TINY, **overrides)).save_pretrained(path)
    return model_cls


def load_pair(family, path, dtype=torch.float32, device="cpu"):
    """The same weights loaded twice: ("sdpa" reference, "vpit_varlen")."""
    register_varlen_attention()
    model_cls = save_tiny(family, path)
    ref = model_cls.from_pretrained(path, attn_implementation="sdpa", dtype=dtype).to(device).eval()
    var = model_cls.from_pretrained(path, attn_implementation=ATTN_IMPLEMENTATION, dtype=dtype).to(device).eval()
    assert var.config._attn_implementation == ATTN_IMPLEMENTATION
    return ref, var


def packed_rows(rows, budget):
    """collate_packed batch for rows of sample lengths; returns (batch, [(row, start, end)])."""
    packed, spans = [], []
    for r, lengths in enumerate(rows):
        assert sum(lengths) <= budget
        ids = torch.randint(1, VOCAB, (budget,))
        pos = torch.zeros(budget, dtype=torch.int64)
        cu = [0]
        for n in lengths:
            pos[cu[-1]:cu[-1] + n] = torch.arange(n)
            spans.append((r, cu[-1], cu[-1] + n))
            cu.append(cu[-1] + n)
        ids[cu[-1]:] = 0  # padding tail
        packed.append(PackedBatch(
            input_ids=ids, labels=ids.clone(), position_ids=pos,
            cu_seqlens=torch.tensor(cu, dtype=torch.int32), max_seqlen=max(lengths),
            image_slots=torch.zeros(0, dtype=torch.int64), image_is_target=torch.zeros(0, dtype=torch.bool)))
    return collate_packed(packed), spans


def random_rows(n_rows):
    """Row 0: three samples of different lengths + a padding tail; row 1 (if any): two samples
    that fill the budget exactly (no tail)."""
    lengths = torch.randperm(12)[:3] + 3  # three distinct lengths in 3..14
    budget = int(lengths.sum()) + 4
    rows = [lengths.tolist()]
    if n_rows == 2:
        first = int(torch.randint(3, budget - 3, ()))
        rows.append([first, budget - first])
    return rows, budget


def per_sample_reference(ref, batch, spans, weights):
    """Each sample alone through the sdpa model: its logits, and grads of sum(logits * weights)."""
    ref.zero_grad()
    logits = []
    for r, s, e in spans:
        out = ref(input_ids=batch["input_ids"][r:r + 1, s:e], use_cache=False).logits[0]
        (out * weights[r, s:e]).sum().backward()
        logits.append(out.detach())
    return logits


def assert_grads_match(var, ref):
    ref_params = dict(ref.named_parameters())
    for name, p in var.named_parameters():
        err = rel_error(p.grad, ref_params[name].grad)
        assert err <= TOL, f"grad of {name}: rel error {err}"


@pytest.mark.parametrize("n_rows", [1, 2])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_matches_each_sample_alone(family, n_rows, tmp_path):
    ref, var = load_pair(family, tmp_path)
    rows, budget = random_rows(n_rows)
    batch, spans = packed_rows(rows, budget)
    assert batch["cu_seqlens"][-1] == n_rows * budget

    out = var(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
              **packed_attention_kwargs(batch["cu_seqlens"], batch["max_seqlen"])).logits
    weights = torch.randn_like(out)
    for r, s, e in spans:
        (out[r, s:e] * weights[r, s:e]).sum().backward(retain_graph=True)  # padding tail left out
    expected = per_sample_reference(ref, batch, spans, weights)

    for (r, s, e), want in zip(spans, expected):
        err = rel_error(out[r, s:e].detach(), want)
        assert err <= TOL, f"sample at row {r} [{s}:{e}]: rel error {err}"
    assert torch.isfinite(out).all()  # the padding tail too
    assert_grads_match(var, ref)


@pytest.mark.parametrize("family", ["llama_gqa", "mistral_mqa_window"])
def test_packed_position_ids_alone_still_separate_samples(family, tmp_path):
    """Without cu_seqlens, restarting position_ids still keep samples apart (as sdpa's masking does)."""
    ref, var = load_pair(family, tmp_path)
    batch, spans = packed_rows(*random_rows(2))
    with torch.no_grad():
        out = var(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for r, s, e in spans:
            want = ref(input_ids=batch["input_ids"][r:r + 1, s:e], use_cache=False).logits[0]
            assert rel_error(out[r, s:e], want) <= TOL


@pytest.mark.parametrize("family", list(FAMILIES))
def test_unpacked_and_padded_match_sdpa(family, tmp_path):
    ref, var = load_pair(family, tmp_path)
    ids = torch.randint(1, VOCAB, (2, 15))
    right = torch.ones_like(ids)
    right[1, 9:] = 0
    left = torch.ones_like(ids)
    left[0, :4] = 0
    with torch.no_grad():
        for mask in (None, right, left):
            got = var(input_ids=ids, attention_mask=mask).logits
            want = ref(input_ids=ids, attention_mask=mask).logits
            keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
            assert rel_error(got[keep], want[keep]) <= TOL
        # generation: KV cache, left padding, decode steps past the sliding window
        gen = dict(input_ids=ids, attention_mask=left, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert torch.equal(var.generate(**gen), ref.generate(**gen))


def test_registration_and_set_attn_implementation(tmp_path):
    assert register_varlen_attention() == ATTN_IMPLEMENTATION
    assert register_varlen_attention() == ATTN_IMPLEMENTATION  # idempotent
    assert ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION] is varlen_attention_forward
    assert ATTN_IMPLEMENTATION in ALL_MASK_ATTENTION_FUNCTIONS.valid_keys()

    ref, var = load_pair("llama_gqa", tmp_path)
    switched = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    switched.set_attn_implementation(ATTN_IMPLEMENTATION)
    assert switched.config._attn_implementation == ATTN_IMPLEMENTATION
    batch, spans = packed_rows(*random_rows(1))
    kwargs = packed_attention_kwargs(batch["cu_seqlens"], batch["max_seqlen"])
    with torch.no_grad():
        got = switched(input_ids=batch["input_ids"], position_ids=batch["position_ids"], **kwargs).logits
        r, s, e = spans[1]  # the second sample: it would see the first one if packing were ignored
        want = ref(input_ids=batch["input_ids"][r:r + 1, s:e]).logits[0]
    assert rel_error(got[r, s:e], want) <= TOL


def dense_reference(q, k, v, cu, scale, sliding_window):
    """float64 attention with an explicit block-diagonal causal (windowed) mask over [N] tokens."""
    q, k, v = q.double(), k.double(), v.double()
    n, heads = q.shape[0], q.shape[1]
    groups = heads // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1), (cu[1:] - cu[:-1]).long())
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (seg[:, None] == seg[None, :]) & (j <= i)
    if sliding_window is not None:
        allowed &= j > i - sliding_window
    scores = torch.einsum("ihd,jhd->hij", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hij,jhd->ihd", scores.softmax(-1), v)


def random_segments(device="cpu"):
    """cu_seqlens with a 1-token segment, ragged others, and a final 'padding tail' segment."""
    lengths = [1] + (torch.randint(2, 19, (3,))).tolist() + [5]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return cu, max(lengths)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("sliding_window", [None, 4])
def test_varlen_attention_matches_dense_reference(kv_heads, sliding_window):
    cu, max_len = random_segments()
    n, scale = int(cu[-1]), 0.3
    q = torch.randn(n, 4, 16, requires_grad=True)
    k = torch.randn(n, kv_heads, 16, requires_grad=True)
    v = torch.randn(n, kv_heads, 16, requires_grad=True)
    out = varlen_attention(q, k, v, cu, max_len, scale=scale, sliding_window=sliding_window)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want_out = dense_reference(q, k, v, cu, scale, sliding_window)
    want = torch.autograd.grad(want_out, (q, k, v), grad_out.double())
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_error(out, want_out) <= TOL
    for name, g, w in zip("qkv", got, want):
        assert rel_error(g, w) <= TOL, f"d{name}"


def test_autocast_casts_mixed_dtypes_like_sdpa():
    """Under autocast (HF Trainer with bf16), RoPE may hand over fp32 query and key with a bf16
    value: all run in the autocast dtype, as SDPA does; without autocast that is an error."""
    cu, max_len = random_segments()
    n = int(cu[-1])
    q, k = torch.randn(n, 4, 16), torch.randn(n, 2, 16)
    v = torch.randn(n, 2, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = varlen_attention(q, k, v, cu, max_len)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, varlen_attention(q.bfloat16(), k.bfloat16(), v, cu, max_len))
    with pytest.raises(ValueError, match="share a dtype"):
        varlen_attention(q, k, v, cu, max_len)


def test_dropout_is_applied_in_training():
    cu, max_len = random_segments()
    q, k, v = (torch.randn(int(cu[-1]), 4, 16) for _ in range(3))
    plain = varlen_attention(q, k, v, cu, max_len)
    torch.manual_seed(1)
    dropped = varlen_attention(q, k, v, cu, max_len, dropout=0.5)
    torch.manual_seed(1)
    again = varlen_attention(q, k, v, cu, max_len, dropout=0.5)
    assert not torch.allclose(dropped, plain)
    assert torch.equal(dropped, again)


def test_backend_names_on_cpu():
    assert backend_name("cpu") == "sdpa_per_segment"
    assert backend_name("cuda", torch.float32) == "sdpa_per_segment"  # flash kernels: half only
    assert available_backends("cpu") == ["sdpa_per_segment"]


def test_bad_input_raises():
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    q = torch.randn(7, 4, 8)
    with pytest.raises(ValueError, match="cu_seqlens must be a 1-D"):
        packed_attention_kwargs(cu[None], 4)
    with pytest.raises(ValueError, match="int32"):
        packed_attention_kwargs(cu.float(), 4)
    with pytest.raises(ValueError, match="start at 0"):
        packed_attention_kwargs(torch.tensor([1, 3, 7]), 4)
    with pytest.raises(ValueError, match="start at 0"):
        packed_attention_kwargs(torch.tensor([0, 5, 3]), 5)
    with pytest.raises(ValueError, match="max_seqlen"):
        packed_attention_kwargs(cu, 3)
    with pytest.raises(ValueError, match="multiple"):
        varlen_attention(q, torch.randn(7, 3, 8), torch.randn(7, 3, 8), cu, 4)
    with pytest.raises(ValueError, match="3-D"):
        varlen_attention(q[0], q[0], q[0], cu, 4)
    with pytest.raises(ValueError, match="number of tokens"):
        varlen_attention(q, q, q, torch.tensor([0, 3, 6], dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="CUDA"):
        varlen_attention(q, q, q, cu, 4, backend="torch_varlen")
    with pytest.raises(ValueError, match="backend must be"):
        varlen_attention(q, q, q, cu, 4, backend="magic")

    module = torch.nn.Module()
    q4 = torch.randn(1, 4, 7, 8)
    kwargs = packed_attention_kwargs(cu, 4)
    with pytest.raises(ValueError, match="not both"):
        varlen_attention_forward(module, q4, q4, q4, torch.ones(1, 1, 7, 7, dtype=torch.bool), **kwargs)
    with pytest.raises(ValueError, match="softcapping"):
        varlen_attention_forward(module, q4, q4, q4, None, softcap=30.0, **kwargs)


# --------------------------------------------------------------------------- CUDA

@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("kv_heads,sliding_window,dropout", [(4, None, 0.0), (2, None, 0.0), (1, 5, 0.0), (2, None, 0.2)])
def test_cuda_backends_match_cpu_fallback(kv_heads, sliding_window, dropout):
    cu, max_len = random_segments("cuda")
    n, scale = int(cu[-1]), 0.2
    q = torch.randn(n, 4, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(n, kv_heads, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    grad_out = torch.randn_like(q)
    cpu = [x.float().cpu().requires_grad_() for x in (q, k, v)]
    want_out = varlen_attention(*cpu, cu.cpu(), max_len, scale=scale, sliding_window=sliding_window)
    want = torch.autograd.grad(want_out, cpu, grad_out.float().cpu())
    if dropout:  # no exact reference with dropout: it must run, differ from no dropout, and be finite
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out = varlen_attention(*x, cu, max_len, scale=scale, dropout=dropout)
        out.backward(grad_out)
        assert rel_error(out.float().cpu(), want_out) > 1e-2 and torch.isfinite(x[0].grad).all()
        return
    # with the call's head_dim and max_seqlen, so our short-segment kernels are under test too
    backends = available_backends("cuda", head_dim=64, max_seqlen=max_len if sliding_window is None else None)
    assert sliding_window is not None or "segment" in backends
    try:
        has_torch_varlen = hasattr(importlib.import_module("torch.nn.attention.varlen"), "varlen_attn")
    except ImportError:
        has_torch_varlen = False
    if has_torch_varlen:
        assert "torch_varlen" in backends  # a GPU kernel is really under test
    for backend in backends:
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out = varlen_attention(*x, cu, max_len, scale=scale, sliding_window=sliding_window, backend=backend)
        got = torch.autograd.grad(out, x, grad_out)
        assert rel_error(out.float().cpu(), want_out) <= 1e-2, backend
        for name, g, w in zip("qkv", got, want):
            assert rel_error(g.float().cpu(), w) <= 1e-2, f"{backend} d{name}"


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("kv_heads,sliding_window", [(2, None), (1, 5)])
def test_cuda_grouped_attention_compiles_in_one_graph(kv_heads, sliding_window):
    """Grouped K/V on the GPU (ATen's FlashAttention ops when torch's varlen_attn has no
    enable_gqa) traces into one graph and matches eager, forward and backward."""
    cu, max_len = random_segments("cuda")
    n = int(cu[-1])
    q = torch.randn(n, 4, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(n, kv_heads, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    grad_out = torch.randn_like(q)

    def attend(q, k, v):
        return varlen_attention(q, k, v, cu, max_len, sliding_window=sliding_window)

    results = []
    for fn in (attend, torch.compile(attend, fullgraph=True, dynamic=False)):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*x)
        results.append((out, *torch.autograd.grad(out, x, grad_out)))
    for name, got, want in zip(["out", "dq", "dk", "dv"], results[1], results[0]):
        assert torch.isfinite(got).all() and rel_error(got.float(), want.float()) <= 1e-2, name


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("family", ["llama_gqa", "mistral_mqa_window"])
def test_cuda_packed_model_matches_each_sample_alone(family, tmp_path):
    ref, var = load_pair(family, tmp_path, dtype=torch.bfloat16, device="cuda")
    batch, spans = packed_rows(*random_rows(2))
    kwargs = packed_attention_kwargs(batch["cu_seqlens"], batch["max_seqlen"], device="cuda")
    with torch.no_grad():
        out = var(input_ids=batch["input_ids"].cuda(), position_ids=batch["position_ids"].cuda(),
                  use_cache=False, **kwargs).logits
        for r, s, e in spans:
            want = ref(input_ids=batch["input_ids"][r:r + 1, s:e].cuda(), use_cache=False).logits[0]
            assert rel_error(out[r, s:e].float(), want.float()) <= 1e-2


def test_backend_lookup_adds_no_graph_break_under_torch_compile():
    """The backend lookup runs once, eagerly: what the CUDA paths of `varlen_attention` call inside
    a compiled decoder block must not split its graph (an import there did, at every attention
    call)."""
    import torch._dynamo

    from vpit_fast import attention

    attention.register_varlen_attention()

    def block(x):
        x = x.sin()
        flash = attention._flash_attn_varlen_func()
        x = x.cos()
        varlen, params = attention._torch_varlen_attn()
        x = x.tan()
        return x * 2 if flash is None and varlen is not None and "scale" in params else x + 1

    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(torch.randn(4))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
