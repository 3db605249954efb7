"""The training loop on the embedded default, shrunk: a run writes checkpoints, metrics, a plot and
an export that loads back; a resumed run continues exactly; Ctrl-C saves a checkpoint; a
non-finite loss stops the run with a clear message; configs and overrides."""

import json
import shutil

import pytest
import torch

from vpit_fast import presets
from vpit_fast.model import VPiTModel
from vpit_fast.train import loop
from vpit_fast.train.config import resolve_config
from vpit_fast.train.overrides import ConfigError

SMALL = ["data.shapes_size=60", "data.eval_size=14", "data.budget=512", "data.batch_size=2", "steps=6",
         "log_every=1", "save_every=3", "progress=false", "optim.warmup_steps=2"]


def config(tmp_path, *extra):
    return resolve_config("tiny", overrides=SMALL + [f"out_dir={tmp_path}", *extra])


def losses(out_dir):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["text_loss"], r["visual_loss"]) for r in records if "text_loss" in r}


def test_run_writes_checkpoint_metrics_plot_and_export(tmp_path):
    result = loop.train(config(tmp_path))
    assert result["step"] == 6
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-3", "step-6"]
    curve = losses(tmp_path)
    assert sorted(curve) == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(v)).all() for v in curve.values())
    assert (tmp_path / "loss.png").stat().st_size > 1000
    for key in ("text_loss", "visual_loss", "image_qa_accuracy", "image_qa_chance"):
        assert 0 <= result[key] < float("inf"), key
    assert 0 < result["image_qa_chance"] < 1
    model = VPiTModel.from_pretrained(tmp_path / "export")
    assert model.visual is not None and model.config.text_vocab_size == len(model.tokenizer)


def test_resume_continues_exactly(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    loop.train(config(straight, "evaluate=false"))
    loop.train(config(resumed, "evaluate=false"))
    # Forget everything after step 3, as if the run had stopped there, then resume.
    shutil.rmtree(resumed / "checkpoints" / "step-6")
    kept = [line for line in (resumed / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 3]
    (resumed / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    loop.train(config(resumed, "evaluate=false", "resume=true"))
    assert losses(resumed) == losses(straight)


def test_flattened_batches_train_like_padded_rows(tmp_path):
    """data.flatten (the default) hands the model one row of real tokens instead of padded rows:
    the same samples, targets and losses (up to float rounding: other GEMM shapes)."""
    flat, padded = tmp_path / "flat", tmp_path / "padded"
    loop.train(config(flat, "evaluate=false", "steps=3"))
    loop.train(config(padded, "evaluate=false", "steps=3", "data.flatten=false"))
    a, b = losses(flat), losses(padded)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        for x, y in zip(a[step], b[step]):
            assert abs(x - y) <= 1e-4 * abs(y), (step, a[step], b[step])


def test_fused_norms_train_like_transformers_layers(tmp_path):
    """fused_norms=true (residual adds folded into the norms) runs the same steps: the same
    losses up to float rounding (the norms' backward sums in another order)."""
    fused, plain = tmp_path / "fused", tmp_path / "plain"
    loop.train(config(fused, "evaluate=false", "steps=3", "fused_norms=true"))
    loop.train(config(plain, "evaluate=false", "steps=3"))
    a, b = losses(fused), losses(plain)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        for x, y in zip(a[step], b[step]):
            assert abs(x - y) <= 1e-4 * abs(y), (step, a[step], b[step])


def test_ctrl_c_saves_a_checkpoint(tmp_path, monkeypatch):
    real_step, calls = loop.train_step, []

    def interrupted_at_third(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(loop, "train_step", interrupted_at_third)
    result = loop.train(config(tmp_path, "save_every=100"))
    assert result["interrupted"] and result["step"] == 2
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-2"]


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, capsys):
    code = loop.main(SMALL + [f"out_dir={tmp_path}", "model.text_weight=nan"])
    assert code == 1
    assert "non-finite loss" in capsys.readouterr().err
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_save_false_writes_no_checkpoint_and_no_export(tmp_path):
    result = loop.train(config(tmp_path, "save=false", "evaluate=false", "steps=3"))
    assert result["step"] == 3 and "export" not in result
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "export").exists()
    assert sorted(losses(tmp_path)) == [1, 2, 3]
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_vocab_size_sizes_a_preset_llm_and_is_checked(tmp_path):
    model = loop.build_model(config(tmp_path, "model.vocab_size=1000"))
    assert model.llm.get_input_embeddings().weight.shape[0] == 1024  # rounded up to the vocab multiple
    assert model.config.text_vocab_size == len(model.tokenizer) < 1000
    with pytest.raises(ValueError, match="model.vocab_size"):
        loop.build_model(config(tmp_path, "model.vocab_size=5"))
    with pytest.raises(ValueError, match="model.vocab_size"):
        resolve_config("tiny", overrides=["model.vocab_size=-1"])


def test_benchmark_presets_have_llama3_shapes():
    for name, hidden in (("bench-1b", 2048), ("bench-8b", 4096)):
        c = resolve_config(name)
        assert c.model.vocab_size == 128256 and c.data.budget == 4096
        assert presets.llm_config(c.model.llm).hidden_size == hidden
    eight = resolve_config("bench-8b")
    assert not eight.save and eight.activation_checkpointing and not eight.evaluate


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="optim.lr"):
        resolve_config("tiny", overrides=["optim.lrr=1"])
    with pytest.raises(ValueError, match="stage"):
        resolve_config("tiny", overrides=["stage=stage3"])
    with pytest.raises(ValueError, match="unknown preset"):
        resolve_config("huge")
    assert resolve_config("paper-stage2").optim.lr == pytest.approx(6.93e-5)


def test_stage1_trains_only_adapter_and_vision_head(tmp_path):
    model = loop.build_model(config(tmp_path))
    loop.set_trainable(model, "stage1")
    trainable = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"adapter.0", "adapter.2", "heads.vision_head"}


def test_two_ranks_match_one_for_the_same_global_batch(tmp_path):
    """FSDP2 over 2 gloo ranks (CPU) with 1 row each = 1 process with 2 rows. Without the preset's
    target noise: each rank draws it from its own RNG stream, so its draws cannot equal one
    process's."""
    import subprocess
    import sys

    common = SMALL + ["steps=3", "evaluate=false", "model.dtype=float32", "data.shapes_size=40", "device=cpu",
                      "model.target_noise=0"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "vpit_fast.train",
           *common, "data.batch_size=1", f"out_dir={tmp_path / 'two'}"]
    one = [sys.executable, "-m", "vpit_fast.train", *common, "data.batch_size=2", f"out_dir={tmp_path / 'one'}"]
    for command in (two, one):
        subprocess.run(command, check=True, env=env, capture_output=True, timeout=300)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        for x, y in zip(a[step], b[step]):
            assert abs(x - y) <= 1e-5 * abs(x), (step, a[step], b[step])


def test_missing_image_files_are_reported_not_encoded(tmp_path):
    """A record whose image file is missing is left out with the dataset's counted warning; it is
    never trained on blank tokens."""
    from vpit_fast.data import ShapesDataset
    from vpit_fast.train.parallel import setup_runtime

    data = ShapesDataset(size=20, image_size=108)
    data.save_images(tmp_path / "images")
    data.write_jsonl(tmp_path / "train.jsonl")
    missing = data[0]["image"][0]
    (tmp_path / "images" / f"{missing}.png").unlink()
    cfg = config(tmp_path / "run", "data.source=" + str(tmp_path / "train.jsonl"),
                 "data.image_root=" + str(tmp_path / "images"))
    model = loop.build_model(cfg)
    with pytest.warns(UserWarning, match="missing"):
        train_set, _, _ = loop.build_data(cfg, model, setup_runtime("cpu"))
    assert train_set.skipped["missing_image"] >= 1
    assert all(f"{missing}.png" not in s.image_keys for s in train_set.samples)


def test_standardized_tokens_are_exported_and_re_encoded_when_they_change(tmp_path):
    """The tiny preset standardises its visual tokens: the precomputed set, the export's encoder
    and a fresh encoding agree; a run with other token settings in the same folder re-encodes
    instead of reusing tokens of another space."""
    from vpit_fast.data import ShapesDataset
    from vpit_fast.visual_tokens import load_precomputed

    assert resolve_config("tiny").model.standardize_visual
    loop.train(config(tmp_path, "evaluate=false", "steps=1"))
    model = VPiTModel.from_pretrained(tmp_path / "export")
    assert model.config.standardize_visual and model.visual.standardized
    tokens = load_precomputed(tmp_path / "visual_tokens")
    assert tokens.standardization == model.visual.standardization_digest() is not None
    key = next(iter(tokens.keys()))
    picture = ShapesDataset(image_size=108).image(key)
    torch.testing.assert_close(tokens[key], model.visual.encode_images([picture])[0])

    loop.train(config(tmp_path, "evaluate=false", "steps=1", "model.standardize_visual=false"))
    raw = load_precomputed(tmp_path / "visual_tokens")
    assert raw.standardization is None
    unstandardized = VPiTModel.from_pretrained(tmp_path / "export")
    assert not unstandardized.visual.standardized
    torch.testing.assert_close(raw[key], unstandardized.visual.encode_images([picture])[0])


def test_shapes_tasks_weigh_the_train_mix_only(tmp_path):
    cfg = config(tmp_path, "data.shapes_tasks=[text_to_image,image_qa,text_to_image]", "data.shapes_size=6")
    train, held_out, _ = loop.records_and_images(cfg)
    assert [r["task"] for r in train] == ["text_to_image", "image_qa", "text_to_image"] * 2
    assert {r["task"] for r in held_out} == {"image_qa", "text_to_image", "image_editing", "visual_thinking",
                                             "video_qa", "frame_prediction", "frame_reordering"}
    with pytest.raises(ValueError, match="tasks"):
        loop.records_and_images(config(tmp_path, "data.shapes_tasks=[drawing]"))


def test_condition_dropout_and_target_noise_reach_the_run(tmp_path):
    """data.uncond_fraction empties that fraction of the train text-to-image prompts (the held-out
    split keeps its prompts); model.target_noise reaches the exported VPiTConfig; bad values are
    refused with the key's name."""
    cfg = config(tmp_path, "data.uncond_fraction=0.5", "model.target_noise=2.0", "data.shapes_size=40")
    loop.train(cfg)
    assert VPiTModel.from_pretrained(tmp_path / "export").config.target_noise == 2.0
    for bad in ("data.uncond_fraction=1.5", "model.target_noise=-1"):
        with pytest.raises(ValueError, match=bad.split("=")[0]):
            config(tmp_path, bad)



def test_one_gpu_export_writes_the_fp32_master_weights(tmp_path):
    """vpit-train on one GPU trains bf16 parameters with fp32 masters: the export must carry the
    masters (not their bf16 rounding), through the plain-model path, on any device."""
    from vpit_fast.train.master_adamw import MasterWeightAdamW
    from vpit_fast.train.optim import build_optimizer
    from vpit_fast.train.parallel import Runtime

    model = loop.build_model(config(tmp_path)).to(torch.bfloat16)
    optimizer = build_optimizer(model, 1e-3)
    assert isinstance(optimizer, MasterWeightAdamW)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    runtime = Runtime(0, 1, 0, torch.device("cpu"), distributed=False, fsdp=False)
    loop.export_model(model, tmp_path / "export", runtime, optimizer)
    exported = dict(VPiTModel.from_pretrained(tmp_path / "export").named_parameters())
    for name, p in model.named_parameters():
        if name.startswith("visual."):
            continue
        master = optimizer.master_of(p)
        assert exported[name].dtype == torch.float32, name
        assert torch.equal(exported[name], master), name
        assert not torch.equal(master, p.detach().float()), name  # rounding happened: the test can fail
