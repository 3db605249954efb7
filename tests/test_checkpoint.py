"""DCP checkpoints: a run stopped, checkpointed and resumed into freshly built objects gives the
same losses bit for bit as an uninterrupted one (model, optimizer, scheduler, RNG, data position),
in one process and on two FSDP2 ranks; saves are atomic and pruned; safetensors export."""

import json
import os
import random
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import DEVICES
from vpit_fast.train.checkpoint import (
    export_safetensors,
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from vpit_fast.train.optim import build_optimizer, build_scheduler

TOTAL_STEPS, STOP_AT = 6, 3


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.drop = nn.Dropout(0.3)  # draws from the torch RNG every step: resume must restore it
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.drop(torch.relu(self.norm(self.inp(x)))))


def build(init_seed, device="cpu", dtype=torch.float32):
    torch.manual_seed(init_seed)
    model = Net().to(device, dtype)  # bf16: MasterWeightAdamW, whose fp32 masters must resume too
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=TOTAL_STEPS, decay="cosine",
                                min_lr_ratio=0.1)
    return model, optimizer, scheduler


def batch(position, rank=0, device="cpu"):
    g = torch.Generator().manual_seed(1000 * rank + position)
    return torch.randn(5, 8, generator=g).to(device), torch.randn(5, 4, generator=g).to(device)


def train(model, optimizer, scheduler, start, stop, rank=0):
    """Steps start..stop-1; the data position is the step. The python RNG scales the loss, so its
    state matters too."""
    losses = []
    for step in range(start, stop):
        param = next(model.parameters())
        x, y = (t.to(param.dtype) for t in batch(step, rank, param.device))
        loss = nn.functional.mse_loss(model(x), y) * (1.0 + random.random())
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_resume_continues_bit_exactly(tmp_path, device, dtype):
    torch.manual_seed(7)  # seeds the CUDA generators too: dropout on a GPU draws from them
    random.seed(7)
    model, optimizer, scheduler = build(0, device, dtype)
    uninterrupted = train(model, optimizer, scheduler, 0, TOTAL_STEPS)

    torch.manual_seed(7)
    random.seed(7)
    model, optimizer, scheduler = build(0, device, dtype)
    if dtype == torch.bfloat16:
        assert optimizer.implementation.startswith("vpit_fast.MasterWeightAdamW")
    elif device == "cuda":
        assert optimizer.implementation in ("apex.FusedAdam", "torch.AdamW(fused)")
    first = train(model, optimizer, scheduler, 0, STOP_AT)
    path = save_checkpoint(tmp_path, STOP_AT, model, optimizer, scheduler,
                           extra={"data_position": STOP_AT, "losses": first, "config": {"lr": 1e-2}})
    assert path == os.path.join(tmp_path, f"step-{STOP_AT}") and latest_checkpoint(tmp_path) == path
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # the temporary dir was renamed

    torch.manual_seed(12345)  # everything different before the resume
    random.seed(12345)
    model, optimizer, scheduler = build(99, device, dtype)
    extra = load_checkpoint(latest_checkpoint(tmp_path), model, optimizer, scheduler)
    assert extra == {"data_position": STOP_AT, "losses": first, "config": {"lr": 1e-2}}
    assert scheduler.last_epoch == STOP_AT
    if dtype == torch.bfloat16:  # the masters came back in fp32, not as their bf16 rounding
        assert all(s["master"].dtype == torch.float32 for s in optimizer.state.values())
    resumed = train(model, optimizer, scheduler, extra["data_position"], TOTAL_STEPS)
    assert first + resumed == uninterrupted  # float equality: bit for bit


def test_rng_state_round_trip_covers_python_numpy_and_torch(tmp_path):
    import numpy as np

    if torch.cuda.is_available():
        torch.cuda.init()  # CUDA states are saved only once CUDA is in use
    # Through a file and the safe loader, as checkpoints store it.
    torch.save(rng_state(), tmp_path / "rng.pt")
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    cuda_draw = torch.rand(3, device="cuda") if torch.cuda.is_available() else None
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws
    if cuda_draw is not None:
        assert torch.equal(torch.rand(3, device="cuda"), cuda_draw)


def test_missing_rng_state_breaks_exactness_visibly(tmp_path):
    """The control for the test above: without the RNG files, dropout draws differ."""
    torch.manual_seed(7)
    random.seed(7)
    model, optimizer, scheduler = build(0)
    train(model, optimizer, scheduler, 0, STOP_AT)
    path = save_checkpoint(tmp_path, STOP_AT, model, optimizer, scheduler)
    expected = train(model, optimizer, scheduler, STOP_AT, TOTAL_STEPS)
    for name in os.listdir(os.path.join(path, "rng")):
        os.remove(os.path.join(path, "rng", name))
    torch.manual_seed(12345)
    model, optimizer, scheduler = build(0)
    with pytest.warns(UserWarning, match="RNG states not restored"):
        load_checkpoint(path, model, optimizer, scheduler)
    assert train(model, optimizer, scheduler, STOP_AT, TOTAL_STEPS) != expected


def test_keep_last_tmp_dirs_and_replacing_a_step(tmp_path):
    model, optimizer, scheduler = build(0)
    train(model, optimizer, scheduler, 0, 1)
    assert latest_checkpoint(tmp_path / "nothing_yet") is None
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, optimizer, scheduler, extra={"step": step}, keep_last=2)
    assert sorted(n for n in os.listdir(tmp_path)) == ["step-3", "step-4"]

    # An interrupted save and a hand-made directory without metadata are not checkpoints.
    (tmp_path / ".tmp-step-9").mkdir()
    (tmp_path / ".tmp-step-9" / ".metadata").write_text("half written")
    (tmp_path / "step-10").mkdir()
    assert latest_checkpoint(tmp_path) == os.path.join(tmp_path, "step-4")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step-10", model, optimizer)

    # Saving a step again replaces it; the next save clears the leftover .tmp dir.
    save_checkpoint(tmp_path, 4, model, optimizer, scheduler, extra={"again": True}, keep_last=2)
    assert read_trainer_state(tmp_path / "step-4")["extra"] == {"again": True}
    assert not (tmp_path / ".tmp-step-9").exists()
    save_checkpoint(tmp_path, 5, model, optimizer, keep_last=None)
    assert {"step-3", "step-4", "step-5"} <= set(os.listdir(tmp_path))
    # A checkpoint without a scheduler state cannot fill a scheduler.
    with pytest.raises(ValueError, match="no scheduler state"):
        load_checkpoint(tmp_path / "step-5", model, optimizer, scheduler)
    # Model-only load.
    fresh, _, _ = build(5)
    load_checkpoint(tmp_path / "step-5", fresh)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_save_rejects_bad_input_before_writing(tmp_path):
    model, optimizer, scheduler = build(0)
    with pytest.raises(ValueError, match="first optimizer.step"):
        save_checkpoint(tmp_path, 0, model, optimizer, scheduler)
    train(model, optimizer, scheduler, 0, 1)
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path, 1, model, optimizer, scheduler, extra={"t": torch.ones(1)})
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(tmp_path, -1, model, optimizer)
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 1, model, optimizer, keep_last=0)
    assert not tmp_path.exists() or os.listdir(tmp_path) == []


def test_export_safetensors_round_trips_with_tied_weights(tmp_path):
    from safetensors.torch import load_file

    model = nn.Sequential(nn.Embedding(11, 6), nn.LayerNorm(6), nn.Linear(6, 11, bias=False))
    model[2].weight = model[0].weight
    model = model.to(torch.bfloat16)
    path = export_safetensors(model, tmp_path / "export")
    loaded = load_file(path)
    expected = model.state_dict()
    assert set(loaded) == set(expected) == {"0.weight", "1.weight", "1.bias", "2.weight"}
    for name, tensor in expected.items():
        assert loaded[name].dtype == torch.bfloat16 and torch.equal(loaded[name], tensor), name


# ----------------------------------------------------------------------------- FSDP2, two ranks


def fsdp_rank(rank, world, port, result_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    root = os.path.join(result_dir, "ckpt")

    def sharded(init_seed):
        model, _, _ = build(init_seed)
        fully_shard(model.inp, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
        scheduler = build_scheduler(optimizer, warmup_steps=2, total_steps=TOTAL_STEPS, min_lr_ratio=0.1)
        return model, optimizer, scheduler

    torch.manual_seed(7 + rank)  # dropout differs per rank, as in real data parallelism
    random.seed(7 + rank)
    model, optimizer, scheduler = sharded(0)
    uninterrupted = train(model, optimizer, scheduler, 0, TOTAL_STEPS, rank)

    torch.manual_seed(7 + rank)
    random.seed(7 + rank)
    model, optimizer, scheduler = sharded(0)
    first = train(model, optimizer, scheduler, 0, STOP_AT, rank)
    save_checkpoint(root, STOP_AT, model, optimizer, scheduler, extra={"data_position": STOP_AT})
    torch.manual_seed(555)
    random.seed(555)
    model, optimizer, scheduler = sharded(1)
    extra = load_checkpoint(latest_checkpoint(root), model, optimizer, scheduler)
    resumed = train(model, optimizer, scheduler, extra["data_position"], TOTAL_STEPS, rank)

    export = export_safetensors(model, os.path.join(result_dir, "export"))
    full = {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"uninterrupted": uninterrupted, "resumed": first + resumed, "export": export,
                   "files": sorted(os.listdir(latest_checkpoint(root)))}, f)
    if rank == 0:
        torch.save(full, os.path.join(result_dir, "full.pt"))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see tests/test_fsdp_head_loss.py: gloo teardown sometimes aborts


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_fsdp2_two_ranks_resume_exactly_and_export(tmp_path):
    from safetensors.torch import load_file

    world = 2
    mp.spawn(fsdp_rank, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for r in results:
        assert r["resumed"] == r["uninterrupted"]
        assert "rng" in r["files"] and "trainer_state.json" in r["files"]
    assert results[0]["uninterrupted"] != results[1]["uninterrupted"]  # ranks really differ
    assert sorted(os.listdir(tmp_path / "ckpt" / "step-3" / "rng")) == ["rank-00000.pt", "rank-00001.pt"]
    exported = load_file(results[0]["export"])
    full = torch.load(tmp_path / "full.pt")
    assert set(exported) == set(full)
    for name, tensor in full.items():
        assert torch.equal(exported[name], tensor), name
