"""`vpit_fast.ops.rms_norm`: the one-pass RMSNorm backward (CPU and CUDA) against float64, and
`add_rms_norm`'s autograd against transformers' LLaMA norm after a residual add."""

import pytest
import torch

from conftest import DEVICES, poison, rel_error, requires_cuda
from vpit_fast import _extension

pytestmark = pytest.mark.skipif(_extension._C is None, reason="needs the compiled extension")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float64: 1e-5}
# rows x cols: empty, one row, odd widths (the kernel's unvectorised path), LLaMA-1B's width,
# more rows than the kernel has warps in flight, and a width past the kernel (ATen fallback)
SHAPES = [(0, 64), (1, 8), (7, 100), (3, 5, 33), (33, 256), (130, 2048), (2000, 128), (5, 9000)]


def _reference(dy, dh, h, rstd, w):
    """float64: dx = r (g - h r^2 sum(g h) / C) + dh with g = dy w; dw = sum over rows of dy h r."""
    dy, h, w, r = dy.double(), h.double(), w.double(), rstd.double()
    g = dy * w
    dx = r * (g - h * r * r * (g * h).sum(-1, keepdim=True) / h.shape[-1])
    if dh is not None:
        dx = dx + dh.double()
    return dx, (dy * h * r).reshape(-1, h.shape[-1]).sum(0)


def _inputs(shape, dtype, device, direct):
    h = torch.randn(shape, device=device).to(dtype)
    rstd = torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    dy = torch.randn(shape, device=device).to(dtype)
    dh = torch.randn(shape, device=device).to(dtype) if direct else None
    w = (1 + 0.1 * torch.randn(shape[-1], device=device)).to(dtype)
    return dy, dh, h, rstd, w


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("direct", [True, False], ids=["residual", "alone"])
def test_backward_matches_float64(device, dtype, shape, direct):
    from vpit_fast.ops.rms_norm import rms_norm_backward

    dy, dh, h, rstd, w = _inputs(shape, dtype, device, direct)
    poison(device)
    dx, dw = rms_norm_backward(dy, dh, h, rstd, w)
    dx_ref, dw_ref = _reference(dy, dh, h, rstd, w)
    assert dx.shape == h.shape and dx.dtype == dtype and dw.shape == w.shape and dw.dtype == dtype
    assert rel_error(dx, dx_ref) <= TOL[dtype], rel_error(dx, dx_ref)
    assert rel_error(dw, dw_ref) <= TOL[dtype], rel_error(dw, dw_ref)
    if h.numel() == 0:
        assert torch.equal(dw, torch.zeros_like(dw))


@requires_cuda
def test_cuda_backward_is_deterministic_and_matches_cpu():
    from vpit_fast.ops.rms_norm import rms_norm_backward

    dy, dh, h, rstd, w = _inputs((3001, 2048), torch.bfloat16, "cuda", True)
    first = rms_norm_backward(dy, dh, h, rstd, w)
    poison("cuda")
    second = rms_norm_backward(dy, dh, h, rstd, w)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    cpu = rms_norm_backward(*(t.cpu() for t in (dy, dh, h, rstd, w)))
    for a, b in zip(first, cpu):
        assert rel_error(a, b) <= 1e-2


@requires_cuda
def test_cuda_backward_reads_strided_inputs():
    from vpit_fast.ops.rms_norm import rms_norm_backward

    dy, dh, h, rstd, w = _inputs((64, 512), torch.bfloat16, "cuda", True)
    dx, dw = rms_norm_backward(dy.t().contiguous().t(), dh, h, rstd, w)
    dx_ref, dw_ref = _reference(dy, dh, h, rstd, w)
    assert rel_error(dx, dx_ref) <= 1e-2 and rel_error(dw, dw_ref) <= 1e-2


def _hf_norm(hidden, weight, eps):
    """transformers' LlamaRMSNorm, the module itself."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(hidden.shape[-1], eps=eps).to(device=hidden.device, dtype=weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm, norm(hidden)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_add_rms_norm_equals_add_then_transformers_norm(device, dtype):
    """Forward equal to ``norm(x + delta)`` (bitwise on the CPU); gradients of x, delta and the weight within
    the dtype's tolerance of autograd through transformers' module, the residual path included."""
    from vpit_fast.ops.rms_norm import add_rms_norm

    shape, eps = (3, 37, 96), 1e-6
    x, delta = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    weight = (1 + 0.1 * torch.randn(shape[-1], device=device)).to(dtype).requires_grad_()
    up_h, up_y = torch.randn(shape, device=device, dtype=dtype), torch.randn(shape, device=device, dtype=dtype)

    h, y = add_rms_norm(x, delta, weight, eps)
    (h * up_h).sum().add((y * up_y).sum()).backward()
    ours = [x.grad, delta.grad, weight.grad]
    for t in (x, delta, weight):
        t.grad = None
    h_ref = x + delta
    norm, y_ref = _hf_norm(h_ref, weight.detach(), eps)
    (h_ref * up_h).sum().add((y_ref * up_y).sum()).backward()
    assert torch.equal(h, h_ref)
    if device == "cpu":
        assert torch.equal(y, y_ref)
    else:  # eager CUDA calls run the forward compiled into one kernel: its own summation order
        assert rel_error(y, y_ref) <= TOL[dtype], rel_error(y, y_ref)
    tol = {torch.float64: 1e-6}.get(dtype, TOL[dtype])
    for got, want in zip(ours, [x.grad, delta.grad, norm.weight.grad]):
        assert rel_error(got, want) <= tol, rel_error(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_add_rms_norm_compiles_in_one_graph(device):
    from vpit_fast.ops.rms_norm import add_rms_norm

    def block(x, delta, weight):
        h, y = add_rms_norm(x, delta, weight, 1e-5)
        return (h.float().square().mean() + y.float().sin().sum())

    x, delta = (torch.randn(45, 64, device=device, requires_grad=True) for _ in range(2))
    weight = torch.randn(64, device=device, requires_grad=True)
    eager = torch.autograd.grad(block(x, delta, weight), (x, delta, weight))
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    got = torch.autograd.grad(compiled(x, delta, weight), (x, delta, weight))
    for a, b in zip(got, eager):
        assert rel_error(a, b) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    dy, dh, h, rstd, w = _inputs((9, 40), torch.float32, device, True)
    torch.library.opcheck(torch.ops.vpit_fast.rms_norm_backward.default, (dy, dh, h, rstd, w))
    torch.library.opcheck(torch.ops.vpit_fast.rms_norm_backward.default, (dy, None, h, rstd, w))


def test_bad_inputs_raise_clear_errors():
    from vpit_fast.ops.rms_norm import add_rms_norm, rms_norm_backward

    dy, dh, h, rstd, w = _inputs((4, 16), torch.float32, "cpu", True)
    with pytest.raises(RuntimeError, match="rms_norm_backward: grad_out must match h"):
        rms_norm_backward(dy[:, :8], dh, h, rstd, w)
    with pytest.raises(RuntimeError, match="grad_direct must match h"):
        rms_norm_backward(dy, dh.double(), h, rstd, w)
    with pytest.raises(RuntimeError, match=r"weight must be \[16\]"):
        rms_norm_backward(dy, dh, h, rstd, w[:8])
    with pytest.raises(RuntimeError, match="rstd must hold one float32 per row"):
        rms_norm_backward(dy, dh, h, rstd[:2], w)
    with pytest.raises(RuntimeError, match="rstd must hold one float32 per row"):
        rms_norm_backward(dy, dh, h, rstd.double(), w)
    with pytest.raises(ValueError, match="x and delta must match"):
        add_rms_norm(h, h[:2], w, 1e-5)
    with pytest.raises(ValueError, match=r"weight must be \[16\]"):
        add_rms_norm(h, h, w[:3], 1e-5)
