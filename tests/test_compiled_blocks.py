"""Compiled decoder blocks over packed batches whose lengths change every step, as in training:
a bounded number of graphs, and the same loss and gradients as the uncompiled model.

The GPU's default packed attention is the CUDA-only `segment` op. Here it gets a float64 CPU
kernel for the test's duration, so the CPU traces the same graph the GPU does: before the fix,
every new longest segment (an int argument) and the first block's input (a view) compiled new
graphs until torch.compile's recompile limit sent the blocks back to eager."""

import copy
import random

import pytest
import torch

from vpit_fast import _extension

pytestmark = pytest.mark.skipif(_extension._C is None, reason="needs the compiled extension (its op schema)")

VISUAL_TOKENS, VISUAL_DIM = 4, 16


def _segment_reference(query, key, value, cu_seqlens, max_seqlen, scale):
    """Causal attention per segment in float64 (K/V heads repeated for GQA); lse is not used."""
    out = torch.zeros_like(query)
    group = query.shape[1] // key.shape[1]
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        q, k, v = (x[start:end].transpose(0, 1).double() for x in (query, key, value))
        k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        out[start:end] = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale).transpose(0, 1).to(query.dtype)
    return out, query.new_zeros((query.shape[1], query.shape[0]), dtype=torch.float32)


def _segment_reference_backward(grad_out, query, key, value, out, lse, cu_seqlens, max_seqlen, scale):
    with torch.enable_grad():
        inputs = [x.detach().requires_grad_() for x in (query, key, value)]
        return torch.autograd.grad(_segment_reference(*inputs, cu_seqlens, max_seqlen, scale)[0], inputs, grad_out)


@pytest.fixture
def segment_on_cpu(monkeypatch):
    """`varlen_attention` picks the `segment` op, which runs the float64 reference on the CPU."""
    from vpit_fast import attention
    from vpit_fast.ops import segment_attention

    library = torch.library.Library("vpit_fast", "IMPL")
    library.impl("segment_attention", _segment_reference, "CPU")
    library.impl("segment_attention_backward", _segment_reference_backward, "CPU")
    monkeypatch.setattr(attention, "BACKENDS", ("segment",))
    monkeypatch.setattr(attention, "segment_unsupported_reason", lambda *args, **kwargs: None)
    monkeypatch.setattr(segment_attention, "unsupported_reason", lambda *args, **kwargs: None)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    library._destroy()


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from vpit_fast.data import build_tokenizer
    from vpit_fast.model import VPiTConfig, VPiTModel

    tokenizer = build_tokenizer()
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                                       num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
                                       head_dim=64, max_position_embeddings=512))
    config = VPiTConfig(visual_dim=VISUAL_DIM, num_visual_tokens=VISUAL_TOKENS)
    return VPiTModel.from_base(llm, tokenizer, None, config)


def _packed_batch(model, seed, long_prompt=0):
    """A flattened packed batch of 4 + ``seed`` samples of random lengths (so each seed has its
    own token count, segment count and longest segment), the first with a prompt of
    ``long_prompt`` tokens when given, and visual tokens for its images."""
    from vpit_fast.data import Sample, collate_packed, flatten_packed, pack

    rng = random.Random(seed)
    cfg = model.config
    samples = []
    for i in range(4 + seed):
        length = long_prompt if i == 0 and long_prompt else rng.randint(3, 40)
        prompt = [rng.randrange(10, cfg.text_vocab_size) for _ in range(length)]
        response = [rng.randrange(10, cfg.text_vocab_size) for _ in range(rng.randint(3, 40))]
        generate = i % 2 == 1
        image = [cfg.image_start_id] + [cfg.image_token_id] * VISUAL_TOKENS + [cfg.image_end_id]
        ids = [1] + prompt + (response + image if generate else image + response)
        labels = [-100] * (1 + len(prompt)) + (response + [-100] * len(image) if generate
                                                else [-100] * len(image) + response)
        slot = ids.index(cfg.image_start_id) + 1
        samples.append(Sample(input_ids=torch.tensor(ids), labels=torch.tensor(labels), image_keys=[f"{seed}-{i}"],
                              image_slots=torch.tensor([slot]), image_is_target=torch.tensor([generate]),
                              id=str(i), num_visual_tokens=VISUAL_TOKENS))
    budget = max(160, max(len(sample) for sample in samples))
    batch = flatten_packed(collate_packed(pack(samples, budget=budget, pad_id=0)), pad_id=0)
    inputs = model.batch_inputs(batch, "cpu")
    inputs["visual_tokens"] = torch.randn(len(batch["image_keys"]), VISUAL_TOKENS, VISUAL_DIM)
    return inputs


def test_first_block_input_is_not_a_view():
    """A view would carry its base into the first block, whose compiled graph would then differ
    from every other block's."""
    model = _model()
    inputs = _packed_batch(model, 0)
    embeds = model.embed(inputs["input_ids"], inputs["visual_tokens"], inputs["image_slots"],
                         inputs["image_batch_index"])
    assert embeds._base is None
    flat = embeds.reshape(-1, embeds.shape[-1])
    slots = model._slot_positions(inputs["image_slots"], inputs["image_batch_index"], embeds.shape[1]).reshape(-1)
    adapted = model.adapter(inputs["visual_tokens"]).reshape(-1, embeds.shape[-1])
    assert torch.equal(flat[slots], adapted)


def _compare_compiled_with_eager(eager, batches):
    """Runs every batch through ``eager`` and a copy with compiled blocks; asserts the same loss
    and gradients (fp32)."""
    from vpit_fast.train.parallel import apply_compile

    compiled = copy.deepcopy(eager)
    apply_compile(compiled)
    for inputs in batches:
        results = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            out = model(**inputs)
            out.loss.backward()
            grads = {n.replace("._orig_mod", ""): p.grad for n, p in model.named_parameters() if p.grad is not None}
            results.append((out.loss.detach(), grads))
        (loss, grads), (loss_c, grads_c) = results
        assert torch.isfinite(loss_c) and abs(loss_c.item() - loss.item()) <= 1e-5 * abs(loss.item())
        assert grads.keys() == grads_c.keys()
        for name, g in grads.items():
            assert (grads_c[name] - g).norm() <= 1e-4 * g.norm().clamp_min(1e-12), name


@pytest.mark.parametrize("residual_norms", [False, True], ids=["transformers-layers", "residual-norms"])
def test_varying_packed_batches_compile_few_graphs_and_match_eager(segment_on_cpu, residual_norms):
    from torch._dynamo.utils import counters

    from vpit_fast.packed_llama import use_residual_norms

    model = _model()
    if residual_norms:  # vpit-train's fused_norms=true: the layers take and return two tensors
        use_residual_norms(model.llm)
    batches = [_packed_batch(model, seed) for seed in range(5)]
    first, second = batches[:2]  # the second batch changes every size at once
    assert first["input_ids"].numel() != second["input_ids"].numel()
    assert first["cu_seqlens"].numel() != second["cu_seqlens"].numel()
    assert first["max_seqlen"] != second["max_seqlen"]
    counters.clear()
    _compare_compiled_with_eager(model, batches)
    # one graph for the first batch's sizes, one for all later ones (token count, segment count
    # and longest segment symbolic) shared by every block; far from the recompile limit (8), past
    # which the blocks would run eagerly
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    assert counters["frames"]["total"] == counters["frames"]["ok"]


def test_longest_segment_past_the_limit_switches_backend_in_one_graph(segment_on_cpu, monkeypatch):
    """Batches whose longest segment passes `MAX_SEQLEN` (256) go to FlashAttention: the choice
    happens inside the compiled block on a symbolic value, without a graph break (its reason
    string formatted the value, which split the graph) and without a graph per value. The CPU
    reference stands in for FlashAttention; the real limit decides."""
    from torch._dynamo.utils import counters

    from vpit_fast import attention
    from vpit_fast.ops.segment_attention import MAX_SEQLEN, call_unsupported_reason

    def segment_reason(device, dtype, head_dim, max_seqlen, dropout=0.0, window=False):
        return call_unsupported_reason(torch.bfloat16, head_dim, max_seqlen, dropout, window)  # fp32 test

    def flash_stand_in(q, k, v, cu, max_seqlen, scale, sliding_window):
        return torch.ops.vpit_fast.segment_attention(q, k, v, cu, max_seqlen, scale)[0]

    usable = attention._backend_usable
    monkeypatch.setattr(attention, "BACKENDS", ("segment", "torch_varlen"))
    monkeypatch.setattr(attention, "segment_unsupported_reason", segment_reason)
    monkeypatch.setattr(attention, "_backend_usable",
                        lambda backend, *args: None if backend == "torch_varlen" else usable(backend, *args))
    monkeypatch.setattr(attention, "_run_torch_varlen", flash_stand_in)
    model = _model()
    batches = [_packed_batch(model, seed, long_prompt) for seed, long_prompt in
               ((0, 0), (1, 290), (2, 0), (3, 330), (4, 270), (1, 0))]
    longest = [int(b["max_seqlen"]) for b in batches]
    assert len(set(longest)) == len(longest) and sum(m > MAX_SEQLEN for m in longest) == 3, longest
    counters.clear()
    _compare_compiled_with_eager(model, batches)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    # first sizes; symbolic sizes past the limit; symbolic sizes within it
    assert counters["stats"]["unique_graphs"] <= 3, dict(counters["stats"])
