"""Shared benchmark machinery: CUDA-event medians after warm-up, peak-memory measurement, and a
record of device and versions in pytest-benchmark's extra_info.

Every benchmark calls `measure(benchmark, fn, ...)`: pytest-benchmark times `fn` (host clock,
synchronised), and the CUDA-event median is what RESULTS.md reports."""

import statistics

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

# Measured on the lent H100 (DESIGN.md section 3); used for fractions of the hardware floor.
H100_COPY_BYTES_PER_S = 2.94e12
H100_BF16_FLOPS = 762e12


def device_record():
    record = {"torch": torch.__version__}
    if HAS_CUDA:
        props = torch.cuda.get_device_properties(0)
        record.update(device=props.name, sms=props.multi_processor_count, cuda=torch.version.cuda)
    else:
        record.update(device="cpu")
    return record


def cuda_event_times(fn, warmup=5, reps=50):
    """Milliseconds of each of `reps` calls of fn, timed with CUDA events after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def peak_extra_bytes(fn):
    """Peak device memory fn allocates beyond what was allocated before it ran."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def graph_replay(fn, calls):
    """fn captured in a CUDA graph `calls` times in a row (e.g. once per rotating input set), for
    timing the GPU work of ops whose host-side dispatch is slower than their kernels."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph.replay


def measure(benchmark, fn, warmup=5, reps=50, calls_per_run=1, **extra):
    """Time fn under pytest-benchmark and, on CUDA, with events; returns the median in ms of one
    call (fn may make `calls_per_run` calls, e.g. a graph replay)."""
    info = benchmark.extra_info
    info.update(device_record())
    info.update(extra)
    if HAS_CUDA:
        times = cuda_event_times(fn, warmup, reps)
        median = statistics.median(times) / calls_per_run
        info["cuda_event_median_ms"] = median

        def synced():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=min(reps, 20), iterations=1, warmup_rounds=1)
        return median
    benchmark.pedantic(fn, rounds=3, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median * 1e3
    info["cpu_median_ms"] = median
    return median
