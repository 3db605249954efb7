"""VisualTokens: a tiny SigLIP tower saved and loaded through transformers' real loading code,
compared with the official MetaMorph computation (hidden_states[layer] -> the pure-PyTorch
interpolation reference); frozen-ness, image encoding, precomputed shards, standardisation (fit,
save/load, precompute), bad input."""

import json
import os
import pickle

import pytest
import torch
from transformers import SiglipVisionModel

from vpit_fast.data.shapes import ShapesDataset
from vpit_fast.ops import reference
from vpit_fast.visual_tokens import VisualTokens, load_precomputed, tiny_siglip_config


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    """A tiny tower (27x27 patch grid) and a SigLIP image processor saved with save_pretrained."""
    path = tmp_path_factory.mktemp("tiny_siglip")
    torch.manual_seed(0)
    SiglipVisionModel(tiny_siglip_config()).save_pretrained(path)
    VisualTokens.from_config(tiny_siglip_config()).processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def dataset():
    return ShapesDataset(size=8, image_size=108)


def official(model, pixel_values, layer=-2, out_size=(8, 8), normalize=False):
    """The MetaMorph path, written out: penultimate (or chosen) hidden states -> 27x27 grid ->
    bilinear resampling in fp32 (the pure-PyTorch reference)."""
    with torch.no_grad():
        hidden = model(pixel_values, output_hidden_states=True).hidden_states[layer]
    return reference.interpolate_tokens(hidden, out_size, (27, 27), normalize)


@pytest.mark.parametrize("layer, out_size, normalize", [
    (-2, (8, 8), False), (-2, (8, 8), True), (-1, (8, 8), False), (-2, (16, 16), True), (0, (8, 8), False)])
def test_matches_official_path(tower_dir, layer, out_size, normalize):
    tokens = VisualTokens.from_pretrained(tower_dir, layer=layer, out_size=out_size, normalize=normalize)
    manual = SiglipVisionModel.from_pretrained(tower_dir).eval()
    pixel_values = torch.randn(3, 3, 108, 108)
    out = tokens(pixel_values)
    assert out.shape == (3, out_size[0] * out_size[1], 32) and out.dtype == torch.float32
    torch.testing.assert_close(out, official(manual, pixel_values, layer, out_size, normalize), atol=1e-5, rtol=1e-5)
    if normalize:
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(3, out.shape[1]))
    assert (tokens.hidden_size, tokens.num_tokens) == (32, out_size[0] * out_size[1])
    assert tokens.in_grid == (27, 27) and tokens.out_grid == out_size


def test_loaded_processor_and_bf16(tower_dir):
    tokens = VisualTokens.from_pretrained(tower_dir, dtype=torch.bfloat16)
    assert tokens.processor.size["height"] == 108
    out = tokens(torch.randn(2, 3, 108, 108))  # fp32 input is cast to the tower's dtype
    assert out.shape == (2, 64, 32) and out.dtype == torch.bfloat16


def test_processor_built_when_missing(tmp_path):
    SiglipVisionModel(tiny_siglip_config()).save_pretrained(tmp_path)  # no preprocessor_config.json
    tokens = VisualTokens.from_pretrained(str(tmp_path))
    assert tokens.processor.size == {"height": 108, "width": 108}


def test_frozen(tower_dir):
    tokens = VisualTokens.from_pretrained(tower_dir)
    parent = torch.nn.Sequential(tokens, torch.nn.Linear(32, 4))
    parent.train()
    assert not any(p.requires_grad for p in tokens.parameters())
    assert not any(m.training for m in tokens.tower.modules())
    out = tokens(torch.randn(2, 3, 108, 108))
    assert not out.requires_grad and out.grad_fn is None
    # The tokens still feed a trainable module's backward (no_grad, not inference_mode).
    parent[1](out).sum().backward()
    assert parent[1].weight.grad is not None


def test_encode_images_matches_manual(tower_dir, dataset):
    tokens = VisualTokens.from_pretrained(tower_dir)
    images = [dataset.image(k) for k in dataset.image_keys()[:5]]
    out = tokens.encode_images(images, batch_size=2)  # batches of 2, 2, 1
    pixel_values = tokens.processor(images=images, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (5, 3, 108, 108)
    expected = official(SiglipVisionModel.from_pretrained(tower_dir).eval(), pixel_values)
    assert out.shape == (5, 64, 32) and out.device.type == "cpu"
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert tokens.encode_images([]).shape == (0, 64, 32)


def test_precompute_round_trip(tower_dir, dataset, tmp_path):
    tokens = VisualTokens.from_pretrained(tower_dir, normalize=True)
    keys = dataset.image_keys()[:7]
    store = tokens.precompute(keys, dataset.image, tmp_path, shard_size=4, batch_size=3, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["index.json", "tokens-00000.safetensors", "tokens-00001.safetensors"]

    loaded = load_precomputed(tmp_path)
    assert len(loaded) == 7 and list(loaded.keys()) == keys and keys[6] in loaded
    expected = tokens.encode_images([dataset.image(k) for k in keys])
    for i, key in enumerate(keys):
        assert loaded[key].shape == (64, 32)
        torch.testing.assert_close(loaded[key], expected[i])
    with pytest.raises(KeyError):
        loaded["no-such-key"]

    index = json.loads((tmp_path / "index.json").read_text())
    assert index["keys"][keys[5]] == [1, 1]
    assert (index["name_or_path"], index["layer"], index["normalize"]) == (tower_dir, -2, True)
    assert index["in_grid"] == [27, 27] and index["out_grid"] == [8, 8] and index["dtype"] == "float32"
    assert index["config"]["hidden_size"] == 32 and index["config"]["patch_size"] == 4
    assert (loaded.layer, loaded.out_grid, loaded.normalize, loaded.num_tokens) == (-2, (8, 8), True, 64)

    # Picklable for DataLoader workers: the copy reopens the shards.
    torch.testing.assert_close(pickle.loads(pickle.dumps(loaded))[keys[6]], expected[6])


# ---- standardisation ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def standardized_dir(tower_dir, tmp_path_factory):
    """The tiny tower with statistics fitted on 16 shapes images, saved with save_pretrained."""
    data = ShapesDataset(size=40, image_size=108)
    tokens = VisualTokens.from_pretrained(tower_dir).fit_standardization([data.image(k) for k in data.image_keys()[:16]])
    path = tmp_path_factory.mktemp("standardized")
    tokens.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("normalize", [False, True])
def test_standardization_fits_and_applies(tower_dir, dataset, normalize):
    data = ShapesDataset(size=40, image_size=108)
    fit_images = [data.image(k) for k in data.image_keys()[:16]]
    raw = VisualTokens.from_pretrained(tower_dir).encode_images(fit_images)
    tokens = VisualTokens.from_pretrained(tower_dir, normalize=normalize).fit_standardization(fit_images)
    assert tokens.standardized and tokens.normalize == normalize  # fitting leaves normalize as it was
    mean, std = raw.reshape(-1, 32).mean(0), raw.reshape(-1, 32).std(0)
    torch.testing.assert_close(tokens.token_mean, mean)
    torch.testing.assert_close(tokens.token_std, std)
    # On the fitting images: zero mean and unit std in every channel.
    out = tokens.encode_images(fit_images)
    if normalize:  # L2 normalisation comes after the standardisation
        torch.testing.assert_close(out, torch.nn.functional.normalize((raw - mean) / std, dim=-1), atol=1e-5, rtol=1e-5)
    else:
        torch.testing.assert_close(out, (raw - mean) / std, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.reshape(-1, 32).mean(0), torch.zeros(32), atol=1e-4, rtol=0)
        torch.testing.assert_close(out.reshape(-1, 32).std(0), torch.ones(32), atol=1e-4, rtol=0)
    # It removes what images share: raw tokens of different images point the same way, these do not.
    def mean_pair_cosine(t):
        flat = torch.nn.functional.normalize(t.reshape(len(t), -1), dim=-1)
        return float((flat @ flat.T)[~torch.eye(len(t), dtype=torch.bool)].mean())
    assert mean_pair_cosine(raw) > 0.7 > 0.5 > mean_pair_cosine(out)
    tokens.clear_standardization()
    torch.testing.assert_close(tokens.encode_images(fit_images[:2]),
                               torch.nn.functional.normalize(raw[:2], dim=-1) if normalize else raw[:2])


def test_standardization_round_trip(tower_dir, standardized_dir, dataset):
    loaded = VisualTokens.from_pretrained(standardized_dir)
    assert loaded.standardized and not VisualTokens.from_pretrained(tower_dir).standardized
    images = [dataset.image(k) for k in dataset.image_keys()[:3]]
    raw = VisualTokens.from_pretrained(tower_dir).encode_images(images)
    torch.testing.assert_close(loaded.encode_images(images), (raw - loaded.token_mean) / loaded.token_std)
    again = VisualTokens.from_pretrained(standardized_dir)
    assert again.standardization_digest() == loaded.standardization_digest() is not None
    assert VisualTokens.from_pretrained(tower_dir).standardization_digest() is None
    bf16 = VisualTokens.from_pretrained(standardized_dir, dtype=torch.bfloat16)
    assert bf16.token_mean.dtype == torch.float32 and bf16(torch.randn(1, 3, 108, 108)).dtype == torch.bfloat16


def test_precompute_records_the_standardization(standardized_dir, dataset, tmp_path):
    tokens = VisualTokens.from_pretrained(standardized_dir)
    keys = dataset.image_keys()[:3]
    loaded = tokens.precompute(keys, dataset.image, tmp_path, progress=False)
    assert loaded.standardization == tokens.standardization_digest()
    expected = tokens.encode_images([dataset.image(k) for k in keys])
    torch.testing.assert_close(torch.stack([loaded[k] for k in keys]), expected)


def test_bad_standardization():
    tokens = VisualTokens.from_config(tiny_siglip_config())
    with pytest.raises(ValueError, match="shape \\[32\\]"):
        tokens.set_standardization(torch.zeros(64, 32), torch.ones(32))
    with pytest.raises(ValueError, match="positive"):
        tokens.set_standardization(torch.zeros(32), torch.zeros(32))
    with pytest.raises(ValueError, match="at least 2 images"):
        tokens.fit_standardization([ShapesDataset(size=1, image_size=108).image("circle-red-small-center")])


@pytest.mark.parametrize("shape", [(3, 108, 108), (2, 3, 108, 108, 1), (2, 1, 108, 108), (2, 4, 108, 108),
                                   (2, 3, 96, 96)])
def test_bad_pixel_values(shape):
    tokens = VisualTokens.from_config(tiny_siglip_config())
    with pytest.raises(ValueError, match="pixel_values"):
        tokens(torch.randn(shape))


def test_image_size_not_a_multiple_of_the_patch_size():
    """SigLIP-so400m takes 384 px in patches of 14: its convolution makes a 27x27 grid and leaves
    2 px unused. Scaled down: 110 px in patches of 4 -> 27x27 as well."""
    tokens = VisualTokens.from_config(tiny_siglip_config(image_size=110))
    pixels = torch.randn(2, 3, 110, 110)
    hidden = tokens.tower(pixels, output_hidden_states=True).hidden_states[-2]
    assert hidden.shape[1] == 27 * 27
    want = reference.interpolate_tokens(hidden, out_size=(8, 8), in_size=(27, 27))
    assert torch.allclose(tokens(pixels), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="smaller than patch_size"):
        VisualTokens.from_config(tiny_siglip_config(image_size=3))


@pytest.mark.parametrize("layer", [3, -4, 1.5])
def test_bad_layer(layer):
    # 2 layers: hidden_states holds 3 entries, so valid indices are -3..2.
    with pytest.raises(ValueError, match="layer"):
        VisualTokens.from_config(tiny_siglip_config(), layer=layer)


def test_bad_precompute_keys(tmp_path):
    tokens = VisualTokens.from_config(tiny_siglip_config())
    with pytest.raises(ValueError, match="distinct"):
        tokens.precompute(["a", "a"], None, tmp_path, progress=False)


def test_tiny_local_tower_makes_local_tokens():
    """The tiny train preset's tower ("tiny-local") must make local tokens: a small shape in the top
    left leaves the bottom-right tokens exactly as on a blank picture. The 2-layer "tiny" tower's
    attention spreads the shape into every token (why the tiny preset does not use it)."""
    from PIL import Image

    from vpit_fast import presets
    from vpit_fast.data.shapes import Scene, Shape, render

    blank = Image.new("RGB", (108, 108), (255, 255, 255))
    shape = render(Scene((Shape("circle", "red", "small", "top left"),)), 108)
    far = [r * 8 + c for r in range(5, 8) for c in range(5, 8)]
    for name, local in (("tiny-local", True), ("tiny", False)):
        torch.manual_seed(0)
        tokens = VisualTokens.from_config(presets.encoder_config(name)).encode_images([blank, shape])
        change = (tokens[1] - tokens[0]).norm(dim=-1) / tokens[0].norm(dim=-1)
        near = change[[r * 8 + c for r in range(1, 3) for c in range(1, 3)]]
        assert float(near.max()) > 0.05, name  # the shape itself is seen
        if local:
            assert float(change[far].max()) < 1e-5, name
        else:
            assert float(change[far].min()) > 1e-3, name
