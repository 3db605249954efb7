"""vpit_fast.interpolate_tokens against the float64 official path, on CPU and (when present) CUDA."""

import pytest
import torch

import vpit_fast
from vpit_fast.ops import reference

from conftest import DEVICES, HAS_CUDA, SLACK, poison, rel_error, requires_cuda

GRIDS = [  # (in_h, in_w), (out_h, out_w)
    ((27, 27), (8, 8)),     # SigLIP-so400m@384 -> 64 tokens (MetaMorph)
    ((24, 24), (8, 8)),     # 336-px encoders
    ((27, 27), (16, 16)),   # 256 tokens
    ((8, 8), (8, 8)),       # identity
    ((5, 7), (3, 4)),       # non-square, both axes shrink differently
    ((3, 3), (16, 16)),     # strong upsampling: the general backward path on CUDA
]
SHAPES = [(1, 1), (64, 3), (5, 64), (2, 1152), (3, 1153)]  # (batch, channels)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check_against_float64(x, out_size, in_size, normalize, device):
    """Forward and backward of our op and of plain PyTorch in x's dtype, both against float64."""
    x64 = x.double().requires_grad_()
    ref = reference.interpolate_tokens(x64, out_size, in_size, normalize)
    grad_out = torch.randn_like(ref)
    ref.backward(grad_out)

    poison(device)
    xd = x.to(device, copy=True).requires_grad_()
    ours = vpit_fast.interpolate_tokens(xd, out_size, in_size, normalize)
    assert ours.shape == ref.shape and ours.dtype == x.dtype and ours.device.type == torch.device(device).type
    ours.backward(grad_out.to(device, x.dtype))

    xt = x.clone().requires_grad_()
    plain = reference.interpolate_tokens(xt, out_size, in_size, normalize)
    plain.backward(grad_out.to(x.dtype))

    slack = SLACK[x.dtype]
    fwd, fwd_plain = rel_error(ours.cpu(), ref), rel_error(plain, ref)
    bwd, bwd_plain = rel_error(xd.grad.cpu(), x64.grad), rel_error(xt.grad, x64.grad)
    assert fwd <= fwd_plain + slack, f"forward error {fwd:.3e} vs plain PyTorch {fwd_plain:.3e}"
    assert bwd <= bwd_plain + slack, f"backward error {bwd:.3e} vs plain PyTorch {bwd_plain:.3e}"
    # The absolute fp32 bound holds where the problem is well conditioned. Normalising few
    # channels is not: a row whose norm is near zero magnifies fp32 rounding (seen: 1.1e-5 at
    # C = 3), and with one channel the gradient of sign(n) is zero up to cancellation residue.
    # There only the plain-PyTorch rule above applies.
    if x.dtype == torch.float32 and not (normalize and x.shape[2] < 64):
        assert fwd < 1e-5 and bwd < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalize"])
@pytest.mark.parametrize("batch,channels", SHAPES)
@pytest.mark.parametrize("in_size,out_size", GRIDS, ids=lambda g: "x".join(map(str, g)))
def test_matches_float64(in_size, out_size, batch, channels, normalize, dtype, device):
    x = torch.randn(batch, in_size[0] * in_size[1], channels).to(dtype)
    check_against_float64(x, out_size, in_size, normalize, device)


@pytest.mark.parametrize("device", DEVICES)
def test_default_is_metamorph_64_tokens(device):
    x = torch.randn(2, 729, 32, device=device)
    out = vpit_fast.interpolate_tokens(x)
    assert out.shape == (2, 64, 32)
    torch.testing.assert_close(out.cpu(), reference.interpolate_tokens(x.cpu(), (8, 8), (27, 27)))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input(device):
    base = torch.randn(4, 729, 2 * 48, device=device)
    x = base[::2, :, ::2]  # strided in batch and channels
    assert not x.is_contiguous()
    ours = vpit_fast.interpolate_tokens(x, normalize=True)
    ref = reference.interpolate_tokens(x.double(), (8, 8), (27, 27), True)
    assert rel_error(ours.cpu(), ref.cpu()) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_unaligned_storage_offset(device):
    # A view starting one element in defeats 16-byte packs; the kernel must fall back, not misread.
    base = torch.randn(2 * 729 * 64 + 1, device=device, dtype=torch.bfloat16)
    x = base[1:].view(2, 729, 64)
    ours = vpit_fast.interpolate_tokens(x)
    ref = reference.interpolate_tokens(x.double(), (8, 8), (27, 27))
    assert rel_error(ours.cpu(), ref.cpu()) < 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x = torch.randn(0, 729, 16, device=device, requires_grad=True)
    out = vpit_fast.interpolate_tokens(x, normalize=True)
    assert out.shape == (0, 64, 16)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_zero_vector_normalisation_matches_pytorch():
    # Below eps F.normalize divides by eps; its gradient is g / eps there.
    x = torch.zeros(1, 729, 8, requires_grad=True)
    out = vpit_fast.interpolate_tokens(x, normalize=True)
    assert torch.equal(out, torch.zeros_like(out))
    g = torch.randn_like(out)
    out.backward(g)
    x64 = torch.zeros(1, 729, 8, dtype=torch.float64, requires_grad=True)
    reference.interpolate_tokens(x64, (8, 8), (27, 27), True).backward(g.double())
    assert rel_error(x.grad, x64.grad) < 1e-5


@pytest.mark.parametrize("normalize", [False, True])
def test_gradcheck_cpu(normalize):
    # The op is fp32-only, so finite differences use fp32 with matching tolerances.
    x = torch.randn(2, 25, 3, requires_grad=True)
    fn = lambda t: vpit_fast.interpolate_tokens(t, (3, 4), (5, 5), normalize)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-2, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", [False, True])
def test_opcheck(device, normalize):
    x = torch.randn(3, 49, 24, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.vpit_fast.interpolate_tokens.default, (x, 7, 7, 4, 3, normalize))
    g = torch.randn(3, 12, 24, device=device)
    torch.library.opcheck(torch.ops.vpit_fast.interpolate_tokens_backward.default,
                          (g, x.detach(), 7, 7, 4, 3, normalize))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def project(tokens, weight):
        return (vpit_fast.interpolate_tokens(tokens, normalize=True) @ weight).square().mean()

    compiled = torch.compile(project, fullgraph=True)
    x = torch.randn(3, 729, 16, device=device, requires_grad=True)
    w = torch.randn(16, 4, device=device)
    eager_loss = project(x, w)
    (eager_grad,) = torch.autograd.grad(eager_loss, x)
    compiled_loss = compiled(x, w)
    (compiled_grad,) = torch.autograd.grad(compiled_loss, x)
    torch.testing.assert_close(compiled_loss, eager_loss)
    torch.testing.assert_close(compiled_grad, eager_grad)


@requires_cuda
def test_cuda_graph_capture():
    x = torch.randn(4, 729, 64, device="cuda", dtype=torch.bfloat16)
    static_out = vpit_fast.interpolate_tokens(x, normalize=True)  # warm-up outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = vpit_fast.interpolate_tokens(x, normalize=True)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(static_out, vpit_fast.interpolate_tokens(x, normalize=True))


@requires_cuda
def test_cuda_matches_cpu_bitwise_in_float32_order_free_cases():
    # Identity grids copy exactly on both devices.
    x = torch.randn(3, 64, 40)
    assert torch.equal(vpit_fast.interpolate_tokens(x.cuda(), (8, 8)).cpu(), x)


def test_impl_torch_is_the_reference():
    x = torch.randn(2, 576, 8, dtype=torch.bfloat16)
    assert torch.equal(vpit_fast.interpolate_tokens(x, impl="torch"),
                       reference.interpolate_tokens(x, (8, 8), (24, 24)))


@pytest.mark.parametrize(
    "make,kwargs,error,match",
    [
        (lambda: torch.randn(729, 8), {}, ValueError, r"x must be \[batch, tokens, channels\]"),
        (lambda: torch.randn(2, 730, 8), {}, ValueError, "not a square grid: pass in_size"),
        (lambda: torch.randn(2, 729, 8), {"in_size": (26, 28)}, ValueError, "in_size"),
        (lambda: torch.randint(0, 5, (2, 729, 8)), {}, TypeError, "float32, bfloat16 or float16"),
        (lambda: torch.randn(2, 729, 8, dtype=torch.float64), {}, TypeError, "float32"),
        (lambda: torch.randn(2, 729, 0), {}, ValueError, "no channels"),
        (lambda: torch.randn(2, 729, 8), {"out_size": (0, 8)}, ValueError, "out_size"),
        (lambda: torch.randn(2, 729, 8), {"out_size": "8"}, ValueError, "out_size"),
        (lambda: torch.randn(2, 729, 8), {"impl": "triton"}, ValueError, "impl"),
        (lambda: [[1.0]], {}, TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_raises_clear_errors(make, kwargs, error, match):
    with pytest.raises(error, match=match):
        vpit_fast.interpolate_tokens(make(), **kwargs)


def test_direct_op_calls_are_checked_in_cpp():
    op = torch.ops.vpit_fast
    with pytest.raises(RuntimeError, match="x has 729 tokens but in_size"):
        op.interpolate_tokens(torch.randn(1, 729, 4), 26, 28, 8, 8, False)
    with pytest.raises(RuntimeError, match="grad_out must be"):
        op.interpolate_tokens_backward(torch.randn(1, 63, 4), torch.randn(1, 729, 4), 27, 27, 8, 8, False)
    with pytest.raises(RuntimeError, match="grad_out is"):
        op.interpolate_tokens_backward(torch.randn(1, 64, 4, dtype=torch.bfloat16),
                                       torch.randn(1, 729, 4), 27, 27, 8, 8, False)
    if HAS_CUDA:
        with pytest.raises(RuntimeError, match="grad_out is on"):
            op.interpolate_tokens_backward(torch.randn(1, 64, 4, device="cuda"),
                                           torch.randn(1, 729, 4), 27, 27, 8, 8, False)
