"""The diffusion visualizer: projector, conditioning and guidance, training (the loss falls),
sampling, persistence, loading a Stable-Diffusion-shaped directory, the paper's schedule and
input checks. Tiny shapes on the CPU; nothing is downloaded."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel  # noqa: E402

from vpit_fast.train.overrides import ConfigError  # noqa: E402
from vpit_fast.visualizer import LogWarmupLinearDecay, TokenProjector, Visualizer  # noqa: E402
from vpit_fast.visualizer.schedule import build_scheduler  # noqa: E402
from vpit_fast.visualizer.train import TRAIN_PRESETS, resolve_config, train_visualizer  # noqa: E402

DV, T = 24, 16  # token width and count of the hand-built visualizers (the trained one uses the tiny SigLIP's)


def tiny_visualizer(image_size=16, num_tokens=T):
    return Visualizer.from_preset("tiny", DV, num_tokens=num_tokens, image_size=image_size, projector_hidden_dim=48)


def manual_ddim(visualizer, tokens, steps, guidance_scale, seed):
    """Reference sampler written from the diffusers parts, for comparison with `decode`."""
    sampler = visualizer.sampler()
    sampler.set_timesteps(steps)
    cond = visualizer.projector(tokens)
    null = visualizer.null_condition.expand_as(cond)
    shape = (tokens.shape[0], 3, visualizer.image_size, visualizer.image_size)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    for t in sampler.timesteps:
        pred = pred_cond = visualizer.unet(x, t, encoder_hidden_states=cond).sample
        if guidance_scale != 1.0:
            pred_null = visualizer.unet(x, t, encoder_hidden_states=null).sample
            pred = pred_null + guidance_scale * (pred_cond - pred_null)
        x = sampler.step(pred, t, x).prev_sample
    return x.clamp(-1, 1)


# ---- projector ------------------------------------------------------------------------------

def test_projector_shapes_and_final_layernorm():
    projector = TokenProjector(DV, 40, hidden_dim=64)
    out = projector(torch.randn(3, T, DV, dtype=torch.float64))
    assert out.shape == (3, T, 40) and out.dtype == torch.float32
    # the last layer is a LayerNorm (default affine): every token has mean 0 and variance 1
    torch.testing.assert_close(out.mean(-1), torch.zeros(3, T), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(3, T), atol=1e-3, rtol=0)
    layers = [type(m).__name__ for m in projector.net]
    assert layers == ["Linear", "LayerNorm", "ReLU", "Linear", "LayerNorm"]
    assert projector.net[0].out_features == 64 and TokenProjector(DV, 768).net[0].out_features == 2048


def test_projector_rejects_bad_input():
    projector = TokenProjector(DV, 40, hidden_dim=64)
    with pytest.raises(ValueError, match="visual_dim=24"):
        projector(torch.randn(2, T, DV + 1))
    with pytest.raises(ValueError, match=r"\[B, T, 24\]"):
        projector(torch.randn(T, DV))
    with pytest.raises(ValueError, match="hidden_dim"):
        TokenProjector(DV, 40, hidden_dim=0)


# ---- schedule -------------------------------------------------------------------------------

def test_log_warmup_linear_decay_schedule():
    schedule = LogWarmupLinearDecay(2000, 12000)
    assert schedule(0) == pytest.approx(math.log(2) / math.log(2001))  # first step: not zero
    assert schedule(999) == pytest.approx(math.log(1001) / math.log(2001))
    assert schedule(1999) == pytest.approx(1.0)  # the 2000th step is at the peak
    assert schedule(2000 + 5999) == pytest.approx(0.5)
    assert schedule(13999) == pytest.approx(0.0) and schedule(20000) == 0.0
    values = [schedule(s) for s in range(0, 14000, 50)]
    assert all(a < b for a, b in zip(values[:40], values[1:40]))  # rising through the warm-up
    assert all(a >= b for a, b in zip(values[40:], values[41:]))  # then falling

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.1e-5)
    scheduler = build_scheduler(optimizer, 2, 4)
    lrs = []
    for _ in range(7):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [1.1e-5 * v for v in (math.log(2) / math.log(3), 1.0, 0.75, 0.5, 0.25, 0.0, 0.0)]
    assert lrs == pytest.approx(expected)
    with pytest.raises(ValueError, match="warmup_steps"):
        LogWarmupLinearDecay(-1, 10)


def test_paper_preset_matches_the_paper():
    paper = TRAIN_PRESETS["paper"]
    assert (paper.lr, tuple(paper.betas), paper.weight_decay) == (1.1e-5, (0.9, 0.999), 0.01)
    assert (paper.warmup_steps, paper.decay_steps, paper.total_steps) == (2000, 12000, 14000)
    assert paper.batch_size * paper.grad_accum == 2112 and paper.model == "sd15"
    with pytest.raises(ConfigError):
        resolve_config("tiny", overrides=["no_such_key=1"])
    with pytest.raises(ValueError, match="cond_dropout"):
        resolve_config("tiny", overrides=["cond_dropout=1.5"])


# ---- conditioning, loss, input checks ---------------------------------------------------------

def test_condition_dropout_uses_the_null_context():
    visualizer = tiny_visualizer()
    with torch.no_grad():
        visualizer.null_condition.normal_()
    tokens = torch.randn(4, T, DV)
    drop = torch.tensor([True, False, True, False])
    context = visualizer.condition(tokens, drop)
    assert torch.equal(context[0], visualizer.null_condition) and torch.equal(context[2], visualizer.null_condition)
    torch.testing.assert_close(context[1::2], visualizer.projector(tokens[1::2]))

    images = torch.rand(4, 3, 16, 16) * 2 - 1
    def loss(tokens, dropout):
        return visualizer.training_loss(images, tokens, cond_dropout=dropout,
                                        generator=torch.Generator().manual_seed(0)).item()
    other = torch.randn(4, T, DV)
    assert loss(tokens, 1.0) == loss(other, 1.0)  # every context dropped: the tokens do not matter
    assert loss(tokens, 0.0) != loss(other, 0.0)


def test_bad_inputs_raise_clear_errors():
    visualizer = tiny_visualizer()
    images = torch.zeros(2, 3, 16, 16)
    with pytest.raises(ValueError, match=rf"\[B, {T}, {DV}\]"):
        visualizer.training_loss(images, torch.randn(2, T, DV + 8))  # wrong Dv
    with pytest.raises(ValueError, match=rf"\[B, {T}, {DV}\]"):
        visualizer.training_loss(images, torch.randn(2, T + 1, DV))  # wrong token count
    with pytest.raises(ValueError, match="images hold 2"):
        visualizer.training_loss(images, torch.randn(3, T, DV))
    with pytest.raises(ValueError, match=r"images must be a \[B, 3, 16, 16\]"):
        visualizer.training_loss(torch.zeros(2, 3, 32, 32), torch.randn(2, T, DV))
    with pytest.raises(ValueError, match="cond_dropout"):
        visualizer.training_loss(images, torch.randn(2, T, DV), cond_dropout=-0.1)
    with pytest.raises(ValueError, match="visual_tokens must be"):
        visualizer.decode(torch.randn(T, DV), steps=1)
    with pytest.raises(ValueError, match="float"):
        visualizer.decode(torch.zeros(1, T, DV, dtype=torch.int64), steps=1)
    with pytest.raises(ValueError, match="output_type"):
        visualizer.decode(torch.randn(1, T, DV), steps=1, output_type="np")
    with pytest.raises(ValueError, match="image_size must be a positive multiple of 2"):
        tiny_visualizer(image_size=15)
    with pytest.raises(ValueError, match="cross_attention_dim"):
        Visualizer(visualizer.unet, TokenProjector(DV, 32, 48), visualizer.scheduler)
    with pytest.raises(ValueError, match="unknown visualizer preset"):
        Visualizer.from_preset("huge", DV)


# ---- sampling -------------------------------------------------------------------------------

def test_decode_returns_pictures_and_guidance_is_exact():
    visualizer = tiny_visualizer().eval()
    with torch.no_grad():
        visualizer.null_condition.normal_()
    tokens = torch.randn(3, T, DV)
    pictures = visualizer.decode(tokens, steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(1))
    assert len(pictures) == 3
    assert all(p.size == (16, 16) and p.mode == "RGB" for p in pictures)

    with torch.no_grad():
        for scale in (1.0, 3.0):  # 1.0: unguided (the conditional prediction alone)
            got = visualizer.decode(tokens, steps=3, guidance_scale=scale, output_type="pt",
                                    generator=torch.Generator().manual_seed(7))
            torch.testing.assert_close(got, manual_ddim(visualizer, tokens, 3, scale, seed=7), atol=1e-4, rtol=0)
        unguided = visualizer.decode(tokens, steps=3, guidance_scale=1.0, output_type="pt",
                                     generator=torch.Generator().manual_seed(7))
        guided = visualizer.decode(tokens, steps=3, guidance_scale=3.0, output_type="pt",
                                   generator=torch.Generator().manual_seed(7))
    assert not torch.allclose(unguided, guided)


class OraclePrediction(torch.nn.Module):
    """Stands in for the UNet: the exact noise or velocity prediction for a data set of one image
    ``x0``, whatever the context."""

    def __init__(self, unet, scheduler, x0):
        super().__init__()
        self.config, self.dtype, self.scheduler, self.x0 = unet.config, torch.float32, scheduler, x0

    def forward(self, x, t, encoder_hidden_states=None):
        a = self.scheduler.alphas_cumprod[int(t)].double()
        eps = (x.double() - a.sqrt() * self.x0) / (1 - a).sqrt()
        if self.scheduler.config.prediction_type == "v_prediction":
            eps = a.sqrt() * eps - (1 - a).sqrt() * self.x0
        return SimpleNamespace(sample=eps.float())


@pytest.mark.parametrize("prediction_type", ["v_prediction", "epsilon"])
def test_sampler_recovers_the_image_from_exact_predictions(prediction_type):
    from diffusers import DDPMScheduler

    visualizer = tiny_visualizer()
    visualizer.scheduler = DDPMScheduler.from_config(visualizer.scheduler.config, prediction_type=prediction_type)
    x0 = (torch.rand(1, 3, 16, 16, dtype=torch.float64) * 2 - 1)
    visualizer.unet = OraclePrediction(visualizer.unet, visualizer.scheduler, x0)
    for steps, guidance in ((4, 1.0), (25, 3.0)):
        out = visualizer.decode(torch.randn(1, T, DV), steps=steps, guidance_scale=guidance, output_type="pt",
                                generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out.double(), x0, atol=1e-4, rtol=0)


def test_save_load_round_trip_decodes_identically(tmp_path):
    visualizer = tiny_visualizer().eval()
    with torch.no_grad():
        visualizer.null_condition.normal_()
    visualizer.token_source = {"name_or_path": "tiny", "hidden_size": DV}
    visualizer.save_pretrained(tmp_path / "vis")
    config = json.loads((tmp_path / "vis" / "visualizer_config.json").read_text())
    assert config["pixel_space"] and config["visual_dim"] == DV and config["num_tokens"] == T
    loaded = Visualizer.from_pretrained(tmp_path / "vis").eval()
    assert loaded.token_source == visualizer.token_source and loaded.image_size == 16
    for (name, a), (_, b) in zip(visualizer.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    tokens = torch.randn(2, T, DV)
    first = visualizer.decode(tokens, steps=2, output_type="pt", generator=torch.Generator().manual_seed(3))
    second = loaded.decode(tokens, steps=2, output_type="pt", generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    with pytest.raises(FileNotFoundError, match="not a Visualizer directory"):
        Visualizer.from_pretrained(tmp_path)


# ---- Stable Diffusion layout -----------------------------------------------------------------

def write_tiny_stable_diffusion(root):
    """A directory laid out like runwayml/stable-diffusion-v1-5 in diffusers format (unet/, vae/,
    scheduler/ with SD's PNDM config), with tiny random weights."""
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=16)
    scheduler = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    unet.save_pretrained(root / "unet")
    vae.save_pretrained(root / "vae")
    scheduler.save_pretrained(root / "scheduler")
    return unet, vae


def test_from_stable_diffusion_loads_a_local_sd_directory(tmp_path):
    unet, vae = write_tiny_stable_diffusion(tmp_path / "sd")
    visualizer = Visualizer.from_stable_diffusion(tmp_path / "sd", visual_dim=DV, num_tokens=T, projector_hidden_dim=64)
    assert visualizer.image_size == 16 and visualizer.latent_size == 8  # sample_size 8, VAE factor 2
    assert visualizer.projector.cross_attention_dim == 32 and visualizer.projector.hidden_dim == 64
    for name, value in unet.state_dict().items():
        assert torch.equal(visualizer.unet.state_dict()[name], value), name
    for name, value in vae.state_dict().items():
        assert torch.equal(visualizer.vae.state_dict()[name], value), name
    config = visualizer.scheduler.config
    assert (config.beta_schedule, config.beta_end, config.clip_sample) == ("scaled_linear", 0.012, False)

    visualizer.train()
    assert not visualizer.vae.training  # the VAE stays frozen in eval mode
    loss = visualizer.training_loss(torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, T, DV))
    loss.backward()
    assert all(p.grad is None for p in visualizer.vae.parameters())
    assert visualizer.unet.conv_in.weight.grad is not None and visualizer.projector.net[0].weight.grad is not None
    pictures = visualizer.eval().decode(torch.randn(2, T, DV), steps=2, generator=torch.Generator().manual_seed(0))
    assert [p.size for p in pictures] == [(16, 16), (16, 16)]

    visualizer.save_pretrained(tmp_path / "vis")  # latent-space round trip keeps the VAE
    loaded = Visualizer.from_pretrained(tmp_path / "vis")
    assert loaded.vae is not None and torch.equal(loaded.vae.decoder.conv_out.weight, vae.decoder.conv_out.weight)
    with pytest.raises(FileNotFoundError, match="unet/config.json"):
        Visualizer.from_stable_diffusion(tmp_path / "nowhere", visual_dim=DV)


# ---- training -------------------------------------------------------------------------------

def test_training_loss_falls_on_shapes(tmp_path):
    """The tiny preset (tiny SigLIP tokens of shapes images, pixel-space UNet) for 30 steps."""
    config = resolve_config("tiny", overrides=[
        f"out_dir={tmp_path / 'run'}", "shapes_size=40", "batch_size=16", "steps=30", "warmup_steps=5",
        "sample_count=2", "sample_steps=2", "progress=false", "device=cpu", "seed=0"])
    result = train_visualizer(config)
    losses = result["losses"]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [10, 20, 30]
    assert (run / "samples.png").is_file() and (run / "config.yaml").is_file()
    saved = Visualizer.from_pretrained(result["visualizer"])
    assert saved.token_source["hidden_size"] == 32 and saved.num_tokens == 64  # the tiny SigLIP's 64 tokens

    # Continuing from the saved visualizer on the same precomputed tokens (as from a VPiT run).
    more = resolve_config("tiny", overrides=[
        f"out_dir={tmp_path / 'more'}", f"init={result['visualizer']}", f"tokens_dir={run / 'visual_tokens'}",
        "batch_size=16", "steps=2", "sample_count=0", "progress=false", "device=cpu"])
    again = train_visualizer(more)
    assert len(again["losses"]) == 2 and again["samples"] is None
    assert again["losses"][0] < first  # starts from the trained weights, not from scratch
