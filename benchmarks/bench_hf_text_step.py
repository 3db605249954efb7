"""A full text-only training step of a LLaMA-3.2-1B-shaped Hugging Face model, the way HF
Trainer runs it (fp32 master weights, bf16 autocast, ``model(input_ids, labels=labels).loss``,
fused AdamW): unpatched, with our fused linear cross-entropy patch
(`vpit_fast.integrations.transformers.apply_fused_cross_entropy`), with Cut Cross-Entropy's
patch and with Liger-Kernel's (fused linear cross-entropy only, its other kernels off, so the
four differ only in the loss). Reports step time, tokens/s and peak memory.

Liger and CCE patch the model class, so they run last. Run:
pytest benchmarks/bench_hf_text_step.py --benchmark-only
"""

import gc

import pytest
import torch

from conftest import measure, requires_cuda

BATCH, SEQ = 4, 2048
_results = {}


def build_model():
    from transformers import LlamaForCausalLM

    from vpit_fast import presets

    torch.manual_seed(0)
    with torch.device("cuda"):
        return LlamaForCausalLM(presets.llm_config("llama3.2-1b", attn_implementation="sdpa"))


def run(benchmark, name, patch):
    gc.collect()
    torch.cuda.empty_cache()
    model = build_model()
    model = patch(model) or model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), device="cuda", generator=gen)
    labels = input_ids.clone()
    labels[:, :SEQ // 4] = -100  # an SFT-like prompt part without targets

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = measure(benchmark, step, warmup=2, reps=8)
    info = benchmark.extra_info
    info.update(tokens_per_s=BATCH * SEQ / (ms / 1e3), peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                batch=BATCH, seq=SEQ, loss=float(step()))
    _results[name] = ms
    if name != "ours" and "ours" in _results:
        info["time_vs_ours"] = ms / _results["ours"]



@requires_cuda
def test_ours(benchmark):
    from vpit_fast.integrations.transformers import apply_fused_cross_entropy

    run(benchmark, "ours", lambda m: apply_fused_cross_entropy(m) and None)


@requires_cuda
def test_unpatched(benchmark):
    run(benchmark, "unpatched", lambda m: None)


class _CutCrossEntropyLoss(torch.nn.Module):
    """What Cut Cross-Entropy's transformers patch does, for releases that ship only the loss
    (25.1.1 has no ``cut_cross_entropy.transformers``): the decoder's hidden states and the LM
    head's weight go to ``linear_cross_entropy`` with ``shift=True``; no logits are built. Its
    kernels ignore autocast, so both are cast to the autocast dtype first (bf16 here), as the LM
    head's matmul would be: fp32 operands would run its Triton GEMMs in fp32."""

    def __init__(self, model):
        super().__init__()
        from cut_cross_entropy import linear_cross_entropy

        self.model, self.loss = model, linear_cross_entropy

    @property
    def config(self):
        return self.model.config

    def forward(self, input_ids, labels):
        hidden = self.model.model(input_ids=input_ids).last_hidden_state
        weight = self.model.lm_head.weight
        if torch.is_autocast_enabled("cuda"):
            dtype = torch.get_autocast_dtype("cuda")
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        loss = self.loss(hidden, weight, labels, shift=True, reduction="mean")
        return type("Output", (), {"loss": loss})


@requires_cuda
def test_cut_cross_entropy(benchmark):
    pytest.importorskip("cut_cross_entropy")
    try:
        from cut_cross_entropy.transformers import cce_patch
    except ImportError:  # releases without the patch module: the same computation, wrapped here
        run(benchmark, "cce", _CutCrossEntropyLoss)
    else:
        run(benchmark, "cce", cce_patch)


@requires_cuda
def test_liger_kernel(benchmark):
    liger = pytest.importorskip("liger_kernel.transformers")
    run(benchmark, "liger", lambda m: liger.apply_liger_kernel_to_llama(
        rope=False, rms_norm=False, swiglu=False, cross_entropy=False, fused_linear_cross_entropy=True, model=m))
