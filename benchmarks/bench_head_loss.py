"""Forward + backward of the response-only heads and loss: vpit_fast.head_loss against the official
MetaMorph path, plain PyTorch with the rows selected first, Liger-Kernel and Cut Cross-Entropy
(DESIGN.md section 3(b)).

Each benchmark records in extra_info: the CUDA-event median (ms), the extra peak memory of one
step (MiB, gradients included, and beyond the gradients), the fraction of the FLOP floor it
reaches (the 3 text GEMMs, 2 * n_text * V * H flops each, at H100_BF16_FLOPS) and its time as a
multiple of ours. Run: pytest benchmarks/bench_head_loss.py --benchmark-only"""

import statistics

import pytest
import torch
import torch.nn as nn

from conftest import H100_BF16_FLOPS, cuda_event_times, measure, peak_extra_bytes, requires_cuda
from head_loss_peers import IGNORE_INDEX, PEERS, REQUIRES

# (H, V) of the language models MetaMorph is trained on; Dv 1152 is SigLIP-so400m's width.
MODELS = {
    "llama3-8b": (4096, 128258),
    "llama3.2-1b": (2048, 128258),
    "qwen2.5-7b": (3584, 152066),
}
VISUAL_DIM = 1152
# A MetaMorph-like batch: 16384 rows of which 7440 text targets and 2484 visual targets, at
# random positions; the rest are prompt rows.
N_ROWS, N_TEXT, N_VISUAL = 16384, 7440, 2484

_ours_ms = {}  # model -> our median, for the ratios of the peers measured after it


def make_inputs(n, n_text, n_visual, hidden_size, vocab, visual_dim, dtype, device, seed=0):
    """Fixed random inputs (the same for every implementation) with gradients on the hidden
    states, the LM head and the vision head; returns (args, leaves that receive gradients)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, hidden_size, generator=gen).to(device, dtype).requires_grad_()
    # Logits of standard deviation ~2, as in the tests.
    lm_weight = (torch.randn(vocab, hidden_size, generator=gen) * (2 / hidden_size**0.5)).to(device, dtype)
    lm_weight.requires_grad_()
    perm = torch.randperm(n, generator=gen)
    labels = torch.full((n,), IGNORE_INDEX, dtype=torch.int64)
    labels[perm[:n_text]] = torch.randint(0, vocab, (n_text,), generator=gen)
    visual_rows = perm[n_text:n_text + n_visual].clone()
    visual_targets = torch.randn(n_visual, visual_dim, generator=gen).to(device, dtype)
    torch.manual_seed(seed)
    vision_head = nn.Linear(hidden_size, visual_dim).to(device, dtype)
    args = (hidden, lm_weight, labels.to(device), visual_rows.to(device), visual_targets, vision_head)
    return args, [hidden, lm_weight, *vision_head.parameters()]


def training_step(fn, args, leaves):
    """One forward + backward that starts from no gradients, so every step allocates the same."""

    def step():
        for leaf in leaves:
            leaf.grad = None
        fn(*args).backward()

    return step


def peer_fn(impl):
    if impl in REQUIRES:
        pytest.importorskip(REQUIRES[impl])
    return PEERS[impl]


# ---------------------------------------------------------------------------------------------
# CPU smoke test (CI): tiny shapes, ours against plain PyTorch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["ours", "plain_selected"])
def test_cpu_smoke(benchmark, impl):
    args, leaves = make_inputs(512, 200, 80, 64, 1003, 16, torch.float32, "cpu")
    step = training_step(PEERS[impl], args, leaves)
    measure(benchmark, step, warmup=1, reps=3, impl=impl, rows=512, text_rows=200, visual_rows=80)
    assert all(leaf.grad is not None and torch.isfinite(leaf.grad).all() for leaf in leaves)


# ---------------------------------------------------------------------------------------------
# CUDA: LLM shapes, bf16, linear vision head
# ---------------------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("impl", list(PEERS))  # "ours" first: the others report a ratio to it
@pytest.mark.parametrize("model", list(MODELS))
def test_head_loss_cuda(benchmark, model, impl):
    fn = peer_fn(impl)
    hidden_size, vocab = MODELS[model]
    args, leaves = make_inputs(N_ROWS, N_TEXT, N_VISUAL, hidden_size, vocab, VISUAL_DIM, torch.bfloat16, "cuda")
    step = training_step(fn, args, leaves)

    step()  # compiles, autotunes and allocates once, outside the memory measurement
    for leaf in leaves:
        leaf.grad = None
    peak = peak_extra_bytes(step)
    grad_bytes = sum(leaf.grad.numel() * leaf.grad.element_size() for leaf in leaves)

    ms = measure(benchmark, step, warmup=3, reps=20, impl=impl, model=model, hidden_size=hidden_size,
                 vocab=vocab, visual_dim=VISUAL_DIM, rows=N_ROWS, text_rows=N_TEXT, visual_rows=N_VISUAL,
                 dtype="bfloat16")
    floor_ms = 3 * 2 * N_TEXT * vocab * hidden_size / H100_BF16_FLOPS * 1e3
    info = benchmark.extra_info
    info.update(
        ms=ms,
        extra_peak_mib=peak / 2**20,
        extra_peak_beyond_grads_mib=(peak - grad_bytes) / 2**20,
        flop_floor_ms=floor_ms,
        fraction_of_flop_floor=floor_ms / ms,
    )
    if impl == "ours":
        _ours_ms[model] = ms
    else:
        ours_ms = _ours_ms.get(model)
        if ours_ms is None:  # ours was deselected or ran in another process: time it here
            try:
                ours_step = training_step(PEERS["ours"], args, leaves)
                ours_ms = _ours_ms[model] = statistics.median(cuda_event_times(ours_step, warmup=3, reps=20))
            except (AttributeError, RuntimeError) as error:  # no compiled op in this build
                info["ratio_to_ours_missing"] = str(error)[:200]
        if ours_ms is not None:
            info["ratio_to_ours"] = ms / ours_ms
