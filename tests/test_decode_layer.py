"""Fused decode-layer ops (vpit_fast.ops.decode_layer) against a float64 ground truth on CPU and
(when present) CUDA: grouped heads, biases, odd sizes that take the ATen fallback, rows past the
kernels' limit, empty batches, large RoPE angles, cache slots other than the cursor left alone,
bad inputs; then `FusedDecodeLayers` against transformers' own decoder layers (LLaMA with biases,
Qwen2, Mistral), generation with and without it, CUDA graphs and torch.compile."""

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM, StaticCache)

from conftest import DEVICES, SLACK, poison, rel_error, requires_cuda
from vpit_fast.fused_decode import FusedDecodeLayers, unsupported_reason
from vpit_fast.ops import reference
from vpit_fast.ops.decode_layer import MAX_ROWS, decode_gate_up, decode_proj_add_, decode_qkv_rope

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def weight(out_features, in_features, dtype, device):
    return (torch.randn(out_features, in_features, device=device) / in_features ** 0.5).to(dtype)


def maybe_bias(out_features, dtype, device, with_bias):
    return torch.randn(out_features, device=device).to(dtype) * 0.1 if with_bias else None


def assert_close_to_float64(ours, exact, plain, dtype):
    """Our error against float64 is within plain PyTorch's in the same dtype plus SLACK."""
    err, plain_err = rel_error(ours, exact), rel_error(plain, exact)
    assert err <= plain_err + SLACK[dtype], (err, plain_err)


def doubles(*tensors):
    return [None if t is None else t.double() for t in tensors]


# ---------------------------------------------------------------------------------------------
# decode_qkv_rope

# (rows, hidden, heads, kv_heads, head_dim, cache_len): LLaMA-like grouped heads, MHA at the
# kernels' row limit, an odd half head_dim (10), rows past the limit and a hidden size whose bf16
# rows are not 16-byte multiples (both the ATen fallback on CUDA), and no rows.
QKV_SHAPES = [(1, 64, 4, 2, 16, 8), (3, 256, 8, 2, 32, 40), (MAX_ROWS, 512, 8, 8, 64, 20), (5, 1000, 4, 1, 20, 7),
              (MAX_ROWS + 3, 128, 4, 2, 16, 9), (2, 100, 2, 1, 8, 5), (0, 64, 4, 2, 16, 8)]


def qkv_inputs(rows, hidden, heads, kv_heads, dim, length, dtype, device, with_bias):
    x = torch.randn(rows, hidden, device=device).to(dtype)
    args = dict(
        hidden=x, norm_weight=(1 + 0.1 * torch.randn(hidden, device=device)).to(dtype), eps=1e-5,
        wq=weight(heads * dim, hidden, dtype, device), wk=weight(kv_heads * dim, hidden, dtype, device),
        wv=weight(kv_heads * dim, hidden, dtype, device), bq=maybe_bias(heads * dim, dtype, device, with_bias),
        bk=maybe_bias(kv_heads * dim, dtype, device, with_bias), bv=maybe_bias(kv_heads * dim, dtype, device, with_bias),
        inv_freq=1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).float() / dim)),
        rope_scale=1.0 if with_bias else 0.8,
        positions=torch.randint(0, 5000, (rows,), device=device),  # large angles too
        cursor=torch.tensor([int(torch.randint(0, length, ()))], device=device))
    caches = [torch.randn(rows, kv_heads, length, dim, device=device).to(dtype) for _ in range(2)]
    return args, caches


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", QKV_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_bias", [False, True])
def test_qkv_rope_matches_float64(device, dtype, shape, with_bias):
    args, (key_cache, value_cache) = qkv_inputs(*shape, dtype, device, with_bias)
    before_k, before_v = key_cache.clone(), value_cache.clone()
    poison(device)
    q = decode_qkv_rope(**args, key_cache=key_cache, value_cache=value_cache)
    rows, _, heads, kv_heads, dim, length = shape
    assert q.shape == (rows, heads, dim) and q.dtype == dtype

    exact_k, exact_v = before_k.double(), before_v.double()
    tensors = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "inv_freq" else v
               for k, v in args.items()}
    exact_q = reference.decode_qkv_rope(**tensors, key_cache=exact_k, value_cache=exact_v)
    plain_k, plain_v = before_k.clone(), before_v.clone()
    plain_q = reference.decode_qkv_rope(**args, key_cache=plain_k, value_cache=plain_v)
    assert_close_to_float64(q, exact_q, plain_q, dtype)
    slot = int(args["cursor"])
    for ours, exact, plain, before in ((key_cache, exact_k, plain_k, before_k), (value_cache, exact_v, plain_v, before_v)):
        assert_close_to_float64(ours[:, :, slot], exact[:, :, slot], plain[:, :, slot], dtype)
        others = torch.arange(length, device=device) != slot
        assert torch.equal(ours[:, :, others], before[:, :, others])  # no other slot written


@pytest.mark.parametrize("device", DEVICES)
def test_qkv_rope_writes_a_strided_cache_in_place(device):
    """A cache that is a view of a larger buffer (as a ``StaticCache`` layer may be) is written in
    place, through its strides."""
    args, _ = qkv_inputs(2, 64, 4, 2, 16, 8, torch.float32, device, True)
    big = torch.zeros(2, 3, 8, 16, device=device)
    key_cache, value_cache = big[:, :2], big[:, 1:].clone()[:, :2]
    q = decode_qkv_rope(**args, key_cache=key_cache, value_cache=value_cache)
    ref_k, ref_v = torch.zeros(2, 2, 8, 16, device=device), torch.zeros(2, 2, 8, 16, device=device)
    ref_q = reference.decode_qkv_rope(**args, key_cache=ref_k, value_cache=ref_v)
    torch.testing.assert_close(q, ref_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(big[:, :2], ref_k, atol=1e-5, rtol=1e-5)
    assert torch.equal(big[:, 2], torch.zeros_like(big[:, 2]))


# ---------------------------------------------------------------------------------------------
# decode_gate_up and decode_proj_add_

GATE_UP_SHAPES = [(1, 64, 96), (4, 1000, 300), (MAX_ROWS, 256, 1024), (MAX_ROWS + 4, 64, 40), (3, 100, 50), (0, 64, 32)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GATE_UP_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_bias", [False, True])
def test_gate_up_matches_float64(device, dtype, shape, with_bias):
    rows, hidden, inter = shape
    x = torch.randn(rows, hidden, device=device).to(dtype)
    norm = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype)
    wg, wu = weight(inter, hidden, dtype, device), weight(inter, hidden, dtype, device)
    bg, bu = maybe_bias(inter, dtype, device, with_bias), maybe_bias(inter, dtype, device, with_bias)
    poison(device)
    out = decode_gate_up(x, norm, 1e-6, wg, wu, bg, bu)
    assert out.shape == (rows, inter) and out.dtype == dtype
    exact = reference.decode_gate_up(*doubles(x, norm), 1e-6, *doubles(wg, wu, bg, bu))
    assert_close_to_float64(out, exact, reference.decode_gate_up(x, norm, 1e-6, wg, wu, bg, bu), dtype)


PROJ_SHAPES = [(1, 64, 64), (4, 1000, 300), (MAX_ROWS, 2048, 128), (MAX_ROWS + 1, 64, 32), (2, 100, 60), (0, 64, 16)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PROJ_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_proj_add_matches_float64(device, dtype, shape, with_bias, strided):
    rows, k, n = shape
    if strided:  # rows of x and residual inside wider buffers (row strides of k + 8, n + 8)
        x = torch.randn(rows, k + 8, device=device).to(dtype)[:, :k]
        residual = torch.randn(rows, n + 8, device=device).to(dtype)[:, 4:n + 4]
    else:
        x, residual = torch.randn(rows, k, device=device).to(dtype), torch.randn(rows, n, device=device).to(dtype)
    w, b = weight(n, k, dtype, device), maybe_bias(n, dtype, device, with_bias)
    before = residual.clone()
    exact = reference.decode_proj_add(*doubles(before, x, w, b))
    plain = reference.decode_proj_add(before, x, w, b)
    out = decode_proj_add_(residual, x, w, b)
    assert out is residual
    assert_close_to_float64(residual, exact, plain, dtype)


# ---------------------------------------------------------------------------------------------
# bad inputs

def good_qkv(device="cpu"):
    args, (k, v) = qkv_inputs(2, 64, 4, 2, 16, 8, torch.float32, device, True)
    return dict(args, key_cache=k, value_cache=v)


@pytest.mark.parametrize("change, message", [
    (lambda a: a.update(wk=a["wk"][:-16]), "wk and wv must be"),
    (lambda a: a.update(wq=a["wq"][:-1]), "wq must have heads"),
    (lambda a: a.update(positions=a["positions"].int()), "positions must be an int64"),
    (lambda a: a.update(positions=a["positions"][:1]), "positions must be an int64 [2]"),
    (lambda a: a.update(cursor=torch.tensor([8])), "cursor must be a slot in [0, 8)"),
    (lambda a: a.update(cursor=torch.tensor([1, 2])), "cursor must be a one-element"),
    (lambda a: a.update(inv_freq=a["inv_freq"].double()), "inv_freq must be a float32 [8]"),
    (lambda a: a.update(norm_weight=a["norm_weight"][:-1]), "norm_weight must be [64]"),
    (lambda a: a.update(bq=a["bq"][:-1]), "bq must be [64]"),
    (lambda a: a.update(wv=a["wv"].double()), "wv must have hidden's dtype"),
    (lambda a: a.update(hidden=a["hidden"].t().contiguous().t()), "hidden must have a contiguous last dimension"),
    (lambda a: a.update(key_cache=a["key_cache"][..., :15], value_cache=a["value_cache"][..., :15]), "even"),
    (lambda a: a.update(value_cache=a["value_cache"][:, :1]), "value_cache must have key_cache's shape"),
    (lambda a: a.update(key_cache=a["key_cache"].transpose(2, 3).contiguous().transpose(2, 3),
                        value_cache=a["value_cache"].transpose(2, 3).contiguous().transpose(2, 3)),
     "contiguous last dimension"),
    (lambda a: a.update(eps=float("nan")), "eps must be a finite number"),
])
def test_qkv_rope_rejects_bad_inputs(change, message):
    args = good_qkv()
    change(args)
    with pytest.raises(RuntimeError, match="vpit_fast.decode_qkv_rope: .*" + message.replace("[", r"\[").replace(
            "(", r"\(").replace(")", r"\)")):
        decode_qkv_rope(**args)


def test_gate_up_and_proj_add_reject_bad_inputs():
    x, norm = torch.randn(2, 64), torch.ones(64)
    with pytest.raises(RuntimeError, match="w_up must have w_gate's 32 rows"):
        decode_gate_up(x, norm, 1e-6, torch.randn(32, 64), torch.randn(31, 64))
    with pytest.raises(RuntimeError, match=r"w_gate must be \[out_features, 64\]"):
        decode_gate_up(x, norm, 1e-6, torch.randn(32, 63), torch.randn(32, 64))
    with pytest.raises(RuntimeError, match=r"hidden must be \[rows, features\]"):
        decode_gate_up(x[None], norm, 1e-6, torch.randn(32, 64), torch.randn(32, 64))
    with pytest.raises(RuntimeError, match="hidden must be float32, bfloat16 or float16"):
        decode_gate_up(x.double(), norm.double(), 1e-6, torch.randn(32, 64).double(), torch.randn(32, 64).double())
    residual = torch.randn(2, 16)
    with pytest.raises(RuntimeError, match=r"weight must be \[16, 64\]"):
        decode_proj_add_(residual, x, torch.randn(16, 63))
    with pytest.raises(RuntimeError, match="x must have residual's 2 rows"):
        decode_proj_add_(residual, x[:1], torch.randn(16, 64))
    with pytest.raises(RuntimeError, match="x must not overlap residual"):
        buffer = torch.randn(2, 80)
        decode_proj_add_(buffer[:, :16], buffer[:, :64], torch.randn(16, 64))
    with pytest.raises(RuntimeError, match=r"bias must be \[16\]"):
        decode_proj_add_(residual, x, torch.randn(16, 64), torch.randn(15))
    with pytest.raises(ValueError, match="impl must be"):
        decode_proj_add_(residual, x, torch.randn(16, 64), impl="cuda")


@requires_cuda
def test_device_mismatch_is_named():
    args = good_qkv()
    args["wq"] = args["wq"].cuda()
    with pytest.raises(RuntimeError, match="wq is on cuda:0 but hidden is on cpu"):
        decode_qkv_rope(**args)


def test_ops_pass_opcheck():
    args = good_qkv()
    torch.library.opcheck(torch.ops.vpit_fast.decode_qkv_rope, tuple(args.values()))
    x, norm, wg, wu = torch.randn(3, 64), torch.ones(64), torch.randn(32, 64), torch.randn(32, 64)
    torch.library.opcheck(torch.ops.vpit_fast.decode_gate_up, (x, norm, 1e-6, wg, wu, None, torch.randn(32)))
    torch.library.opcheck(torch.ops.vpit_fast.decode_proj_add_, (torch.randn(3, 32), x, wg, None))


# ---------------------------------------------------------------------------------------------
# FusedDecodeLayers against transformers' layers

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096)
FAMILIES = {
    "llama-biases": (LlamaForCausalLM, LlamaConfig, dict(attention_bias=True, mlp_bias=True)),
    "llama3-rope": (LlamaForCausalLM, LlamaConfig, dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=256))),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {}),
    "mistral": (MistralForCausalLM, MistralConfig, dict(sliding_window=None)),
}


def tiny_llm(family, dtype=torch.float32, device="cpu"):
    model_class, config_class, extra = FAMILIES[family]
    llm = model_class(config_class(**TINY, **extra)).to(device=device, dtype=dtype).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in llm.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return llm


def prefilled(llm, rows, prompt_len, cache_len, device):
    """Two StaticCaches after the same prompt of random embeddings (transformers' layers write the
    slot their own cache's fill count says, so each side gets its own), and the next step's inputs."""
    cfg, p = llm.config, next(llm.parameters())
    caches = [StaticCache(config=cfg, max_cache_len=cache_len) for _ in range(2)]
    for cache in caches:
        cache.early_initialization(rows, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                                   p.dtype, device)
    embeds = torch.randn(rows, prompt_len, cfg.hidden_size, device=device).to(p.dtype)
    positions = torch.arange(prompt_len, device=device).expand(rows, -1) + 100  # offset: RoPE at larger angles
    valid = torch.zeros(rows, cache_len, dtype=torch.bool, device=device)
    valid[:, :prompt_len] = True
    query = torch.arange(prompt_len, device=device)[:, None]
    key = torch.arange(cache_len, device=device)[None, :]
    mask = ((key <= query) & valid[:, None, :])[:, None]
    with torch.no_grad():
        for cache in caches:
            llm.base_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, past_key_values=cache,
                           use_cache=True)
    valid[:, prompt_len] = True
    step = dict(embeds=torch.randn(rows, cfg.hidden_size, device=device).to(p.dtype),
                positions=positions[:, -1] + 1, cursor=torch.tensor([prompt_len], device=device), key_valid=valid)
    return caches, step


def transformers_step(llm, cache, step):
    with torch.no_grad():
        out = llm.base_model(inputs_embeds=step["embeds"][:, None], attention_mask=step["key_valid"][:, None, None],
                             position_ids=step["positions"][:, None], past_key_values=cache, use_cache=True)
    return out.last_hidden_state[:, 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, MAX_ROWS + 2])
def test_fused_layers_equal_transformers_layers(device, family, dtype, rows):
    llm = tiny_llm(family, dtype, device)
    assert unsupported_reason(llm) is None
    (cache, theirs_cache), step = prefilled(llm, rows, 11, 32, device)
    ours = FusedDecodeLayers(llm, cache)(**step)
    theirs = transformers_step(llm, theirs_cache, step)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=4e-2, rtol=4e-2)
    torch.testing.assert_close(ours, theirs, **tol)
    for a, b in zip(cache.layers, theirs_cache.layers):
        torch.testing.assert_close(a.keys, b.keys, **tol)
        torch.testing.assert_close(a.values, b.values, **tol)


def test_unsupported_models_are_named():
    qwen3 = Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=16))
    assert "model type 'qwen3'" in unsupported_reason(qwen3)
    qwen3.config.model_type = "qwen2"  # a Qwen2-like model whose layers normalise queries and keys
    assert "q_norm" in unsupported_reason(qwen3)
    gelu = LlamaForCausalLM(LlamaConfig(**TINY, hidden_act="gelu"))
    assert "hidden_act" in unsupported_reason(gelu)
    with pytest.raises(ValueError, match="does not cover this model: .*hidden_act"):
        FusedDecodeLayers(gelu, None)


# ---------------------------------------------------------------------------------------------
# generation through the fused layers

def test_generation_with_and_without_fused_layers_agree():
    from test_generation import assert_same, mixed_batch, tiny_model
    from vpit_fast.generation import generate

    for kind in ("llama", "qwen2"):
        model = tiny_model(kind)
        batch = mixed_batch(model)
        fused = generate(model, **batch, max_new_tokens=72, fused_layers=True)
        plain = generate(model, **batch, max_new_tokens=72, fused_layers=False)
        assert_same(fused, plain)


def test_fused_layers_true_names_what_the_model_lacks():
    from test_generation import tiny_model
    from vpit_fast.generation import generate

    model = tiny_model("llama")
    for layer in model.llm.base_model.layers:
        layer.mlp.gate_proj = torch.nn.Identity()
    with pytest.raises(ValueError, match="fused_layers=True, but .*gate_proj"):
        generate(model, "hello", max_new_tokens=4, fused_layers=True)
    with pytest.raises(ValueError, match="fused_layers must be"):
        generate(model, "hello", max_new_tokens=4, fused_layers="yes")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_layers_in_a_cuda_graph_and_compiled(dtype):
    """Captured in a CUDA graph and replayed at the next slot, and traced by torch.compile
    (fullgraph), the step equals the eager one."""
    llm = tiny_llm("llama-biases", dtype, "cuda")
    (cache, eager_cache), step = prefilled(llm, 2, 11, 32, "cuda")
    layers, eager_layers = FusedDecodeLayers(llm, cache), FusedDecodeLayers(llm, eager_cache)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as captures require
        layers(**step)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layers(**step)
    for _ in range(2):  # the graph at this slot, then at the next one
        graph.replay()
        expected = eager_layers(**step)
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
        for a, b in zip(cache.layers, eager_cache.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        step["cursor"] += 1
        step["positions"] += 1
        step["key_valid"][:, int(step["cursor"])] = True
    compiled = torch.compile(eager_layers.__call__, fullgraph=True, dynamic=False)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(compiled(**step), FusedDecodeLayers(llm, cache)(**step), **tol)
