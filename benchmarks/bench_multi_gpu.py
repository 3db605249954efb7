"""Training over two GPUs (needs 2 CUDA GPUs, e.g. `nvidia-h200-x2`; skipped otherwise).

`vpit-train --preset bench-8b` under torchrun with two ranks: a LLaMA-3-8B-shaped VPiT (random
weights, LLaMA-3's 128256-row vocabulary, a SigLIP-so400m-shaped frozen tower, packed 4096-token
rows, activation checkpointing, compiled blocks) sharded ZeRO-3 style by FSDP2. pytest-benchmark
times the whole run once (start-up included); what RESULTS.md reports comes from the run's
``metrics.jsonl``: tokens/s and MFU over the logged windows after the first (which holds the
compilation), and each GPU's peak of allocated memory.
"""

import json
import os
import socket
import statistics
import subprocess
import sys

import pytest
import torch

from conftest import device_record

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
RUN_TIMEOUT_S = 480


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def steady_state(records):
    """Medians of tokens/s, MFU and MFU with heads over the training records after the first, the
    peak memory per rank and the last losses (vpit-train itself stops on a non-finite loss)."""
    train = [r for r in records if "tokens_per_s" in r]
    if len(train) < 2:
        raise AssertionError(f"need at least 2 logged windows, got {len(train)}")
    later = train[1:]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in later),
            "mfu": statistics.median(r["mfu"] for r in later),
            "mfu_with_heads": statistics.median(r["mfu_with_heads"] for r in later),
            "peak_gib_per_gpu": train[-1]["gpu_peak_gib"],
            "text_loss": train[-1]["text_loss"], "visual_loss": train[-1]["visual_loss"]}


@two_gpus
def test_llama3_8b_zero3_two_gpus(benchmark, tmp_path):
    out_dir = tmp_path / "bench-8b"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(free_port()), "-m", "vpit_fast.train", "--preset", "bench-8b", "compile=true", "progress=false",
               f"out_dir={out_dir}"]
    log_path = tmp_path / "run.log"

    def run():
        with open(log_path, "w") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S,
                                  env={**os.environ, "OMP_NUM_THREADS": "8"})
        if done.returncode != 0:
            raise AssertionError(f"vpit-train exited with {done.returncode}:\n"
                                 + "\n".join(log_path.read_text().splitlines()[-40:]))

    benchmark.pedantic(run, rounds=1, iterations=1)
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    benchmark.extra_info.update(device_record(), gpus=2, **steady_state(records))
