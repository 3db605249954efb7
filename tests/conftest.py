"""Shared test set-up: fresh random seeds (printed on failure), device parametrisation with clean
GPU skips, output poisoning, and the error measures every kernel test uses."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"))]
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """Every test draws fresh inputs; VPIT_TEST_SEED=N replays a failure."""
    seed = int(os.environ.get("VPIT_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [value for key, value in item.user_properties if key == "seed"]
        if seeds:
            report.sections.append(("seed", f"replay with VPIT_TEST_SEED={seeds[0]}"))


def poison(device, nbytes=64 << 20):
    """Fill recently freed device memory with NaN so an output element a kernel forgets to write
    shows up as NaN (the CUDA caching allocator hands the same blocks back)."""
    if torch.device(device).type == "cuda":
        junk = torch.full((nbytes // 4,), float("nan"), device=device)
        del junk


def rel_error(actual, expected, floor=1e-6):
    """||actual - expected|| / ||expected|| in float64; NaN or inf anywhere gives inf. The
    denominator never drops below floor * sqrt(numel), so a reference that is zero up to rounding
    (e.g. the gradient of a normalised single channel) is compared absolutely."""
    actual, expected = actual.double(), expected.double()
    if not torch.isfinite(actual).all():
        return float("inf")
    denom = max(expected.norm().item(), floor * expected.numel() ** 0.5)
    return (actual - expected).norm().item() / denom if denom > 0 else 0.0


# Relative error allowed beyond what plain PyTorch makes in the same dtype.
SLACK = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 5e-4}
