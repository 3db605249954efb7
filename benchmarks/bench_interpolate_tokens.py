"""Token interpolation, 27x27 -> 8x8, against the PyTorch paths in the same process.

Peers: the official MetaMorph path (permute + .contiguous() + F.interpolate in fp32), PyTorch's
channels-last path (the permute without .contiguous() selects another kernel), and the same
interpolation as one batched GEMM with a constant [64, 729] weight matrix. Bandwidth counts the
bytes each op must move: the input tokens the bilinear taps read plus the output (forward); the
output gradient plus the whole input-sized gradient (backward)."""

import statistics

import pytest
import torch
import torch.nn.functional as F

import vpit_fast
from vpit_fast.kernels_info import bilinear_source_tokens, bilinear_weights

from conftest import H100_COPY_BYTES_PER_S, cuda_event_times, graph_replay, measure, requires_cuda

IN, OUT = (27, 27), (8, 8)
CHANNELS = 1152


def official(x):
    b, _, c = x.shape
    grid = x.view(b, *IN, c).permute(0, 3, 1, 2).contiguous()
    y = F.interpolate(grid.float(), size=OUT, mode="bilinear", align_corners=False).to(x.dtype)
    return y.permute(0, 2, 3, 1).contiguous().flatten(1, 2)


def channels_last(x):
    b, _, c = x.shape
    grid = x.view(b, *IN, c).permute(0, 3, 1, 2)  # no .contiguous(): channels-last kernel
    y = F.interpolate(grid.float(), size=OUT, mode="bilinear", align_corners=False).to(x.dtype)
    return y.permute(0, 2, 3, 1).flatten(1, 2)


_GEMM_WEIGHTS = {}


def batched_gemm(x):
    key = (x.device, x.dtype)
    if key not in _GEMM_WEIGHTS:  # the constant [64, 729] matrix, built once
        _GEMM_WEIGHTS[key] = bilinear_weights(IN, OUT, torch.float32, x.device).to(x.dtype)
    return torch.matmul(_GEMM_WEIGHTS[key], x)


def ours(x):
    return vpit_fast.interpolate_tokens(x, OUT)


IMPLS = {"vpit_fast": ours, "official": official, "channels_last": channels_last, "gemm": batched_gemm}


def rotating_inputs(batch, dtype, device, min_bytes=256 << 20):
    """Enough copies of the input that cycling through them defeats the 50 MB L2."""
    one = batch * IN[0] * IN[1] * CHANNELS * torch.finfo(dtype).bits // 8
    count = max(1, -(-min_bytes // one)) if device == "cuda" else 1
    return [torch.randn(batch, IN[0] * IN[1], CHANNELS, device=device, dtype=dtype) for _ in range(count)]


def cycle(fn, inputs):
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(inputs)
        return fn(inputs[state["i"]])

    return call


def graphed(fn, inputs):
    """One CUDA graph that runs fn once on every input set: times the kernels, not Python
    dispatch (which costs more than the kernel at B <= 64 for every implementation)."""
    return graph_replay(cycle(fn, inputs), len(inputs)), len(inputs)


def measure_graph(replay, calls, reps):
    """Median ms of one call inside a graph that replays `calls` calls."""
    return statistics.median(cuda_event_times(replay, 3, max(reps // 5, 5))) / calls


def forward_bytes(batch, elem):
    return batch * (bilinear_source_tokens(IN, OUT) + OUT[0] * OUT[1]) * CHANNELS * elem


def backward_bytes(batch, elem):
    return batch * (IN[0] * IN[1] + OUT[0] * OUT[1]) * CHANNELS * elem


def test_cpu_smoke(benchmark):
    x = torch.randn(4, 729, 64)
    torch.testing.assert_close(ours(x), official(x))
    measure(benchmark, lambda: ours(x), shape="B=4 C=64 fp32 27x27->8x8", impl="vpit_fast")


@requires_cuda
def test_copy_bandwidth(benchmark):
    """The ceiling the interpolation is held to, measured in the same process."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = measure(benchmark, lambda: dst.copy_(src), reps=20)
    benchmark.extra_info["copy_TBps"] = 2 * src.numel() / (ms * 1e-3) / 1e12


@requires_cuda
@pytest.mark.parametrize("batch", [16, 64, 256])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_forward(benchmark, impl, batch):
    dtype = torch.bfloat16
    inputs = rotating_inputs(batch, dtype, "cuda")
    fn = IMPLS[impl]
    if impl != "official":  # every peer computes the same function
        torch.testing.assert_close(fn(inputs[0]), official(inputs[0]), atol=1e-2, rtol=1e-2)
    reps = 10 if impl == "official" else 100
    ms = measure(benchmark, cycle(fn, inputs), reps=reps, warmup=3, impl=impl, batch=batch,
                 shape=f"B={batch} C={CHANNELS} bf16 27x27->8x8", pass_="forward")
    replay, calls = graphed(fn, inputs)
    graph_ms = measure_graph(replay, calls, reps)
    gbps = forward_bytes(batch, 2) / (graph_ms * 1e-3)
    benchmark.extra_info.update(graph_ms=graph_ms, GBps=gbps / 1e9, copy_fraction=gbps / H100_COPY_BYTES_PER_S)


@requires_cuda
@pytest.mark.parametrize("batch", [16, 64, 256])
@pytest.mark.parametrize("impl", ["vpit_fast", "channels_last", "gemm", "official"])
def test_backward(benchmark, impl, batch):
    dtype = torch.bfloat16
    inputs = [x.requires_grad_() for x in rotating_inputs(batch, dtype, "cuda")]
    grad = torch.randn(batch, OUT[0] * OUT[1], CHANNELS, device="cuda", dtype=dtype)
    if impl == "vpit_fast":  # the backward kernel alone, as autograd would call it
        op = torch.ops.vpit_fast.interpolate_tokens_backward

        def run(x):
            return op(grad, x, *IN, *OUT, False)
    else:
        outputs = {id(x): IMPLS[impl](x) for x in inputs}

        def run(x):
            return torch.autograd.grad(outputs[id(x)], x, grad, retain_graph=True)[0]

    reps = 10 if impl == "official" else 100
    ms = measure(benchmark, cycle(run, inputs), reps=reps, warmup=3, impl=impl, batch=batch,
                 shape=f"B={batch} C={CHANNELS} bf16 27x27->8x8", pass_="backward")
    if impl == "vpit_fast":  # autograd.grad cannot be captured; our backward op can
        replay, calls = graphed(run, inputs)
        ms = measure_graph(replay, calls, reps)
        benchmark.extra_info["graph_ms"] = ms
    gbps = backward_bytes(batch, 2) / (ms * 1e-3)
    benchmark.extra_info.update(GBps=gbps / 1e9, copy_fraction=gbps / H100_COPY_BYTES_PER_S)
