"""Multimodal generation at LLaMA-3.2-1B shapes (DESIGN.md section 3(c), issue item 7): ours
(`vpit_fast.generation.generate`: static KV cache, per-row dispatch, with and without a CUDA graph)
against the official MetaMorph loop (no cache: the whole sequence re-runs for every token, one
prompt at a time; `generate_uncached`) and against transformers' own KV-cache decoding (a
``DynamicCache``, the 2-D padding mask grown by one column per step, transformers building the
4-D mask every step; the same heads, sampling and dispatch as ours, run eagerly), all in the same
process; plus the latency of one decode step, eager, replayed from a CUDA graph, and replayed from
a CUDA graph of the compiled step (``compile_step=True``: torch.compile's fused kernels; the
compilation, once per decoder shape, happens before the timing). Ours runs its fused decoder
layers (`vpit_fast.fused_decode`) where ``fused_layers="auto"`` takes them (batch 1 here); the
``_hf_layers`` variants run transformers' layers instead, to show what the fused layers give.

Model: `vpit_fast.presets.llm_config("llama3.2-1b")` with random weights, bf16, vocabulary 128256
(our word-level tokenizer's ids plus the LLaMA-3 rows, so the LM head costs what it costs in
LLaMA-3.2-1B), vision head and adapter at SigLIP width 1152, ``normalize_visual=True``.

Workload, forced so every implementation does the same work: a 2048-token prompt (random words)
whose last token is the response prefix ``<image_start>``. The 96 new positions are then 64
visual tokens (vision head -> normalisation -> adapter -> next input), ``<image_end>`` (appended
by the rule, not sampled) and 31 greedy text tokens: 32 text positions. No second image and no
end of turn can interrupt it: ``max_images=1`` (the prefix's image counts) excludes
``<image_start>``, ``min_new_tokens=96`` excludes the end-of-turn token. Batch 1 and 16 (16
different prompts of 2048 tokens each).

extra_info: the CUDA-event time (ms) of one whole generation (prefill included), ms per new
token, the ratio to ours with the CUDA graph; for the step benchmarks the ms of one decode step
(one token for every row), its fraction of the ~0.85 ms weight-read floor (DESIGN.md 3(c)).
Run: pytest benchmarks/bench_generate.py --benchmark-only (CUDA only; every case skips without).
"""

import statistics

import pytest
import torch

from conftest import device_record, measure, requires_cuda

PROMPT_TOKENS, NEW_TOKENS, VISUAL_DIM = 2048, 96, 1152
BATCHES = [1, 16]
WEIGHT_READ_FLOOR_MS = 0.85  # DESIGN.md 3(c): reading the 1B model's weights once per token on an H100
FORCED = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, max_images=1, response_prefix="<image_start>")

_times = {}  # (batch, impl) -> ms, for the ratios


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaForCausalLM

    from vpit_fast.data import build_tokenizer
    from vpit_fast.model import VPiTConfig, VPiTModel
    from vpit_fast.presets import llm_config

    torch.manual_seed(0)
    with torch.device("cuda"):
        llm = LlamaForCausalLM(llm_config("llama3.2-1b")).to(torch.bfloat16)
    vpit = VPiTModel.from_base(llm, build_tokenizer(), None, VPiTConfig(normalize_visual=True), visual_dim=VISUAL_DIM)
    return vpit.eval()


def prompts(model, batch, seed=0):
    """``batch`` user messages that render (template + ``<image_start>`` prefix) to exactly
    PROMPT_TOKENS tokens: our word-level tokenizer gives each vocabulary word one token."""
    from vpit_fast.data.shapes import vocabulary
    from vpit_fast.generation import encode_prompt

    words = [w for w in vocabulary() if w.isalpha()]
    overhead = encode_prompt(model, "", response_prefix="<image_start>").input_ids.numel()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batch):
        picks = torch.randint(len(words), (PROMPT_TOKENS - overhead,), generator=gen).tolist()
        text = " ".join(words[i] for i in picks)
        assert encode_prompt(model, text, response_prefix="<image_start>").input_ids.numel() == PROMPT_TOKENS
        out.append(text)
    return out


def transformers_cache_generate(model, texts):
    """transformers' own KV-cache decoding with our heads, sampling and dispatch (eager)."""
    from transformers import DynamicCache

    from vpit_fast.generation import IMAGE_MODE, dispatch_next_inputs, encode_prompt

    cfg, llm, heads = model.config, model.llm, model.heads
    table = llm.get_input_embeddings().weight
    device = table.device
    ids = torch.stack([encode_prompt(model, t, response_prefix="<image_start>").input_ids for t in texts]).to(device)
    B = ids.shape[0]
    mask = torch.ones_like(ids)
    embeds = model.embed(ids, None, None, None)
    excluded = torch.tensor([cfg.image_token_id, cfg.image_end_id, cfg.image_start_id,
                             model.tokenizer.eos_token_id], device=device)
    mode = torch.full((B,), IMAGE_MODE, device=device)
    count = torch.zeros(B, dtype=torch.int64, device=device)
    left = torch.zeros(B, dtype=torch.int64, device=device)
    eos = torch.tensor([model.tokenizer.eos_token_id], device=device)
    cache = DynamicCache(config=llm.config)
    emitted = []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            hidden = llm.base_model(inputs_embeds=embeds, attention_mask=mask, past_key_values=cache,
                                    use_cache=True).last_hidden_state[:, -1]
            logits = heads.lm_head(hidden).float()
            logits[:, cfg.text_vocab_size:] = float("-inf")
            logits.index_fill_(1, excluded, float("-inf"))
            embeds, next_ids, _, mode, count, left = dispatch_next_inputs(
                mode, count, left, logits.argmax(-1), heads.vision_head(hidden), table, model.adapter,
                num_visual_tokens=cfg.num_visual_tokens, image_start_id=cfg.image_start_id,
                image_end_id=cfg.image_end_id, image_token_id=cfg.image_token_id, pad_id=0, eos_ids=eos,
                normalize=cfg.normalize_visual)
            embeds = embeds[:, None]
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            emitted.append(next_ids)
    return torch.stack(emitted, 1)


def check_forced(model, token_ids):
    """Every row: 64 visual tokens, <image_end>, then 31 text tokens."""
    cfg = model.config
    ids = torch.as_tensor(token_ids).reshape(-1, NEW_TOKENS).cpu()
    assert (ids[:, :64] == cfg.image_token_id).all() and (ids[:, 64] == cfg.image_end_id).all()
    text = ids[:, 65:]
    assert not torch.isin(text, torch.tensor([cfg.image_token_id, cfg.image_start_id, cfg.image_end_id])).any()


def record(benchmark, batch, impl, ms):
    _times[(batch, impl)] = ms
    info = benchmark.extra_info
    info.update(ms=ms, ms_per_new_token=ms / NEW_TOKENS, batch=batch, prompt_tokens=PROMPT_TOKENS,
                new_tokens=NEW_TOKENS)
    ours = _times.get((batch, "ours_cuda_graph"))
    if ours is not None:
        info["ratio_to_ours_cuda_graph"] = ms / ours


# ---------------------------------------------------------------------------------------------
# end to end: one whole generation
# ---------------------------------------------------------------------------------------------


def official_attention(impl):
    """The SDPA backends the official-style loop may use: all but cuDNN for "official_no_cache"
    (cuDNN builds an execution plan for every new sequence length, and this loop's length grows
    by one every token: the plan building, not the missing cache, would be measured), all of
    them (transformers' default choice) for "official_no_cache_cudnn"."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    if impl == "official_no_cache_cudnn":
        backends.append(SDPBackend.CUDNN_ATTENTION)
    return sdpa_kernel(backends)


IMPLS = ["ours_cuda_graph", "ours_compiled", "ours_eager", "ours_cuda_graph_hf_layers", "ours_compiled_hf_layers",
         "transformers_cache", "official_no_cache", "official_no_cache_cudnn"]
# Only at batch 1: the cuDNN variant of the official loop (about 40 s a run at batch 16), and ours
# with transformers' decoder layers instead of the fused ones ("_hf_layers"; at batch 16, 16 rows
# are past vpit_fast.fused_decode.AUTO_MAX_ROWS, so ours runs transformers' layers anyway).
BATCH_1_ONLY = ("official_no_cache_cudnn", "ours_cuda_graph_hf_layers", "ours_compiled_hf_layers")
CASES = [(batch, impl) for batch in BATCHES for impl in IMPLS if batch == 1 or impl not in BATCH_1_ONLY]


@requires_cuda
@pytest.mark.parametrize("batch, impl", CASES)
def test_generate_cuda(benchmark, model, batch, impl):
    from vpit_fast.generation import generate, generate_uncached

    texts = prompts(model, batch)
    if impl.startswith("ours"):
        graph, compiled = impl != "ours_eager", impl.startswith("ours_compiled")
        fused = False if impl.endswith("_hf_layers") else "auto"

        def run():
            return generate(model, texts, cuda_graph=graph, compile_step=compiled, fused_layers=fused,
                            stop_check_interval=NEW_TOKENS, **FORCED)

        out = run()  # compiles and captures the graph (kept for the model) outside the timing
        for g in out:
            check_forced(model, g.token_ids)
            assert len(g.visual_tokens) == 1
        ms = measure(benchmark, run, warmup=1, reps=5, impl=impl)
    elif impl == "transformers_cache":
        check_forced(model, transformers_cache_generate(model, texts))
        ms = measure(benchmark, lambda: transformers_cache_generate(model, texts), warmup=1, reps=3, impl=impl)
    else:
        # Seconds a prompt: timed once (CUDA events), pytest-benchmark gets the same single run.
        times = []

        def run_once():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            with official_attention(impl):
                out = generate_uncached(model, texts, **FORCED)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
            return out

        with official_attention(impl):  # warm-up
            generate_uncached(model, texts[:1], **{**FORCED, "max_new_tokens": 2, "min_new_tokens": 2})
        out = benchmark.pedantic(run_once, rounds=1, iterations=1, warmup_rounds=0)
        for g in out:
            check_forced(model, g.token_ids)
        benchmark.extra_info.update(device_record(), impl=impl, cuda_event_median_ms=statistics.median(times))
        ms = statistics.median(times)
    record(benchmark, batch, impl, ms)


# ---------------------------------------------------------------------------------------------
# one decode step
# ---------------------------------------------------------------------------------------------


# "_image_run": the step inside an image, without LM head and sampling (StaticDecoder.image_run_steps);
# the prompts' <image_start> prefix puts every row inside an image, with 64 such steps to go.
STEP_VARIANTS = ["compiled", "cuda_graph", "eager", "compiled_hf_layers", "cuda_graph_hf_layers",
                 "cuda_graph_image_run"]
STEP_CASES = [(b, v) for b in BATCHES for v in STEP_VARIANTS if b == 1 or not v.endswith("_hf_layers")]


@requires_cuda
@pytest.mark.parametrize("batch, variant", STEP_CASES)
def test_decode_step_cuda(benchmark, model, batch, variant):
    from vpit_fast.generation import release_decoders, start_decoding

    graph, compiled = variant != "eager", variant.startswith("compiled")
    fused = False if variant.endswith("_hf_layers") else "auto"
    # A budget of 256 leaves room for the warm-up and timed steps (each one writes a cache slot).
    decoder = start_decoding(model, prompts(model, batch), cuda_graph=graph, compile_step=compiled,
                             fused_layers=fused, **{**FORCED, "max_new_tokens": 256, "min_new_tokens": 256})
    if variant.endswith("_image_run"):
        assert decoder.image_run_steps() == 64
        # 2 + 40 timed + 1 + 20 pytest-benchmark rounds: 63 steps, all inside the image
        ms = measure(benchmark, lambda: decoder.step(image_run=True), warmup=2, reps=40, impl="ours", batch=batch,
                     cuda_graph=graph, image_run=True, fused_layers=decoder.fused_layers is not None)
    else:
        ms = measure(benchmark, decoder.step, warmup=5, reps=50, impl="ours", batch=batch, cuda_graph=graph,
                     compile_step=compiled, fused_layers=decoder.fused_layers is not None)
    benchmark.extra_info.update(ms_per_step=ms, weight_read_floor_ms=WEIGHT_READ_FLOOR_MS,
                                fraction_of_floor=WEIGHT_READ_FLOOR_MS / ms)
    release_decoders(model)
