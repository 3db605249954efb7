"""MasterWeightAdamW: low-precision parameters with fp32 masters follow AdamW computed in float64
on the same gradients; the parameters are always their masters rounded; the state survives a
state dict exactly; bad parameters raise; the one-GPU path of vpit-train picks it."""

import pytest
import torch
from torch import nn

from conftest import DEVICES, rel_error
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


@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("device", DEVICES)
def test_matches_float64_adamw(device, dtype, fused):
    params = [nn.Parameter(torch.randn(s, device=device).to(dtype)) for s in SHAPES]
    start = [p.detach().clone() for p in params]
    lr, betas, eps, wd = 3e-3, (0.9, 0.95), 1e-8, 0.1
    optimizer = MasterWeightAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=wd, fused=fused)
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
