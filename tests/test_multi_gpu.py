"""Two GPUs against one for the same global batch (needs 2 CUDA GPUs, e.g. `nvidia-h200-x2`; skipped
otherwise): the fused loss under FSDP2 and under DeepSpeed ZeRO-3 in a patched Hugging Face LLaMA,
and `vpit-train` over two NCCL ranks. Each rank takes half of every batch; with the same number of
targets per rank, the mean of the ranks' losses equals the one-GPU loss of the whole batch."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")

STEPS, LR, BATCH, SEQ, VOCAB = 3, 1e-3, 4, 33, 1000


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from vpit_fast.integrations.transformers import apply_fused_cross_entropy

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB))
    apply_fused_cross_entropy(model)
    return model


def batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(STEPS)]


def one_gpu_losses():
    model = tiny_llama().cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for ids in batches():
        ids = ids.cuda()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _worker(rank, world, port, kind, out_dir):
    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    model = tiny_llama().cuda()
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)

        def step(loss):
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        run = model
    else:
        import deepspeed

        deepspeed.init_distributed(dist_backend="nccl")
        config = {"train_micro_batch_size_per_gpu": BATCH // world, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                  "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
        run, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=LR),
                                       config=config)

        def step(loss):
            run.backward(loss)
            run.step()
    losses = []
    per_rank = BATCH // world
    for ids in batches():
        ids = ids[rank * per_rank:(rank + 1) * per_rank].cuda()
        loss = run(input_ids=ids, labels=ids).loss
        step(loss)
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    if rank == 0:
        with open(os.path.join(out_dir, f"{kind}.json"), "w") as f:
            json.dump(losses, f)
    dist.barrier()
    dist.destroy_process_group()


@two_gpus
@pytest.mark.parametrize("kind", ["fsdp2", "zero3"])
def test_two_gpus_match_one_gpu(kind, tmp_path):
    if kind == "zero3":
        pytest.importorskip("deepspeed")
    expected = one_gpu_losses()
    torch.multiprocessing.spawn(_worker, args=(2, free_port(), kind, str(tmp_path)), nprocs=2, join=True)
    got = json.loads((tmp_path / f"{kind}.json").read_text())
    assert got == pytest.approx(expected, rel=1e-4)


def _train_losses(out_dir):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["text_loss"], r["visual_loss"]) for r in records if "text_loss" in r]


@two_gpus
def test_vpit_train_two_gpus_match_one(tmp_path):
    common = ["data.shapes_size=40", "data.eval_size=14", "data.budget=512", "steps=3", "log_every=1",
              "save_every=100", "progress=false", "evaluate=false", "optim.warmup_steps=2", "model.dtype=float32",
              "device=cuda"]
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "vpit_fast.train", *common, "data.batch_size=1", f"out_dir={tmp_path / 'two'}"]
    one = [sys.executable, "-m", "vpit_fast.train", *common, "data.batch_size=2", f"out_dir={tmp_path / 'one'}"]
    for command in (two, one):
        subprocess.run(command, check=True, capture_output=True, timeout=600)
    a, b = _train_losses(tmp_path / "one"), _train_losses(tmp_path / "two")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x == pytest.approx(y, rel=1e-4)
