"""One VPiT training step at LLaMA-3.2-1B shapes (issue: lean training loop): ours against a step
built the way the official MetaMorph code works, in the same process.

Both start from the same raw SigLIP-so400m-shaped tower outputs ``[M, 729, 1152]`` (precomputed, random)
and the same MetaMorph-like samples (image understanding: a prompt image, a question, a text answer;
generation: a text prompt, an answer holding an image's 64 visual tokens; some text-only turns),
random weights, forward + backward + optimizer step on one GPU.

- ours: what `vpit-train` does on one GPU: `VPiTModel` in bf16 parameters with fp32 master weights
  in `MasterWeightAdamW` (fused AdamW), samples packed into 4096-token rows, varlen attention,
  `interpolate_tokens`, the fused response-only head loss; eager or torch.compile per block
  (`compile=true`); 2, 4 or 8 packed rows per step, flattened into one row of their real tokens
  as `vpit-train` does (`data.flatten`, `flatten_packed`; the compiled blocks first see another
  token count, so their dynamic-shape code is timed, as in training) or as padded ``[rows, 4096]``
  (the ``-padded`` cases); ``-accumulate2`` / ``-accumulate4``: two or four 8-row micro-batches
  per optimizer step, as `vpit-train`'s gradient accumulation runs (the optimizer's fixed cost
  spread over more tokens; since session 16 the gradients summed in fp32, `Fp32GradSum`); ``-fused-norms``: `vpit-train`'s ``fused_norms=true`` (residual adds
  folded into the norms, the one-pass RMSNorm backward of `vpit_fast.ops.rms_norm`).
- official style: HF LLaMA with SDPA on padded batches (one sample per row), the input embeddings
  assembled by a Python loop over images, logits for every position upcast to fp32, a separate
  cosine loss, the channels-first ``F.interpolate`` path; fp32 parameters under bf16 autocast with
  fused AdamW (what HF Trainer's ``bf16=True`` does on one GPU).

Reported in extra_info: step time, tokens/s (real tokens), MFU at 989 TFLOP/s dense bf16 counted
by `vpit_fast.train.metrics.VPiTFlops`: ``mfu`` the decoder alone (6N + 12·L·H·T per token, N the
decoder's weights), ``mfu_with_heads`` adding the LM head on text targets, the vision head on
visual targets and the adapter on image slots (the rows each runs on); peak memory, and the ratio
to ours. For reference (issue text): a pure-text
HF LLaMA step at this shape reached 0.447 MFU on the H100.
Run: pytest benchmarks/bench_train_step.py --benchmark-only
"""

import random

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from conftest import measure, requires_cuda
from vpit_fast.train.metrics import VPiTFlops

BUDGET = 4096  # tokens per packed row
N_VISUAL, RAW_GRID, VISUAL_DIM = 64, 27, 1152
PEAK_BF16 = 989e12
_results = {}


def synthetic_samples(config, vocab, total_tokens, seed=0):
    """MetaMorph-like samples (`vpit_fast.data.Sample`) until ``total_tokens`` are filled:
    45% understanding, 45% generation, 10% text only."""
    from vpit_fast.data import Sample

    rng = random.Random(seed)
    start, end, slot = config.image_start_id, config.image_end_id, config.image_token_id
    samples, filled = [], 0

    def text(n):
        return [rng.randrange(200, vocab - 300) for _ in range(n)]

    while True:
        kind = rng.choices(["understand", "generate", "text"], weights=[45, 45, 10])[0]
        prompt, response = text(rng.randint(12, 40)), text(rng.randint(8, 90))
        if kind == "understand":
            prompt = [start] + [slot] * N_VISUAL + [end] + prompt
        elif kind == "generate":
            response = text(rng.randint(4, 10)) + [start] + [slot] * N_VISUAL + [end] + text(2)
        ids = [1] + prompt + response
        if filled + len(ids) > total_tokens:
            return samples
        labels = [-100] * (1 + len(prompt)) + response
        slots = [i + 1 for i, t in enumerate(ids) if t == start]
        for s in slots:
            for j in range(N_VISUAL):
                labels[s + j] = -100
        is_target = [s > len(prompt) for s in slots]
        samples.append(Sample(input_ids=torch.tensor(ids), labels=torch.tensor(labels),
                              image_keys=[f"{len(samples)}-{i}" for i in range(len(slots))],
                              image_slots=torch.tensor(slots, dtype=torch.int64),
                              image_is_target=torch.tensor(is_target, dtype=torch.bool), id=str(len(samples)),
                              num_visual_tokens=N_VISUAL))
        filled += len(ids)


@pytest.fixture(scope="module")
def setup():
    from transformers import LlamaForCausalLM

    from vpit_fast import presets
    from vpit_fast.data import build_tokenizer
    from vpit_fast.model import VPiTConfig, VPiTModel

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    with torch.device("cuda"):
        llm = LlamaForCausalLM(presets.llm_config("llama3.2-1b", vocab_size=128256))
    return VPiTModel.from_base(llm, tokenizer, None, VPiTConfig(), visual_dim=VISUAL_DIM)


def samples_and_raw(model, rows, seed=0):
    """MetaMorph-like samples filling ``rows`` packed rows, and random raw tower outputs for their
    images ``[M, 729, 1152]`` in sample order."""
    samples = synthetic_samples(model.config, 128256, rows * BUDGET - 300 * rows, seed=seed)
    raw = torch.randn(sum(len(s.image_keys) for s in samples), RAW_GRID * RAW_GRID, VISUAL_DIM,
                      device="cuda", dtype=torch.bfloat16)
    return samples, raw


def step_flops(model, samples):
    """(decoder FLOPs, all model FLOPs) of one pass over ``samples`` (`VPiTFlops`)."""
    tokens = sum(len(s) for s in samples)
    text_targets = sum(int((s.labels[1:] != -100).sum()) for s in samples)
    images = sum(int(s.image_is_target.numel()) for s in samples)
    visual_targets = sum(int(s.image_is_target.sum()) for s in samples)
    count = VPiTFlops.of(model)
    span = tokens / len(samples)
    return (count.decoder_flops(tokens, span),
            count.model_flops(tokens, span, text_targets, N_VISUAL * visual_targets, N_VISUAL * images))


def report(benchmark, name, ms, samples, model, peak):
    tokens = sum(len(s) for s in samples)
    text_targets = sum(int((s.labels[1:] != -100).sum()) for s in samples)
    tokens_per_s = tokens / (ms / 1e3)
    decoder, everything = step_flops(model, samples)
    info = benchmark.extra_info
    info.update(tokens=tokens, text_targets=text_targets, tokens_per_s=tokens_per_s,
                mfu=decoder / (ms / 1e3) / PEAK_BF16, mfu_with_heads=everything / (ms / 1e3) / PEAK_BF16,
                peak_gib=peak / 2**30, mean_sample_len=tokens / len(samples))
    _results[name] = tokens_per_s
    if not name.startswith("ours") and "ours-2rows-eager" in _results:
        info["ours_eager_speedup"] = _results["ours-2rows-eager"] / tokens_per_s
        if "ours-2rows-compiled" in _results:
            info["ours_compiled_speedup"] = _results["ours-2rows-compiled"] / tokens_per_s


@requires_cuda
@pytest.mark.parametrize("compiled, rows, adamw, flat, accumulate, fused_norms", [
    (False, 2, "vpit", True, 1, False), (True, 2, "vpit", True, 1, False), (True, 2, "vpit", False, 1, False),
    (True, 2, "torch", True, 1, False), (True, 4, "vpit", True, 1, False), (True, 4, "vpit", False, 1, False),
    (True, 8, "vpit", True, 1, False), (True, 8, "vpit", True, 2, False), (True, 8, "vpit", True, 4, False),
    (True, 8, "vpit", True, 1, True), (True, 8, "vpit", True, 4, True)],
    ids=["eager-2rows", "compiled-2rows", "compiled-2rows-padded", "compiled-2rows-torch-adamw", "compiled-4rows",
         "compiled-4rows-padded", "compiled-8rows", "compiled-8rows-accumulate2",
         "compiled-8rows-accumulate4", "compiled-8rows-fused-norms", "compiled-8rows-accumulate4-fused-norms"])
def test_ours(benchmark, setup, compiled, rows, adamw, flat, accumulate, fused_norms):
    import copy

    from vpit_fast import interpolate_tokens
    from vpit_fast.data import collate_packed, flatten_packed, pack
    from vpit_fast.model import VPiTModel
    from vpit_fast.train.grad_accum import Fp32GradSum
    from vpit_fast.train.master_adamw import MasterWeightAdamW
    from vpit_fast.train.optim import param_groups

    base = setup
    model = copy.deepcopy(base).to(torch.bfloat16)  # vpit-train on one GPU: bf16 parameters
    if fused_norms:  # vpit-train's fused_norms=true
        from vpit_fast.packed_llama import use_residual_norms

        use_residual_norms(model.llm)
    if compiled:  # torch.compile per decoder block, as vpit-train's compile=true does
        from vpit_fast.train.parallel import apply_compile

        torch._dynamo.reset()  # graphs of the previous case count toward the recompile limit
        counters["stats"].clear()
        apply_compile(model)
    # fp32 masters as build_optimizer gives bf16 parameters; "vpit" is the fused kernel, "torch"
    # torch's fused AdamW between casts
    optimizer = MasterWeightAdamW(param_groups(model, 0.0), lr=1e-5, betas=(0.9, 0.95), impl=adamw)

    def micro_batch(seed):
        """(model inputs, tower outputs in row order, samples) of ``rows`` packed rows."""
        samples, raw = samples_and_raw(base, rows, seed=seed)
        packed = pack(samples, BUDGET, pad_id=0)
        assert len(packed) == rows, f"{len(packed)} rows"
        collated = collate_packed(packed)
        if flat:  # what vpit-train does (data.flatten): one row of the real tokens, no padding tails
            collated = flatten_packed(collated, pad_id=0)
        # raw holds the images in sample order; the packed rows list them in row order
        position = {key: n for n, key in enumerate(k for s in samples for k in s.image_keys)}
        order = torch.tensor([position[k] for r in packed for k in r.image_keys], device="cuda")
        return VPiTModel.batch_inputs(collated, "cuda"), raw[order], samples

    # ``accumulate`` micro-batches per optimizer step, as vpit-train's gradient accumulation runs
    micro_batches = [micro_batch(seed) for seed in range(accumulate)]

    # vpit-train sums the micro-batches' bf16 gradients in fp32 (fp32_grad_accum)
    fp32_sum = Fp32GradSum(model.parameters()) if accumulate > 1 else None

    def step():
        for n, (batch, raw_in_order, _) in enumerate(micro_batches):
            tokens = interpolate_tokens(raw_in_order, out_size=8)
            out = model(**batch, visual_tokens=tokens)
            out.loss.backward()
            if fp32_sum is not None:
                fp32_sum.collect(last=n == len(micro_batches) - 1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if flat:
        # another token count first, so the compiled blocks run the dynamic-shape code that
        # training, whose token count changes every step, runs
        samples = micro_batches[0][2]
        other = collate_packed(pack(samples[:-3], BUDGET, pad_id=0))
        warm = VPiTModel.batch_inputs(flatten_packed(other, pad_id=0), "cuda")
        out = model(**warm, visual_tokens=interpolate_tokens(micro_batches[0][1][:len(other["image_keys"])], out_size=8))
        out.loss.backward()
        optimizer.zero_grad(set_to_none=True)
    step()
    torch.cuda.reset_peak_memory_stats()
    ms = measure(benchmark, step, warmup=3, reps=10)
    benchmark.extra_info.update(optimizer=optimizer.implementation, flat=flat, accumulate=accumulate,
                                rows_tokens=sum(int(b["input_ids"].numel()) for b, _, _ in micro_batches))
    if compiled:  # 2 for a flattened case (first sizes, then symbolic ones); near 8 the blocks go eager
        benchmark.extra_info["compiled_graphs"] = counters["stats"]["unique_graphs"]
    name = (f"ours-{rows}rows-{'compiled' if compiled else 'eager'}" + ("-torch-adamw" if adamw == "torch" else "")
            + ("" if flat else "-padded") + (f"-accumulate{accumulate}" if accumulate > 1 else "")
            + ("-fused-norms" if fused_norms else ""))
    all_samples = [s for _, _, batch_samples in micro_batches for s in batch_samples]
    report(benchmark, name, ms, all_samples, base,
           torch.cuda.max_memory_allocated())
    del model, optimizer
    torch.cuda.empty_cache()


class OfficialStyle(torch.nn.Module):
    """The official code's computation: per-image Python loop for the input embeddings, all-row
    logits in fp32, cross-entropy over shifted labels, separate cosine loss on the vision head."""

    def __init__(self, vpit):
        super().__init__()
        self.llm, self.adapter, self.vision_head = vpit.llm, vpit.adapter, vpit.heads.vision_head

    def forward(self, input_ids, attention_mask, labels, raw, images):
        # official interpolation: view as a grid, channels first, bilinear in fp32, back
        b, _, c = raw.shape
        grid = raw.view(b, RAW_GRID, RAW_GRID, c).permute(0, 3, 1, 2).contiguous().float()
        tokens = F.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False).to(raw.dtype)
        tokens = tokens.permute(0, 2, 3, 1).reshape(b, N_VISUAL, c)
        embeds = self.llm.get_input_embeddings()(input_ids)
        rows = []
        for r in range(input_ids.shape[0]):
            row = embeds[r]
            for m, (row_index, s, _) in enumerate(images):
                if row_index == r:
                    row = torch.cat([row[:s], self.adapter(tokens[m]).to(row.dtype), row[s + N_VISUAL:]])
            rows.append(row)
        hidden = self.llm.model(inputs_embeds=torch.stack(rows), attention_mask=attention_mask).last_hidden_state
        logits = self.llm.lm_head(hidden).float()
        text = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        preds, targets = [], []
        for m, (r, s, is_target) in enumerate(images):
            if is_target:
                preds.append(self.vision_head(hidden[r, s - 1:s - 1 + N_VISUAL]))
                targets.append(tokens[m])
        visual = (1 - F.cosine_similarity(torch.cat(preds).float(), torch.cat(targets).float(), dim=-1)).mean()
        return text + visual


@requires_cuda
def test_official_style(benchmark, setup):
    import copy

    from vpit_fast.data import pad_batch
    from vpit_fast.train.optim import build_optimizer

    base = setup
    samples, raw = samples_and_raw(base, 2)
    vpit = copy.deepcopy(base).float()
    vpit.llm.set_attn_implementation("sdpa")
    model = OfficialStyle(vpit)
    optimizer = build_optimizer(model, 1e-5, fused="torch")
    batch = pad_batch(samples, pad_id=0)
    input_ids, labels = batch["input_ids"].cuda(), batch["labels"].cuda()
    attention_mask = batch["attention_mask"].cuda()
    images = list(zip(batch["image_batch_index"].tolist(), batch["image_slots"].tolist(),
                      batch["image_is_target"].tolist()))

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids, attention_mask, labels, raw, images)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    torch.cuda.reset_peak_memory_stats()
    ms = measure(benchmark, step, warmup=2, reps=5)
    benchmark.extra_info["padded_tokens"] = input_ids.numel()
    report(benchmark, "official", ms, samples, base, torch.cuda.max_memory_allocated())
