"""The training loop's building blocks: config overrides, optimizer and schedule, metrics."""

import dataclasses
import json
import math
import pathlib
import sys
import types
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import torch
from torch import nn

from conftest import requires_cuda
from vpit_fast.train import metrics
from vpit_fast.train.optim import (
    WarmupDecay,
    apex_fused_adam,
    build_optimizer,
    build_scheduler,
    no_decay_parameter_names,
    param_groups,
)
from vpit_fast.train.overrides import ConfigError, apply_overrides, load_yaml_into, save_yaml, to_dict

# ----------------------------------------------------------------------------- overrides


@dataclass
class OptimCfg:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    total_steps: int = 100


@dataclass
class DataCfg:
    budget: int = 1024
    path: Optional[str] = None
    image_sizes: list[int] = field(default_factory=lambda: [384])


@dataclass
class ModelCfg:
    vision_head: str = "linear"
    layers: tuple[int, ...] = (0, 1)


@dataclass
class Cfg:
    optim: OptimCfg = field(default_factory=OptimCfg)
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    flag: bool = False
    seed: int = 0
    out_dir: pathlib.Path = pathlib.Path("runs")
    tags: tuple[str, ...] = ()
    limits: dict[str, int] = field(default_factory=dict)
    untyped: tuple = (1, 2)


def test_overrides_coerce_to_field_types():
    cfg = apply_overrides(Cfg(), ["optim.lr=1e-4", "data.budget=2048", "model.vision_head=mlp", "flag=true",
                                  "--seed=7", "out_dir=/tmp/x", "optim.total_steps=1e4", "tags=a,b",
                                  "limits={a: 1, b: 2}", "data.image_sizes=[224, 384]", "optim.decay=linear"])
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.data.budget == 2048 and cfg.model.vision_head == "mlp" and cfg.flag is True
    assert cfg.seed == 7 and cfg.out_dir == pathlib.Path("/tmp/x") and cfg.optim.total_steps == 10000
    assert cfg.tags == ("a", "b") and cfg.limits == {"a": 1, "b": 2}
    assert cfg.data.image_sizes == [224, 384] and cfg.optim.decay == "linear"
    for text in ("0.8,0.99", "[0.8, 0.99]", " 0.8 , 0.99 "):
        assert apply_overrides(Cfg(), [f"optim.betas={text}"]).optim.betas == (0.8, 0.99)
    assert apply_overrides(Cfg(), ["model.layers=3"]).model.layers == (3,)
    # Untyped items are read as YAML scalars (1e-4 included), not left as strings.
    assert apply_overrides(Cfg(), ["untyped=0.9,1e-4,3,a"]).untyped == (0.9, 1e-4, 3, "a")
    assert apply_overrides(Cfg(), ["tags=01,b"]).tags == ("01", "b")  # typed str items keep their text
    assert apply_overrides(Cfg(), ["tags="]).tags == ()
    for word, expected in (("no", False), ("1", True), ("OFF", False), ("Yes", True)):
        assert apply_overrides(Cfg(), [f"flag={word}"]).flag is expected
    cfg = apply_overrides(Cfg(), ["data.path=train.json"])
    assert cfg.data.path == "train.json"
    assert apply_overrides(cfg, ["data.path=null"]).data.path is None
    # Later overrides win.
    assert apply_overrides(Cfg(), ["seed=1", "seed=2"]).seed == 2


@pytest.mark.parametrize("override, needles", [
    ("optim.lrr=1", ["'optim.lrr'", "'optim.lr'"]),
    ("lr=1", ["'lr'", "'optim.lr'"]),
    ("modle.vision_head=mlp", ["'modle.vision_head'", "'model.vision_head'"]),
    ("data.budget=abc", ["'data.budget'", "'abc'", "int"]),
    ("data.budget=1.5", ["'data.budget'", "integer"]),
    ("flag=maybe", ["'flag'", "true/false"]),
    ("optim.decay=exp", ["'optim.decay'", "'cosine'", "'linear'"]),
    ("optim.betas=0.9", ["'optim.betas'", "2 items"]),
    ("optim.betas=0.9,x", ["'optim.betas[1]'", "'x'"]),
    ("optim=3", ["'optim' is a section", "lr"]),
    ("seed.x=3", ["'seed' is a value"]),
    ("seed", ["key=value"]),
    ("=3", ["empty key"]),
])
def test_overrides_errors_name_the_key(override, needles):
    with pytest.raises(ConfigError) as info:
        apply_overrides(Cfg(), [override])
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_overrides_reject_a_single_string_and_non_dataclasses():
    with pytest.raises(TypeError, match="list"):
        apply_overrides(Cfg(), "seed=1")
    with pytest.raises(TypeError, match="dataclass"):
        apply_overrides(Cfg, ["seed=1"])


def test_yaml_fills_nested_sections_and_round_trips(tmp_path):
    path = tmp_path / "cfg.yaml"
    # PyYAML reads 1e-4 (no dot) as a string: the float field must still accept it.
    path.write_text("optim:\n  lr: 1e-4\n  betas: [0.8, 0.9]\ndata:\n  budget: 512\nflag: yes\ntags: [a]\n")
    cfg = load_yaml_into(Cfg(), path)
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.8, 0.9) and cfg.optim.decay == "cosine"
    assert cfg.data.budget == 512 and cfg.flag is True and cfg.tags == ("a",)

    apply_overrides(cfg, ["model.vision_head=mlp", "out_dir=o", "limits={k: 3}"])
    plain = to_dict(cfg)
    assert plain["optim"]["betas"] == [0.8, 0.9] and plain["out_dir"] == "o"
    saved = tmp_path / "resolved.yaml"
    save_yaml(cfg, saved)
    assert load_yaml_into(Cfg(), saved) == cfg

    (tmp_path / "empty.yaml").write_text("")
    assert load_yaml_into(Cfg(), tmp_path / "empty.yaml") == Cfg()
    (tmp_path / "bad.yaml").write_text("optim:\n  warmup: 3\n")
    with pytest.raises(ConfigError, match="'optim.warmup'"):
        load_yaml_into(Cfg(), tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml_into(Cfg(), tmp_path / "list.yaml")
    (tmp_path / "scalar_section.yaml").write_text("data: 3\n")
    with pytest.raises(ConfigError, match="'data' is a section"):
        load_yaml_into(Cfg(), tmp_path / "scalar_section.yaml")


def test_optional_section_is_created_on_demand():
    @dataclass
    class Outer:
        optim: Optional[OptimCfg] = None

    cfg = apply_overrides(Outer(), ["optim.lr=0.5"])
    assert cfg.optim == dataclasses.replace(OptimCfg(), lr=0.5)
    assert apply_overrides(cfg, ["optim=none"]).optim is None


# ----------------------------------------------------------------------------- optimizer


class MyRMSNorm(nn.Module):
    """A norm with a 2-D weight: excluded from decay by its class name, not its shape."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1, n))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.proj = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.rms = MyRMSNorm(6)
        self.head = nn.Linear(6, 10, bias=False)
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)

    def forward(self, ids):
        return self.head(self.rms(self.norm(self.proj(self.embed(ids)))))


def test_param_groups_exclude_biases_norms_and_optionally_embeddings():
    model = Tiny()
    no_decay = {"proj.bias", "norm.weight", "norm.bias", "rms.weight"}
    assert no_decay_parameter_names(model) == no_decay
    assert no_decay_parameter_names(model, exclude_embeddings=True) == no_decay | {"embed.weight"}
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert {names[id(p)] for p in groups[0]["params"]} == {"embed.weight", "proj.weight", "head.weight"}
    assert {names[id(p)] for p in groups[1]["params"]} == no_decay
    # A tied weight owned by an Embedding counts as embedding from either owner.
    model.head.weight = model.embed.weight
    assert "embed.weight" in no_decay_parameter_names(model, exclude_embeddings=True)
    with pytest.raises(ValueError, match="weight_decay"):
        param_groups(model, -1.0)


@pytest.mark.parametrize("fused, impl", [("auto", "torch.AdamW(foreach)"), ("foreach", "torch.AdamW(foreach)"),
                                         ("torch", "torch.AdamW(fused)")])
def test_build_optimizer_decays_only_the_decay_group(fused, impl):
    model = Tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, lr=1.0, betas=(0.9, 0.99), weight_decay=0.1, fused=fused)
    assert optimizer.implementation == impl
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.99)
    # Zero gradients: Adam's update is exactly 0, so only decoupled decay (x * (1 - lr * wd)) moves.
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    skip = no_decay_parameter_names(model)
    for name, p in model.named_parameters():
        expected = before[name] if name in skip or not p.requires_grad else before[name] * 0.9
        torch.testing.assert_close(p.detach(), expected, msg=name)


def test_build_optimizer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="fused"):
        build_optimizer(Tiny(), lr=1e-3, fused="yes")
    with pytest.raises(ValueError, match="betas"):
        build_optimizer(Tiny(), lr=1e-3, betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(Tiny().requires_grad_(False), lr=1e-3)
    if apex_fused_adam() is None:
        with pytest.raises(ImportError, match="apex"):
            build_optimizer(Tiny(), lr=1e-3, fused="apex")
    else:
        with pytest.raises(ValueError, match="CUDA"):
            build_optimizer(Tiny(), lr=1e-3, fused="apex")


def test_unrelated_apex_package_is_not_taken_for_nvidia_apex(tmp_path, monkeypatch):
    # The registry's `apex` (a web toolkit) has no apex.optimizers.FusedAdam and no amp_C.
    (tmp_path / "apex").mkdir()
    (tmp_path / "apex" / "__init__.py").write_text("WEB = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "apex", raising=False)
    assert apex_fused_adam() is None


def test_schedule_values():
    lr, warmup, total, m = 0.5, 4, 12, 0.1
    cosine = WarmupDecay(warmup, total, "cosine", m)
    assert [cosine(s) for s in range(warmup)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine(warmup) == 1.0 and math.isclose(cosine(total), m) and math.isclose(cosine(10 * total), m)
    assert math.isclose(cosine(8), m + (1 - m) * 0.5)  # half way through the decay
    linear = WarmupDecay(warmup, total, "linear", m)
    assert math.isclose(linear(6), m + (1 - m) * 0.75)
    assert WarmupDecay(0, total, "constant")(0) == 1.0 and WarmupDecay(0, total, "constant")(100) == 1.0

    model = nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = build_scheduler(optimizer, warmup, total, "cosine", m)
    seen = []
    for _ in range(total + 1):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([lr * cosine(s) for s in range(total + 1)], rel=1e-12)


@pytest.mark.parametrize("args, match", [((-1, 10), "warmup_steps"), ((5, 4), "total_steps"),
                                         ((0, 0), "total_steps"), ((1, 10, "exp"), "decay"),
                                         ((1, 10, "cosine", 1.5), "min_lr_ratio")])
def test_schedule_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        build_scheduler(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0), *args)


def test_scheduler_state_round_trips_through_json():
    def make():
        optimizer = torch.optim.AdamW(nn.Linear(2, 2).parameters(), lr=1e-3)
        return optimizer, build_scheduler(optimizer, 3, 20, "linear", 0.05)

    optimizer, scheduler = make()
    for _ in range(5):
        optimizer.step()
        scheduler.step()
    state = json.loads(json.dumps(scheduler.state_dict()))
    optimizer2, scheduler2 = make()
    scheduler2.load_state_dict(state)
    # The resumed scheduler sets the optimizer's lr from the next step on, like the original.
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        optimizer2.step()
        scheduler2.step()
        assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    assert scheduler2.last_epoch == scheduler.last_epoch == 9


# ----------------------------------------------------------------------------- metrics


def test_metrics_logger_appends_flushed_json_lines(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    logger = metrics.MetricsLogger(path, enabled=True)
    logger.log({"step": 1}, text_loss=torch.tensor(2.5), visual_loss=0.25)
    # Flushed: readable before close.
    assert json.loads(path.read_text().splitlines()[0]) == {"step": 1, "text_loss": 2.5, "visual_loss": 0.25}
    logger.close()
    with metrics.MetricsLogger(path, enabled=True) as again:  # appends, as a resumed run does
        again.log(step=2, text_loss=2.0)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    with pytest.raises(ValueError, match="closed"):
        logger.log(step=3)
    off = metrics.MetricsLogger(tmp_path / "off.jsonl", enabled=False)
    off.log(step=1, text_loss=1.0)
    assert not (tmp_path / "off.jsonl").exists()
    # No process group: this process is rank 0 and writes.
    assert metrics.MetricsLogger(tmp_path / "default.jsonl").enabled


def test_read_metrics_keeps_the_last_record_of_a_redone_step(tmp_path):
    path = tmp_path / "m.jsonl"
    rows = [{"step": 1, "text_loss": 3.0}, {"step": 2, "text_loss": 2.0}, {"step": 2, "eval_text_loss": 2.2},
            {"step": 2, "text_loss": 1.9}, {"step": 3, "text_loss": 1.5}, {"event": "resume"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "text_lo')  # torn line
    assert metrics.read_metrics(path) == [rows[0], rows[2], rows[3], rows[4], rows[5]]


def test_gpu_monitor_without_nvml_returns_empty(monkeypatch):
    monitor = metrics.GpuMonitor()
    if not torch.cuda.is_available():
        assert not monitor.available and monitor.read() == {}
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    assert metrics.GpuMonitor(0).read() == {}


def test_gpu_monitor_reads_through_nvml(monkeypatch):
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: ("handle", i),
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=3 * 2**30, total=80 * 2**30),
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=87, memory=40),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert metrics.GpuMonitor(0).read() == {"gpu_mem_used_gib": 3.0, "gpu_mem_total_gib": 80.0,
                                            "gpu_util_pct": 87.0}
    assert metrics.GpuMonitor(torch.device("cuda", 0)).available
    assert not metrics.GpuMonitor(torch.device("cuda")).available  # current device, but no CUDA here

    def broken(h):
        raise RuntimeError("GPU fell off the bus")

    fake.nvmlDeviceGetUtilizationRates = broken
    assert metrics.GpuMonitor(0).read() == {}


def test_flops_and_mfu():
    # LLaMA-3 8B-like: 7e9 non-embedding params, 32 layers, hidden 4096, 4096 tokens.
    f = metrics.flops_per_token(7e9, 32, 4096, 4096)
    assert f == 6 * 7e9 + 12 * 32 * 4096 * 4096
    assert metrics.mfu(4000.0, f, 989e12) == pytest.approx(4000.0 * f / 989e12)
    assert metrics.mfu(4000.0, f, None) is None
    with pytest.raises(ValueError, match="peak_flops"):
        metrics.mfu(1.0, f, 0.0)
    with pytest.raises(ValueError, match="num_layers"):
        metrics.flops_per_token(1e6, -1, 64, 128)
    assert metrics.peak_flops_for_name("NVIDIA H100 80GB HBM3") == 989e12
    assert metrics.peak_flops_for_name("NVIDIA H100 PCIe") == 756e12
    assert metrics.peak_flops_for_name("NVIDIA H200") == 989e12
    assert metrics.peak_flops_for_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert metrics.peak_flops_for_name("Tesla T4") is None
    if not torch.cuda.is_available():
        assert metrics.peak_flops_for_device() is None


@pytest.mark.parametrize("tied", [True, False])
def test_vpit_flops_count_each_weight_on_the_rows_it_runs_on(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    from vpit_fast.data import build_tokenizer
    from vpit_fast.model import VPiTConfig, VPiTModel

    tokenizer = build_tokenizer()
    H, I, L, V, dv = 32, 48, 3, len(tokenizer), 12
    llm = LlamaForCausalLM(LlamaConfig(hidden_size=H, intermediate_size=I, num_attention_heads=4, num_key_value_heads=2,
                                       num_hidden_layers=L, vocab_size=V, tie_word_embeddings=tied))
    model = VPiTModel.from_base(llm, tokenizer, None, VPiTConfig(vision_head="mlp"), visual_dim=dv)
    count = metrics.VPiTFlops.of(model)
    kv = H // 4 * 2  # two K/V heads of head_dim 8
    block = H * H * 2 + H * kv * 2 + 3 * H * I + 2 * H  # q, o, k, v; gate, up, down; two norms
    assert count.decoder == L * block + H  # plus the final norm; the embedding table and LM head apart
    V = model.heads.lm_head.weight.shape[0]  # from_base may pad the vocabulary
    assert count.lm_head == V * H
    assert count.vision_head == sum(p.numel() for p in model.heads.vision_head.parameters()) > 0
    assert count.adapter == sum(p.numel() for p in model.adapter.parameters()) > 0
    assert (count.num_layers, count.hidden) == (L, H)
    decoder = count.decoder_flops(100, 25.0)
    assert decoder == 100 * (6 * count.decoder + 12 * L * H * 25.0)
    total = count.model_flops(100, 25.0, text_targets=7, visual_targets=64, image_tokens=128)
    assert total == decoder + 6 * (7 * V * H + 64 * count.vision_head + 128 * count.adapter)
    with pytest.raises(ValueError, match="text_targets"):
        count.model_flops(100, 25.0, -1, 0, 0)


def test_batch_rows_reads_the_loss_rows_on_the_host():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, 8]])
    batch = {"labels": labels, "image_is_target": torch.tensor([True, False, True])}
    # row i predicts label i + 1: the first column is never a target
    assert metrics.batch_rows(batch, 64) == (4, 2 * 64, 3 * 64)
    assert metrics.batch_rows({"labels": labels}, 64) == (4, 0, 0)


def test_progress_bar_and_postfix(capsys):
    assert metrics.format_postfix(2.34567, 0.456789, 12345.0, 0.4123) == \
        "text 2.3457 | visual 0.4568 | 12.3k tok/s | MFU 41.2%"
    assert metrics.format_postfix(text_loss=torch.tensor(1.0), tokens_per_s=2.5e6) == "text 1.0000 | 2.5M tok/s"
    assert metrics.format_postfix() == ""

    bar = metrics.progress_bar(total=5, initial=2, enabled=True)
    bar.set_postfix_str(metrics.format_postfix(1.5, 0.5))
    bar.update(1)
    bar.close()
    err = capsys.readouterr().err
    assert "3/5" in err and "text 1.5000 | visual 0.5000" in err
    quiet = metrics.progress_bar(total=5, enabled=False)
    quiet.set_postfix_str("x")
    quiet.update(1)
    quiet.close()
    assert capsys.readouterr().err == ""


def test_plot_losses_writes_png(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with metrics.MetricsLogger(path, enabled=True) as logger:
        for step in range(1, 11):
            logger.log(step=step, text_loss=3.0 / step, visual_loss=1.0 - 0.05 * step)
            if step % 5 == 0:
                logger.log(step=step, eval_text_loss=3.2 / step, eval_visual_loss=0.9)
    out = metrics.plot_losses(path, tmp_path / "plots" / "loss.png")
    assert out is not None
    data = (tmp_path / "plots" / "loss.png").read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000

    (tmp_path / "empty.jsonl").write_text(json.dumps({"step": 1, "lr": 0.1}) + "\n")
    with pytest.warns(UserWarning, match="no loss records"):
        assert metrics.plot_losses(tmp_path / "empty.jsonl", tmp_path / "empty.png") is None
    with pytest.warns(UserWarning, match="loss plot failed"):
        assert metrics.plot_losses(tmp_path / "missing.jsonl", tmp_path / "missing.png") is None


def test_plot_losses_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(UserWarning, match="matplotlib"):
        assert metrics.plot_losses(tmp_path / "m.jsonl", tmp_path / "x.png") is None


@requires_cuda
def test_on_a_gpu_monitor_reads_and_optimizer_is_fused():
    torch.cuda.init()
    reading = metrics.GpuMonitor().read()
    assert set(reading) == {"gpu_mem_used_gib", "gpu_mem_total_gib", "gpu_util_pct"}
    assert 0 < reading["gpu_mem_used_gib"] <= reading["gpu_mem_total_gib"] and 0 <= reading["gpu_util_pct"] <= 100
    name = torch.cuda.get_device_name()
    assert metrics.peak_flops_for_device() == metrics.peak_flops_for_name(name)
    optimizer = build_optimizer(Tiny().cuda(), lr=1e-3, weight_decay=0.1)
    expected = "apex.FusedAdam" if apex_fused_adam() is not None else "torch.AdamW(fused)"
    assert optimizer.implementation == expected


def test_eager_blocks_swaps_compiled_blocks_out_and_back():
    from transformers import LlamaConfig, LlamaForCausalLM

    from vpit_fast.train.parallel import apply_compile, decoder_layers, eager_blocks

    class Holder(torch.nn.Module):  # decoder_layers reads model.llm.base_model.layers
        def __init__(self):
            super().__init__()
            self.llm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                    num_hidden_layers=2, vocab_size=64))

    model = Holder()
    originals = list(decoder_layers(model))
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        want = model.llm(ids).logits
    apply_compile(model)  # compiles lazily: nothing below calls a compiled block
    compiled = list(decoder_layers(model))
    assert all(c is not o and c._orig_mod is o for c, o in zip(compiled, originals))
    with eager_blocks(model), torch.no_grad():
        assert all(a is b for a, b in zip(decoder_layers(model), originals))
        assert torch.equal(model.llm(ids).logits, want)
    assert all(a is b for a, b in zip(decoder_layers(model), compiled))
    with pytest.raises(RuntimeError, match="inside"), eager_blocks(model):
        raise RuntimeError("inside")
    assert all(a is b for a, b in zip(decoder_layers(model), compiled))


def test_peak_memory_per_rank_is_cuda_only():
    assert metrics.peak_memory_per_rank("cpu") is None
    assert metrics.peak_memory_per_rank(torch.device("cpu"), rank=1, world_size=2) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_peak_memory_per_rank_reads_this_process_on_one_gpu():
    held = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    peaks = metrics.peak_memory_per_rank("cuda")
    assert len(peaks) == 1 and peaks[0] >= held.numel() / 2**30


def test_compile_mode_reaches_torch_compile_and_is_checked(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from vpit_fast.train import parallel
    from vpit_fast.train.config import resolve_config
    from vpit_fast.train.overrides import ConfigError

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.llm = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                                    num_hidden_layers=2, vocab_size=64))

    modes = []
    monkeypatch.setattr(parallel.torch, "compile", lambda block, **kwargs: modes.append(kwargs["mode"]) or block)
    parallel.apply_compile(Holder())
    parallel.apply_compile(Holder(), "max-autotune-no-cudagraphs")
    assert modes == [None, None, "max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"]
    with pytest.raises(ValueError, match="compile mode must be one of"):
        parallel.apply_compile(Holder(), "reduce-overhead")
    assert resolve_config("tiny", overrides=["compile_mode=max-autotune-no-cudagraphs"]).compile_mode == \
        "max-autotune-no-cudagraphs"
    with pytest.raises((ValueError, ConfigError), match="compile_mode must be one of"):
        resolve_config("tiny", overrides=["compile_mode=reduce-overhead"])
