"""vpit_fast.head_loss and vpit_fast.VPiTHeads against the float64 reference, on CPU and (when
present) CUDA.

The accuracy rule is apple/ml-cross-entropy's: against float64, our error may not exceed the error
of plain PyTorch run in the same dtype by more than SLACK[dtype]. VPIT_HEAD_LOSS_IMPL=torch runs
every call through the reference instead of the compiled op (for checking the tests themselves)."""

import copy
import os

import pytest
import torch
import torch.nn as nn

import vpit_fast
from vpit_fast.ops import reference
from vpit_fast.ops.types import HeadLoss

from conftest import DEVICES, SLACK, poison, rel_error, requires_cuda

IMPL = os.environ.get("VPIT_HEAD_LOSS_IMPL", "auto")
# VPIT_TEST_FLOAT64_ON_CPU=1 computes the float64 reference on the CPU: under compute-sanitizer
# its float64 GEMMs on the GPU would be checked too, and take most of the run.
FLOAT64_DEVICE = "cpu" if os.environ.get("VPIT_TEST_FLOAT64_ON_CPU") == "1" else None
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IGNORE = -100
# The backward pass is driven by loss * GRAD_SCALE so a dropped upstream gradient shows up.
GRAD_SCALE = 0.75

# (N, H, V, Dv, text rows, visual rows); the rest of the N rows are prompt rows (label ignored).
# Together they cover N in {1, 7, 1000, 4099}, H in {64, 1000}, V in {1003, 32002} and
# Dv in {16, 1152}, each at a cost the 2-core CPU run affords.
SHAPES = {
    "n1-text": (1, 64, 1003, 16, 1, 0),
    "n1-visual": (1, 1000, 1003, 1152, 0, 1),
    "n7": (7, 1000, 1003, 1152, 3, 2),
    "n1000-v32002": (1000, 64, 32002, 16, 450, 150),
    "n1000-h1000": (1000, 1000, 1003, 1152, 450, 150),
    "n4099": (4099, 64, 1003, 16, 1850, 620),
}
# Larger sizes: tens of seconds each of float64 GEMMs on two CPU cores, so CUDA only.
LARGE_SHAPES = {
    "n4099-h1000-v32002": (4099, 1000, 32002, 1152, 1860, 621),
    "n1000-h1000-v32002": (1000, 1000, 32002, 16, 450, 150),
}


def head_loss(*args, **kwargs):
    """The op under test (the compiled one unless VPIT_HEAD_LOSS_IMPL says otherwise)."""
    return vpit_fast.head_loss(*args, impl=IMPL, **kwargs)


def chunk_bytes(vocab):
    """A logits budget of a few rows, so every text test runs several chunks."""
    return max(64 << 10, 8 * 4 * vocab)


def make_head(kind, hidden_size, visual_dim):
    if kind == "linear":
        return nn.Linear(hidden_size, visual_dim)
    return nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, visual_dim))


class Case:
    """One set of float32 master inputs; `args(dtype, device)` makes a fresh copy to run on."""

    def __init__(self, n, h, v, dv, n_text, n_visual, head="linear", logit_scale=2.0, logit_offset=0.0,
                 ignore_index=IGNORE):
        assert n_text + n_visual <= n
        self.vocab = v
        self.hidden = torch.randn(n, h)
        # Logits of standard deviation ~logit_scale: a softmax that is neither flat nor one-hot.
        self.lm_weight = torch.randn(v, h) * (logit_scale / h**0.5)
        if logit_offset:  # the same constant added to every logit, through feature 0
            self.hidden[:, 0] = 1.0
            self.lm_weight[:, 0] = logit_offset
        perm = torch.randperm(n)
        self.text_rows = perm[:n_text].sort().values
        self.visual_rows = perm[n_text:n_text + n_visual]  # unsorted on purpose
        self.prompt_rows = perm[n_text + n_visual:]
        self.labels = torch.full((n,), ignore_index, dtype=torch.int64)
        self.labels[self.text_rows] = torch.randint(0, v, (n_text,))
        if n_text >= 2:  # the vocabulary's ends: the first and the last (unaligned) class
            self.labels[self.text_rows[0]], self.labels[self.text_rows[1]] = 0, v - 1
        self.visual_targets = torch.randn(n_visual, dv)
        self.head = make_head(head, h, dv)

    def args(self, dtype, device, grad=True):
        hidden = self.hidden.to(device, dtype, copy=True).requires_grad_(grad)
        lm_weight = self.lm_weight.to(device, dtype, copy=True).requires_grad_(grad)
        head = copy.deepcopy(self.head).to(device, dtype)
        return (hidden, lm_weight, self.labels.to(device), self.visual_rows.to(device),
                self.visual_targets.to(device, dtype), head)


def run(fn, case, dtype, device, freeze_lm_head=False, **kwargs):
    """Forward and backward of fn; returns its HeadLoss and {name: gradient}."""
    args = case.args(dtype, device)
    hidden, lm_weight, head = args[0], args[1], args[5]
    lm_weight.requires_grad_(not freeze_lm_head)
    out = fn(*args, **kwargs)
    (out.loss * GRAD_SCALE).backward()
    grads = {"hidden": hidden.grad}
    if freeze_lm_head:
        assert lm_weight.grad is None
    else:
        grads["lm_weight"] = lm_weight.grad
    grads.update({f"vision_head.{name}": p.grad for name, p in head.named_parameters()})
    return out, grads


def check_structure(out, grads, case, dtype, device):
    assert isinstance(out, HeadLoss)
    for field in ("loss", "text_loss", "visual_loss"):
        value = getattr(out, field)
        assert value.shape == () and value.dtype == torch.float32, field
        assert value.device.type == torch.device(device).type, field
        assert torch.isfinite(value), field
    assert out.loss.requires_grad
    assert not out.text_loss.requires_grad and not out.visual_loss.requires_grad
    for field, expected in (("text_count", case.text_rows.numel()), ("visual_count", case.visual_rows.numel())):
        count = getattr(out, field)
        assert count.shape == () and count.dtype == torch.int64, field
        assert count.device.type == torch.device(device).type, field
        assert count.item() == expected, field
    for name, grad in grads.items():
        assert grad is not None, f"no gradient for {name}"
        assert grad.dtype == dtype and grad.device.type == torch.device(device).type, name
    # Prompt rows feed no head: their gradient is exactly zero, not leftover memory.
    if case.prompt_rows.numel():
        prompt_grad = grads["hidden"][case.prompt_rows.to(device)]
        assert torch.equal(prompt_grad, torch.zeros_like(prompt_grad)), "prompt rows got a gradient"


FEW_ROWS_TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def check_against_float64(case, dtype, device, max_chunk_bytes="small", freeze_lm_head=False, fp32_tol=2e-5,
                          **kwargs):
    """Our op and plain PyTorch in dtype, both against the float64 reference."""
    if max_chunk_bytes == "small":
        max_chunk_bytes = chunk_bytes(case.vocab)
    kwargs["freeze_lm_head"] = freeze_lm_head
    ref, ref_grads = run(reference.head_loss, case, torch.float64, FLOAT64_DEVICE or device, **kwargs)
    if FLOAT64_DEVICE:
        ref = HeadLoss(*(t.to(device) for t in ref))
        ref_grads = {name: g.to(device) for name, g in ref_grads.items()}
    plain, plain_grads = run(reference.head_loss, case, dtype, device, **kwargs)
    poison(device)
    ours, grads = run(head_loss, case, dtype, device, max_chunk_bytes=max_chunk_bytes, **kwargs)
    check_structure(ours, grads, case, dtype, device)

    slack = SLACK[dtype]
    # With under 16 target rows, plain PyTorch's error is one noisy draw of a few roundings, so
    # "no worse than it" also takes the dtype's own tolerance (bf16 ~1e-2 relative).
    few_rows = case.text_rows.numel() + case.visual_rows.numel() < 16
    floor = FEW_ROWS_TOL[dtype] if few_rows else 0.0
    errors = {}
    for field in ("loss", "text_loss", "visual_loss"):
        errors[field] = (rel_error(getattr(ours, field), getattr(ref, field)),
                         rel_error(getattr(plain, field), getattr(ref, field)))
    for name in grads:
        errors[f"grad {name}"] = (rel_error(grads[name], ref_grads[name]),
                                  rel_error(plain_grads[name], ref_grads[name]))
    for name, (err, err_plain) in errors.items():
        assert err <= max(err_plain + slack, floor), f"{name}: error {err:.3e} vs plain PyTorch {err_plain:.3e}"
        if dtype == torch.float32:
            assert err < fp32_tol, f"{name}: float32 error {err:.3e}"
    # One bf16 row's cosine is off by up to ~2^-9 however it is computed; averages of many rows
    # are held to 1e-3.
    if dtype == torch.bfloat16 and case.text_rows.numel() + case.visual_rows.numel() >= 16:
        assert errors["loss"][0] < 1e-3, f"bf16 loss error {errors['loss'][0]:.3e}"
    return ours, grads


# ---------------------------------------------------------------------------------------------
# Accuracy against float64
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head", ["linear", "mlp"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_float64(shape, head, dtype, device):
    check_against_float64(Case(*shape, head=head), dtype, device)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head", ["linear", "mlp"])
@pytest.mark.parametrize("shape", LARGE_SHAPES.values(), ids=LARGE_SHAPES.keys())
def test_matches_float64_large(shape, head, dtype):
    check_against_float64(Case(*shape, head=head), dtype, "cuda")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "text_weight,visual_weight", [(1.0, 1.0), (0.3, 2.5), (0.0, 1.0), (1.0, 0.0)],
    ids=["w1-1", "w0.3-2.5", "text-off", "visual-off"],
)
def test_reduction_and_weights(text_weight, visual_weight, reduction, dtype, device):
    case = Case(257, 64, 1003, 16, 100, 40)
    ours, grads = check_against_float64(case, dtype, device, text_weight=text_weight,
                                        visual_weight=visual_weight, reduction=reduction)
    torch.testing.assert_close(ours.loss.detach(), text_weight * ours.text_loss + visual_weight * ours.visual_loss)
    if text_weight == 0.0:
        assert not grads["lm_weight"].any()
    if visual_weight == 0.0:
        assert all(not g.any() for name, g in grads.items() if name.startswith("vision_head"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("rows", [(23, 0), (0, 17), (1, 0), (0, 1)],
                         ids=["text-only", "visual-only", "one-text", "one-visual"])
def test_one_modality(rows, reduction, dtype, device):
    n_text, n_visual = rows
    case = Case(41, 64, 1003, 16, n_text, n_visual, head="mlp")
    ours, grads = check_against_float64(case, dtype, device, reduction=reduction)
    if n_text == 0:
        assert ours.text_loss.item() == 0.0 and not grads["lm_weight"].any()
    if n_visual == 0:
        assert ours.visual_loss.item() == 0.0
        assert all(not g.any() for name, g in grads.items() if name.startswith("vision_head"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_no_targets_is_zero_not_nan(head, reduction, dtype, device):
    case = Case(13, 64, 1003, 16, 0, 0, head=head)
    poison(device)
    ours, grads = run(head_loss, case, dtype, device, reduction=reduction)
    check_structure(ours, grads, case, dtype, device)
    for field in ("loss", "text_loss", "visual_loss"):
        assert getattr(ours, field).item() == 0.0, field
    for name, grad in grads.items():
        assert torch.equal(grad, torch.zeros_like(grad)), f"{name} gradient is not zero"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_rows_targets(dtype, device):
    # No prompt rows at all: every row is a text or a visual target.
    check_against_float64(Case(300, 64, 1003, 16, 200, 100), dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ignore_index", [-1, 5000])
def test_other_ignore_index(ignore_index, device):
    # A positive ignore_index outside [0, V) marks ignored rows as well; -100 would now be a bad label.
    case = Case(200, 64, 1003, 16, 90, 30, ignore_index=ignore_index)
    check_against_float64(case, torch.float32, device, ignore_index=ignore_index)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale,offset", [(2.0, 150.0), (2.0, -150.0), (40.0, 0.0)],
                         ids=["plus150", "minus150", "peaked"])
def test_large_logits_are_stable(scale, offset, device):
    # exp(+-150) over- or underflows float32, so the log-sum-exp must subtract the row maximum;
    # a standard deviation of 40 makes the softmax nearly one-hot. Float32 only: bf16 rounds a
    # logit of 150 by up to 0.5, which swamps what the test measures. Float32 itself rounds such a
    # logit by ~1e-5, hence the looser absolute bound.
    case = Case(120, 64, 1003, 16, 60, 20, logit_scale=scale, logit_offset=offset)
    check_against_float64(case, torch.float32, device, fp32_tol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_visual_target(dtype, device):
    # A zero target has cosine 0 (loss 1) and gives its row no gradient, as in PyTorch.
    case = Case(50, 64, 1003, 16, 20, 10)
    case.visual_targets[3] = 0
    check_against_float64(case, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_chunk_bytes", [None, 64 << 10, (64 << 10) + 100, 1 << 30],
                         ids=["default", "64KiB", "64KiB+100", "1GiB"])
def test_chunk_budgets(max_chunk_bytes, device):
    case = Case(1000, 64, 1003, 16, 450, 150)
    check_against_float64(case, torch.float32, device, max_chunk_bytes=max_chunk_bytes)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_frozen_lm_head(dtype, device):
    # A frozen LM head (lm_weight without requires_grad) still gives the other gradients.
    check_against_float64(Case(300, 64, 1003, 16, 120, 40), dtype, device, freeze_lm_head=True)


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_forward(device):
    # Evaluation: no graph, same losses.
    case = Case(300, 64, 1003, 16, 120, 40, head="mlp")
    args = case.args(torch.float32, device, grad=False)
    with torch.no_grad():
        ours = head_loss(*args, max_chunk_bytes=chunk_bytes(case.vocab))
        ref = reference.head_loss(*case.args(torch.float64, device, grad=False))
    assert not ours.loss.requires_grad
    for field in ("loss", "text_loss", "visual_loss"):
        assert rel_error(getattr(ours, field), getattr(ref, field)) < 2e-5, field


# ---------------------------------------------------------------------------------------------
# Determinism, the module, impl="torch", torch.compile
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_text_count_from_the_host_gives_the_same_loss(dtype, device):
    """A caller that counted the text rows on the host passes text_count: the op skips its checks
    and its device read, and computes exactly what it computes without."""
    case = Case(700, 64, 1003, 16, 310, 90, head="mlp")
    kwargs = {"max_chunk_bytes": chunk_bytes(case.vocab)}
    counted, counted_grads = run(head_loss, case, dtype, device, **kwargs)
    poison(device)
    given, given_grads = run(head_loss, case, dtype, device, text_count=case.text_rows.numel(), **kwargs)
    for field in HeadLoss._fields:
        assert torch.equal(getattr(given, field), getattr(counted, field)), field
    for name in counted_grads:
        assert torch.equal(given_grads[name], counted_grads[name]), name


def test_text_count_is_what_the_op_uses():
    """The count is trusted, not checked: one short of the truth drops the last text row (so a
    caller must pass the true count; `VPiTModel` counts on the host copy of the same labels)."""
    case = Case(200, 32, 301, 8, 50, 10)
    true = run(head_loss, case, torch.float32, "cpu")[0]
    short = run(head_loss, case, torch.float32, "cpu", text_count=49)[0]
    assert short.text_count.item() == 49 and short.text_loss.item() != true.text_loss.item()


def test_bad_text_count_raises():
    case = Case(20, 16, 50, 4, 5, 2)
    for bad in (-1, 21, 2.0, True):
        with pytest.raises(ValueError, match="text_count must be None or an int in"):
            head_loss(*case.args(torch.float32, "cpu"), text_count=bad)


@requires_cuda
def test_cuda_text_count_from_the_host_reads_nothing_back():
    """With text_count, forward and backward of the op never wait for the GPU (CUDA's sync debug
    mode raises on any device-to-host read)."""
    case = Case(700, 64, 1003, 16, 310, 90, head="mlp")
    args = case.args(torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = head_loss(*args, text_count=case.text_rows.numel())
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.text_count.item() == case.text_rows.numel() and args[0].grad is not None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_repeated_runs_are_bitwise_identical(head, dtype, device):
    case = Case(1000, 64, 1003, 16, 450, 150, head=head)
    first, first_grads = run(head_loss, case, dtype, device, max_chunk_bytes=chunk_bytes(case.vocab))
    poison(device)
    second, second_grads = run(head_loss, case, dtype, device, max_chunk_bytes=chunk_bytes(case.vocab))
    for field in HeadLoss._fields:
        assert torch.equal(getattr(first, field), getattr(second, field)), field
    for name in first_grads:
        assert torch.equal(first_grads[name], second_grads[name]), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vision_head", ["linear", "mlp"])
def test_vpit_heads_module(vision_head, device):
    heads = vpit_fast.VPiTHeads(64, 1003, 16, vision_head=vision_head).to(device)
    assert isinstance(heads.lm_head, nn.Linear) and heads.lm_head.bias is None
    assert heads.lm_head.weight.shape == (1003, 64)
    if vision_head == "linear":
        assert isinstance(heads.vision_head, nn.Linear) and heads.vision_head.bias is not None
        assert heads.vision_head.weight.shape == (16, 64)
    else:
        layers = list(heads.vision_head)
        assert [type(layer) for layer in layers] == [nn.Linear, nn.GELU, nn.Linear]
        assert layers[0].weight.shape == (64, 64) and layers[2].weight.shape == (16, 64)

    case = Case(100, 64, 1003, 16, 40, 20)
    hidden, _, labels, rows, targets, _ = case.args(torch.float32, device)
    out = heads(hidden, labels, rows, targets, impl=IMPL, text_weight=0.5, reduction="sum")
    expected = vpit_fast.head_loss(hidden, heads.lm_head.weight, labels, rows, targets, heads.vision_head,
                                   impl=IMPL, text_weight=0.5, reduction="sum")
    for field in HeadLoss._fields:
        assert torch.equal(getattr(out, field), getattr(expected, field)), field
    out.loss.backward()
    assert heads.lm_head.weight.grad is not None and hidden.grad is not None
    assert all(p.grad is not None for p in heads.vision_head.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_vpit_heads_wraps_existing_lm_head(device):
    lm_head = nn.Linear(64, 1003, bias=False).to(device)
    heads = vpit_fast.VPiTHeads(64, 1003, 16, lm_head=lm_head)
    assert heads.lm_head is lm_head
    assert heads.lm_head.weight is lm_head.weight  # the same Parameter: tied, not copied
    params = list(heads.parameters())
    assert sum(p is lm_head.weight for p in params) == 1
    case = Case(60, 64, 1003, 16, 30, 10)
    hidden, _, labels, rows, targets, _ = case.args(torch.float32, device)
    heads = heads.to(device)
    heads(hidden, labels, rows, targets, impl=IMPL).loss.backward()
    assert lm_head.weight.grad is not None and lm_head.weight.grad.any()


def test_impl_torch_is_the_reference():
    case = Case(200, 64, 1003, 16, 80, 30, head="mlp")
    args = case.args(torch.bfloat16, "cpu", grad=False)
    ours = vpit_fast.head_loss(*args, impl="torch", text_weight=0.3, reduction="sum")
    ref = reference.head_loss(*args, text_weight=0.3, reduction="sum")
    for field in HeadLoss._fields:
        assert torch.equal(getattr(ours, field), getattr(ref, field)), field


@pytest.mark.skipif(IMPL != "auto", reason="compiles the registered op only")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head", ["linear", "mlp"])
@pytest.mark.parametrize("text_count", [None, 80], ids=["counted", "given"])
def test_torch_compile_fullgraph(head, device, text_count):
    def loss_fn(hidden, lm_weight, labels, visual_rows, visual_targets, vision_head):
        out = vpit_fast.head_loss(hidden, lm_weight, labels, visual_rows, visual_targets, vision_head,
                                  text_weight=0.5, max_chunk_bytes=64 << 10, text_count=text_count)
        return out.loss * 2

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    case = Case(200, 64, 1003, 16, 80, 30, head=head)
    args = case.args(torch.float32, device)
    params = [args[0], args[1], *args[5].parameters()]
    eager_loss = loss_fn(*args)
    eager_grads = torch.autograd.grad(eager_loss, params)
    compiled_loss = compiled(*args)
    compiled_grads = torch.autograd.grad(compiled_loss, params)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

H, V, DV, N = 32, 50, 8, 10


def good_args(dtype=torch.float32):
    hidden = torch.randn(N, H, dtype=dtype)
    lm_weight = torch.randn(V, H, dtype=dtype)
    labels = torch.tensor([3, IGNORE, 7, IGNORE, IGNORE, 0, V - 1, IGNORE, IGNORE, 1])
    visual_rows = torch.tensor([1, 4, 8])
    visual_targets = torch.randn(3, DV, dtype=dtype)
    head = nn.Linear(H, DV).to(dtype)
    return dict(hidden=hidden, lm_weight=lm_weight, labels=labels, visual_rows=visual_rows,
                visual_targets=visual_targets, vision_head=head)


def both(*words):
    """A regex that matches a message containing every word, in any order."""
    return "(?s)" + "".join(f"(?=.*{word})" for word in words)


def labels_with(index, value):
    labels = good_args()["labels"].clone()
    labels[index] = value
    return labels


BAD_INPUTS = [
    ("label-equal-to-V", {"labels": labels_with(0, V)}, {}, ValueError, "labels"),
    ("label-above-V", {"labels": labels_with(2, V + 1000)}, {}, ValueError, "labels"),
    ("label-negative", {"labels": labels_with(0, -5)}, {}, ValueError, "labels"),
    ("label-is-ignore-of-other-index", {}, {"ignore_index": -1}, ValueError, "labels"),
    ("labels-wrong-length", {"labels": torch.full((N - 1,), IGNORE)}, {}, ValueError, "labels"),
    ("labels-2d", {"labels": torch.full((N, 1), IGNORE)}, {}, ValueError, "labels"),
    ("visual-row-out-of-range", {"visual_rows": torch.tensor([1, 4, N])}, {}, ValueError, "visual_rows"),
    ("visual-row-negative", {"visual_rows": torch.tensor([1, -1, 8])}, {}, ValueError, "visual_rows"),
    ("visual-row-duplicated", {"visual_rows": torch.tensor([1, 4, 1])}, {}, ValueError, "visual_rows"),
    ("row-text-and-visual", {"visual_rows": torch.tensor([1, 2, 8])}, {}, ValueError,
     both("visual_rows", "labels")),
    ("targets-count", {"visual_targets": torch.randn(2, DV)}, {}, ValueError, "visual_targets"),
    ("targets-dim", {"visual_targets": torch.randn(3, DV + 1)}, {}, ValueError, "visual_targets"),
    ("targets-1d", {"visual_targets": torch.randn(3 * DV)}, {}, ValueError, "visual_targets"),
    ("hidden-1d", {"hidden": torch.randn(N * H)}, {}, ValueError, "hidden"),
    ("hidden-3d", {"hidden": torch.randn(1, N, H)}, {}, ValueError, "hidden"),
    ("lm-weight-H", {"lm_weight": torch.randn(V, H + 1)}, {}, ValueError, "lm_weight"),
    ("lm-weight-1d", {"lm_weight": torch.randn(V * H)}, {}, ValueError, "lm_weight"),
    ("vision-head-in-features", {"vision_head": nn.Linear(H + 1, DV)}, {}, ValueError, "vision_head"),
    ("mlp-head-in-features", {"vision_head": nn.Sequential(nn.Linear(H + 1, H), nn.GELU(), nn.Linear(H, DV))},
     {}, ValueError, "vision_head"),
    ("lm-weight-dtype", {"lm_weight": torch.randn(V, H, dtype=torch.bfloat16)}, {}, TypeError, "lm_weight"),
    ("targets-dtype", {"visual_targets": torch.randn(3, DV, dtype=torch.float16)}, {}, TypeError,
     "visual_targets"),
    ("vision-head-dtype", {"vision_head": nn.Linear(H, DV).to(torch.bfloat16)}, {}, TypeError, "vision_head"),
    ("hidden-float64", good_args(torch.float64), {}, TypeError, "hidden"),
    ("reduction-none", {}, {"reduction": "none"}, ValueError, "reduction"),
    ("impl-unknown", {}, {"impl": "triton"}, ValueError, "impl"),
]


@pytest.mark.parametrize("replace,kwargs,error,match", [case[1:] for case in BAD_INPUTS],
                         ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_raises_clear_errors(replace, kwargs, error, match):
    args = good_args()
    args.update(replace)
    kwargs = {"impl": IMPL, **kwargs}
    with pytest.raises(error, match=match):
        vpit_fast.head_loss(*args.values(), **kwargs)


@requires_cuda
@pytest.mark.parametrize("name", ["lm_weight", "labels", "visual_rows", "visual_targets", "vision_head"])
def test_device_mismatch_names_the_argument(name):
    args = {key: value.cuda() for key, value in good_args().items()}
    args[name] = args[name].cpu()
    with pytest.raises(ValueError, match=name):
        vpit_fast.head_loss(*args.values(), impl=IMPL)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mlp", [False, True], ids=["linear", "mlp"])
def test_opcheck(device, mlp):
    n, h, v, dv = 9, 16, 37, 5
    hidden = torch.randn(n, h, device=device, requires_grad=True)
    lm_weight = torch.randn(v, h, device=device, requires_grad=True)
    labels = torch.tensor([3, -100, 7, -100, -100, 0, 36, -100, 5], device=device)
    visual_rows = torch.tensor([1, 4, 7], device=device)
    targets = torch.randn(3, dv, device=device)
    shapes = [(h, h), (h,), (dv, h), (dv,)] if mlp else [(dv, h), (dv,)]
    params = [torch.randn(*s, device=device, requires_grad=True) for s in shapes]
    for need_grads in (True, False):
        torch.library.opcheck(
            torch.ops.vpit_fast.head_loss.default,
            (hidden, lm_weight, labels, visual_rows, targets, params, 1.0, 0.5, -100, False, 4096, need_grads),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_text_only_without_vision_head(impl):
    hidden = torch.randn(9, 16, requires_grad=True)
    weight = torch.randn(37, 16, requires_grad=True)
    labels = torch.randint(0, 37, (9,))
    labels[::3] = -100
    out = vpit_fast.head_loss(hidden, weight, labels, torch.zeros(0, dtype=torch.int64), torch.zeros(0, 5), None,
                              impl=impl)
    expected = torch.nn.functional.cross_entropy(hidden.double() @ weight.double().t(), labels)
    assert abs(out.loss.item() - expected.item()) < 1e-5 * expected.abs().item()
    assert int(out.visual_count) == 0
    out.loss.backward()
    assert torch.isfinite(hidden.grad).all() and weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="vision_head is None"):
        vpit_fast.head_loss(hidden, weight, labels, torch.tensor([1]), torch.zeros(1, 5), None, impl=impl)


@pytest.mark.parametrize("impl", ["auto", "torch"])
def test_autocast_casts_operands_like_linear(impl):
    hidden = torch.randn(40, 64)
    weight = torch.randn(1000, 64, requires_grad=True)
    head = torch.nn.Linear(64, 8)
    labels = torch.randint(0, 1000, (40,))
    labels[:10] = -100
    rows, targets = torch.arange(10), torch.randn(10, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vpit_fast.head_loss(hidden, weight, labels, rows, targets, head, impl=impl)
    expected = vpit_fast.head_loss(hidden.bfloat16(), weight.bfloat16(), labels, rows, targets.bfloat16(),
                                   copy.deepcopy(head).bfloat16(), impl="torch")
    assert abs(out.loss.item() - expected.loss.item()) <= 1e-2 * abs(expected.loss.item())
    out.loss.backward()
    assert weight.grad.dtype == torch.float32 and head.weight.grad is not None


def test_second_backward_is_refused():
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    out = vpit_fast.head_loss(hidden, weight, torch.randint(0, 11, (6,)), torch.zeros(0, dtype=torch.int64),
                              torch.zeros(0, 3), None)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        out.loss.backward()
