"""The embedded default's visualizer path end to end, on the CPU with tiny models built from configs
(nothing is downloaded): a VPiT checkpoint saved and loaded by the real code -> the "tiny-cpu"
visualizer trained on the tokens of that checkpoint's own encoder (its loss falls; held-out
pictures are checked) -> `vpit-generate --visualizer ... --check` writes PNGs."""

import json
import math

import pytest
import torch

pytest.importorskip("diffusers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from vpit_fast.data import build_tokenizer  # noqa: E402
from vpit_fast.data.shapes import render  # noqa: E402
from vpit_fast.model import VPiTConfig, VPiTModel  # noqa: E402
from vpit_fast.visual_tokens import VisualTokens, load_precomputed, tiny_siglip_config  # noqa: E402
from vpit_fast.visualizer import Visualizer  # noqa: E402
from vpit_fast.visualizer.evaluate import held_out_keys  # noqa: E402
from vpit_fast.visualizer.presets import preset  # noqa: E402
from vpit_fast.visualizer.train import TRAIN_PRESETS, resolve_config, train_visualizer  # noqa: E402

PROMPT = "Generate an image of a red circle"
RESPONSE = "here is an image based on your request: <image_start>"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny VPiT model with the tiny SigLIP encoder, written by `save_pretrained`."""
    tokenizer = build_tokenizer()
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    model = VPiTModel.from_base(llm, tokenizer, VisualTokens.from_config(tiny_siglip_config()), VPiTConfig())
    directory = tmp_path_factory.mktemp("vpit") / "export"
    model.save_pretrained(directory)
    return directory


def test_tiny_cpu_preset_is_the_small_pixel_space_visualizer():
    config = TRAIN_PRESETS["tiny-cpu"]
    assert config.model == "tiny-cpu" and config.encoder == "runs/tiny/export"
    assert config.out_dir == "runs/tiny/visualizer" and config.check_count == 72
    shapes = preset("tiny-cpu")
    assert shapes["image_size"] == 24 and shapes["vae"] is None
    visualizer = Visualizer.from_preset("tiny-cpu", 32)
    assert sum(p.numel() for p in visualizer.parameters()) < 0.4e6  # a quarter of "tiny"


def test_trains_on_the_checkpoints_tokens_and_generate_writes_checked_pngs(checkpoint, tmp_path, capsys):
    run = tmp_path / "visualizer"
    config = resolve_config("tiny-cpu", overrides=[
        f"encoder={checkpoint}", f"out_dir={run}", "shapes_size=40", "check_count=24", "batch_size=16", "steps=30",
        "warmup_steps=5", "sample_count=2", "sample_steps=2", "progress=false", "device=cpu", "seed=0"])
    result = train_visualizer(config)

    losses = result["losses"]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)

    # The tokens are exactly what the checkpoint's own encoder (loaded by VPiTModel) makes.
    encoder = VPiTModel.from_pretrained(checkpoint).visual
    tokens = load_precomputed(run / "visual_tokens")
    check_keys = held_out_keys(24)
    key = check_keys[0]
    torch.testing.assert_close(tokens[key], encoder.encode_images([render(key, encoder.tower.config.image_size)])[0])

    # The held-out pictures were never trained on, and the check reports on all of them.
    check = json.loads((run / "check.json").read_text())
    assert check == result["check"] and check["count"] == 24 and 0.0 <= check["both"] <= 1.0
    assert check["truth_kind"] == check["truth_color"] == 1.0  # the checker on ground-truth renders
    assert result["train_seconds"] > 0

    from vpit_fast.generate_cli import main

    out = tmp_path / "out"
    capsys.readouterr()
    code = main([PROMPT, "--checkpoint", str(checkpoint), "--visualizer", str(run), "--out-dir", str(out), "--check",
                 "--response-prefix", RESPONSE, "--max-new-tokens", "70", "--max-images", "1", "--decode-steps",
                 "2", "--device", "cpu", "--dtype", "float32"])
    assert code == 0
    from PIL import Image

    with Image.open(out / "image_0.png") as picture:
        assert picture.size == (24, 24)
    err = capsys.readouterr().err
    assert "check image_0: shows" in err and "asked red circle" in err


def test_stale_tokens_of_another_encoder_are_not_reused(checkpoint, tmp_path):
    """A second run in the same out_dir with another encoder re-encodes instead of training on
    the first encoder's tokens."""
    common = [f"out_dir={tmp_path / 'run'}", "shapes_size=40", "check_count=0", "batch_size=16", "steps=1",
              "sample_count=0", "progress=false", "device=cpu"]
    train_visualizer(resolve_config("tiny-cpu", overrides=[f"encoder={checkpoint}", *common]))
    before = load_precomputed(tmp_path / "run" / "visual_tokens")
    key = next(iter(before.keys()))
    stored = before[key].clone()
    # The "tiny" preset encoder, built from seed 123, has other random weights than the checkpoint's.
    train_visualizer(resolve_config("tiny-cpu", overrides=["encoder=tiny", "seed=123", *common]))
    after = load_precomputed(tmp_path / "run" / "visual_tokens")
    assert not torch.allclose(after[key], stored)


def test_missing_export_directory_says_what_to_do(tmp_path):
    config = resolve_config("tiny-cpu", overrides=[f"encoder={tmp_path / 'runs' / 'tiny' / 'export'}",
                                                   f"out_dir={tmp_path / 'run'}", "progress=false"])
    with pytest.raises(FileNotFoundError, match="vpit-train"):
        train_visualizer(config)
