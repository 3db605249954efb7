"""`python -m vpit_fast info`: what was built and which optional accelerators are importable."""

import argparse
import importlib.util
import platform
import sys

import torch


def _importable(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def info():
    import vpit_fast

    rows = [("vpit_fast", vpit_fast.__version__), ("python", platform.python_version()),
            ("torch", torch.__version__), ("torch CUDA", str(torch.version.cuda))]
    try:
        built = vpit_fast.build_info()
        rows += [
            ("extension", "CUDA + CPU" if built["cuda"] else "CPU only"),
            ("compiled archs", built["cuda_archs"] or "-"),
            ("compiled against torch", built["torch_version"]),
        ]
    except RuntimeError as error:
        rows.append(("extension", f"NOT BUILT: {error}"))
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    rows.append(("GPUs", ", ".join(gpus) or "none"))
    # flash_attn's package is importable as flash_attn; apex is NVIDIA's apex (never the PyPI web toolkit).
    for name in ("flash_attn", "apex", "transformers", "diffusers", "pynvml"):
        rows.append((name, "importable" if _importable(name) else "not installed"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def check():
    """Run every compiled op against its pure-PyTorch reference on fresh random inputs."""
    import time

    import vpit_fast
    from vpit_fast.ops import reference

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    failures = 0
    for device in devices:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(8, 729, 1152, device=device, dtype=dtype)
            start = time.perf_counter()
            ours = vpit_fast.interpolate_tokens(x, normalize=True)
            if device == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - start) * 1e3
            ref = reference.interpolate_tokens(x.double(), (8, 8), (27, 27), True)
            err = ((ours.double() - ref).norm() / ref.norm()).item()
            ok = err < (1e-5 if dtype == torch.float32 else 1e-2)
            failures += not ok
            print(f"interpolate_tokens  {device:<4} {str(dtype):<15} [8, 729, 1152] -> [8, 64, 1152]  "
                  f"rel. error {err:.2e}  {ms:7.2f} ms  {'ok' if ok else 'FAILED'}")
        failures += _check_head_loss(device)
    return 1 if failures else 0


def _check_head_loss(device):
    """One fused head-loss forward + backward against the float64 reference; returns 1 on failure."""
    import copy
    import time

    import vpit_fast
    from torch import nn
    from vpit_fast.ops import reference

    n, h, v, dv = 1024, 256, 32002, 64
    hidden = torch.randn(n, h, device=device, requires_grad=True)
    lm_weight = (torch.randn(v, h, device=device) * 0.05).requires_grad_()
    labels = torch.full((n,), -100, device=device)
    rows = torch.randperm(n, device=device)
    labels[rows[:400]] = torch.randint(0, v, (400,), device=device)
    visual_rows, targets = rows[400:560].contiguous(), torch.randn(160, dv, device=device)
    head = nn.Linear(h, dv).to(device)
    start = time.perf_counter()
    out = vpit_fast.head_loss(hidden, lm_weight, labels, visual_rows, targets, head)
    out.loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3
    h64, w64 = hidden.detach().double().requires_grad_(), lm_weight.detach().double().requires_grad_()
    ref = reference.head_loss(h64, w64, labels, visual_rows, targets.double(), copy.deepcopy(head).double())
    ref.loss.backward()
    errors = [abs(out.loss.item() - ref.loss.item()) / abs(ref.loss.item())]
    errors += [((a.grad.double() - b.grad).norm() / b.grad.norm()).item() for a, b in ((hidden, h64), (lm_weight, w64))]
    ok = max(errors) < 1e-4
    print(f"head_loss           {device:<4} torch.float32   N {n} H {h} V {v} Dv {dv}        "
          f"rel. error {max(errors):.2e}  {ms:7.2f} ms  {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m vpit_fast")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="print what was built and which optional packages are importable")
    sub.add_parser("check", help="run the compiled ops against the PyTorch reference")
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
        return 0
    return check()


if __name__ == "__main__":
    sys.exit(main())
