"""MasterWeightAdamW and its fused op: low-precision parameters with fp32 masters follow AdamW
computed in float64 on the same gradients (both implementations, CPU and CUDA; the op over many
tensors, odd sizes, unaligned and non-contiguous ones); the parameters are always their masters
rounded; the state survives a state dict exactly; bad arguments raise; the one-GPU path of
vpit-train picks it."""

import pytest
import torch
from torch import nn

from conftest import DEVICES, poison, rel_error
from vpit_fast.ops.master_adamw import master_adamw_
from vpit_fast.train.master_adamw import MasterWeightAdamW
from vpit_fast.train.optim import build_optimizer

SHAPES = [(1,), (7,), (37, 19), (3, 5, 11), (0, 4)]


def adamw_float64(params, grads_per_step, lr, betas, eps, weight_decay):
    """The AdamW update (decoupled decay, bias correction) in float64, written out."""
    beta1, beta2 = betas
    params = [p.double().clone() for p in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            g = g.double()
            params[i] *= 1 - lr * weight_decay
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            m_hat, v_hat = m[i] / (1 - beta1 ** t), v[i] / (1 - beta2 ** t)
            params[i] -= lr * m_hat / (v_hat.sqrt() + eps)
    return params


@pytest.mark.parametrize("impl", ["torch", "vpit"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_float64_adamw(device, dtype, impl):
    params = [nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in SHAPES]
    start = [p.detach().clone() for p in params]
    lr, betas, eps, wd = 3e-3, (0.9, 0.95), 1e-8, 0.1
    optimizer = MasterWeightAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd, impl=impl)
    steps = [[torch.randn(s, device=device).to(dtype) for s in SHAPES] for _ in range(6)]
    for grads in steps:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
    expected = adamw_float64(start, steps, lr, betas, eps, wd)
    for p, ref in zip(params, expected):
        master = optimizer.master_of(p)
        assert master.dtype == torch.float32
        assert rel_error(master, ref) < 1e-5, rel_error(master, ref)
        assert torch.equal(p.detach(), master.to(dtype))  # the parameter is its master, rounded


def test_small_updates_accumulate_in_the_master():
    """Updates below bf16's rounding of the weight vanish when bf16 weights are updated in place;
    the master keeps them, and the weight moves once they add up."""
    p = nn.Parameter(torch.full((64,), 1.0, dtype=torch.bfloat16))
    optimizer = MasterWeightAdamW([p], lr=1e-4)  # each step moves ~1e-4, bf16's spacing at 1 is 7.8e-3
    for _ in range(100):
        p.grad = torch.ones_like(p)
        optimizer.step()
    master = optimizer.master_of(p)
    assert torch.allclose(master, torch.full_like(master, 1.0 - 100 * 1e-4), atol=1e-5)
    assert (p.detach().float() < 1.0).all()


def test_parameters_without_gradients_are_left_alone():
    a, b = nn.Parameter(torch.randn(5).bfloat16()), nn.Parameter(torch.randn(5).bfloat16())
    before = b.detach().clone()
    optimizer = MasterWeightAdamW([a, b], lr=1e-2)
    a.grad = torch.randn(5).bfloat16()
    optimizer.step()
    assert torch.equal(b.detach(), before) and optimizer.master_of(b) is None


def test_state_dict_round_trip_keeps_fp32_and_continues_identically():
    torch.manual_seed(0)
    shape = (13, 7)
    p1, p2 = (nn.Parameter(torch.randn(shape).bfloat16()) for _ in range(2))
    p2.data.copy_(p1.data)
    o1, o2 = MasterWeightAdamW([p1], lr=1e-2, weight_decay=0.1), MasterWeightAdamW([p2], lr=0.5)
    grads = [torch.randn(shape).bfloat16() for _ in range(5)]
    for g in grads[:2]:
        p1.grad = g.clone()
        o1.step()
    o2.load_state_dict(o1.state_dict())  # lr, decay and state all come from the saved dict
    p2.data.copy_(p1.data)
    state = o2.state[p2]
    assert {k: v.dtype for k, v in state.items()} == {k: torch.float32 for k in ("step", "master", "exp_avg", "exp_avg_sq")}
    assert torch.equal(state["master"], o1.master_of(p1))
    for g in grads[2:]:
        p1.grad, p2.grad = g.clone(), g.clone()
        o1.step()
        o2.step()
    assert torch.equal(p1.detach(), p2.detach()) and torch.equal(o1.master_of(p1), o2.master_of(p2))


def test_bad_parameters_raise():
    with pytest.raises(TypeError, match="bfloat16, float16 or float32"):
        MasterWeightAdamW([nn.Parameter(torch.randn(3, dtype=torch.float64))])


def test_build_optimizer_picks_it_for_low_precision_models():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8)).to(torch.bfloat16)
    optimizer = build_optimizer(model, 1e-3, weight_decay=0.1)
    assert isinstance(optimizer, MasterWeightAdamW)
    assert optimizer.implementation.startswith("vpit_fast.MasterWeightAdamW")
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]  # norms and biases: none
    assert not isinstance(build_optimizer(nn.Linear(4, 8), 1e-3), MasterWeightAdamW)


# ---------------------------------------------------------------------------------------------
# The fused op on its own
# ---------------------------------------------------------------------------------------------

# 60 tensors (more than the 48 one CUDA launch takes), sizes that leave pack tails, and empties.
OP_SIZES = [4099, 1, 0, 3, 8, 1000, 17, 262144 + 5] + [i * 7 + 1 for i in range(52)]


def _op_inputs(sizes, dtype, device, step=0):
    """(params, grads, masters, exp_avgs, exp_avg_sqs, steps) with random fp32 state at step."""
    masters = [torch.randn(n, device=device) for n in sizes]
    params = [m.to(dtype, copy=True) for m in masters]
    grads = [torch.randn(n, device=device).to(dtype) for n in sizes]
    exp_avgs = [torch.randn(n, device=device) * 0.1 for n in sizes]
    exp_avg_sqs = [torch.rand(n, device=device) * 0.01 for n in sizes]
    steps = [torch.full((), float(step), device=device) for _ in sizes]
    return params, grads, masters, exp_avgs, exp_avg_sqs, steps


def _expected(grad, master, m, v, step, lr, beta1, beta2, eps, wd):
    """One AdamW step in float64 from the given state (step already advanced)."""
    g, master, m, v = grad.double(), master.double(), m.double(), v.double()
    master = master * (1 - lr * wd)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    master = master - lr / (1 - beta1 ** step) * m / (v.sqrt() / (1 - beta2 ** step) ** 0.5 + eps)
    return master, m, v


def _scale(*values):
    """The largest magnitude among tensors and numbers (0 for empty tensors)."""
    return max((float(v.abs().max()) if v.numel() else 0.0) if torch.is_tensor(v) else abs(v) for v in values)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("device", DEVICES)
def test_op_matches_float64_over_many_tensors(device, dtype):
    inputs = _op_inputs(OP_SIZES, dtype, device, step=4)
    params, grads, masters, exp_avgs, exp_avg_sqs, steps = inputs
    before = [[t.clone() for t in group] for group in (grads, masters, exp_avgs, exp_avg_sqs)]
    hyper = dict(lr=2e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    for p in params:
        p.fill_(float("nan"))  # every parameter element must be written
    poison(device)
    master_adamw_(*inputs, **hyper)
    for i in range(len(OP_SIZES)):
        assert steps[i].item() == 5.0
        master, m, v = _expected(before[0][i], before[1][i], before[2][i], before[3][i], 5, **dict(
            lr=hyper["lr"], beta1=hyper["beta1"], beta2=hyper["beta2"], eps=hyper["eps"], wd=hyper["weight_decay"]))
        # Errors relative to the operands' scale: a one-element moment that cancels to nearly zero
        # (0.9 m + 0.1 g) is exact to fp32 rounding of its terms, not of its tiny result.
        g0, master0, m0, v0 = (t[i] for t in before)
        scales = (_scale(master0, hyper["lr"]), _scale(m0, (1 - hyper["beta1"]) * _scale(g0)),
                  _scale(v0, (1 - hyper["beta2"]) * _scale(g0) ** 2))
        for got, want, scale in zip((masters[i], exp_avgs[i], exp_avg_sqs[i]), (master, m, v), scales):
            error = rel_error(got, want, floor=scale)
            assert error < 1e-6, (i, OP_SIZES[i], error)
        assert torch.equal(params[i], masters[i].to(dtype)), i


@pytest.mark.parametrize("layout", ["unaligned", "transposed"])
@pytest.mark.parametrize("device", DEVICES)
def test_op_takes_unaligned_and_non_contiguous_tensors(device, layout):
    n = 4 * 257
    if layout == "unaligned":  # views one element into their storage: no 8- or 16-byte packs
        base = [torch.randn(n + 1, device=device).bfloat16() for _ in range(2)]
        param, grad = base[0][1:], base[1][1:]
        masters = [torch.randn(n + 1, device=device)[1:] for _ in range(3)]
    else:  # the parameter and its gradient transposed
        param = torch.randn(257, 4, device=device).bfloat16().t()
        grad = torch.randn(257, 4, device=device).bfloat16().t()
        masters = [torch.randn(n, device=device) for _ in range(3)]
    master, exp_avg, exp_avg_sq = masters[0], masters[1] * 0.1, masters[2].abs() * 0.01
    param.copy_(master.view(param.shape))  # a master holds its parameter's elements in row-major order
    start = [t.clone() for t in (grad, master, exp_avg, exp_avg_sq)]
    step = torch.zeros((), device=device)
    master_adamw_([param], [grad], [master], [exp_avg], [exp_avg_sq], [step], lr=1e-2, beta1=0.9, beta2=0.99,
                  eps=1e-8, weight_decay=0.0)
    want, _, _ = _expected(start[0].reshape(-1), start[1], start[2], start[3], 1, 1e-2, 0.9, 0.99, 1e-8, 0.0)
    assert rel_error(master, want) < 1e-6
    assert torch.equal(param, master.view(param.shape).bfloat16())


def test_op_bad_arguments_raise():
    p, g, m, a, v, s = _op_inputs([5], torch.bfloat16, "cpu")
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)
    with pytest.raises(ValueError, match="one length"):
        master_adamw_(p, g, m, a, v, s + s, **hyper)
    with pytest.raises(RuntimeError, match=r"grads\[0\] must match params\[0\]"):
        master_adamw_(p, [g[0].float()], m, a, v, s, **hyper)
    with pytest.raises(RuntimeError, match=r"masters\[0\] must be a contiguous float32"):
        master_adamw_(p, g, [m[0].double()], a, v, s, **hyper)
    with pytest.raises(RuntimeError, match=r"exp_avg_sqs\[0\] must be a contiguous float32 tensor of 5"):
        master_adamw_(p, g, m, a, [torch.zeros(6)], s, **hyper)
    with pytest.raises(RuntimeError, match=r"steps\[0\] must be a one-element float32"):
        master_adamw_(p, g, m, a, v, [torch.zeros(2)], **hyper)
    with pytest.raises(RuntimeError, match=r"params\[0\] must be float32, bfloat16 or float16"):
        master_adamw_([p[0].double()], [g[0].double()], m, a, v, s, **hyper)
    with pytest.raises(TypeError, match="params must be a list of tensors"):
        master_adamw_(p[0], g, m, a, v, s, **hyper)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_op_mixed_devices_raise():
    p, g, m, a, v, s = _op_inputs([5, 5], torch.bfloat16, "cuda")
    p[1] = p[1].cpu()
    with pytest.raises(RuntimeError, match="every tensor must be on one device"):
        master_adamw_(p, g, m, a, v, s, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0)


def test_implementations_agree_step_for_step():
    torch.manual_seed(1)
    shapes = [(33, 9), (128,), (5, 5, 5)]
    a = [nn.Parameter(torch.randn(s).bfloat16()) for s in shapes]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    oa = MasterWeightAdamW(a, lr=1e-2, weight_decay=0.05, impl="torch")
    ob = MasterWeightAdamW(b, lr=1e-2, weight_decay=0.05, impl="vpit")
    for _ in range(4):
        for pa, pb in zip(a, b):
            pa.grad = torch.randn_like(pa)
            pb.grad = pa.grad.clone()
        oa.step()
        ob.step()
    for pa, pb in zip(a, b):
        assert rel_error(ob.master_of(pb), oa.master_of(pa)) < 1e-6
        assert oa.state[pa]["step"].item() == ob.state[pb]["step"].item() == 4


def test_unknown_impl_raises():
    with pytest.raises(ValueError, match="impl must be one of"):
        MasterWeightAdamW([nn.Parameter(torch.randn(3).bfloat16())], impl="fast")


@pytest.mark.parametrize("device", DEVICES)
def test_auto_picks_the_fused_op_where_it_is_built(device):
    from vpit_fast import _extension

    built = _extension._C is not None and (device == "cpu" or _extension.build_info()["cuda"])
    optimizer = MasterWeightAdamW([nn.Parameter(torch.randn(4, device=device).bfloat16())])
    assert optimizer.impl == ("vpit" if built else "torch")
