"""VPiTModel on tiny Hugging Face LLMs (LLaMA, Qwen2, Mistral) and a tiny SigLIP, saved and loaded
through the real transformers loading code: construction (image tokens, mean init, vocabulary
padding), the fused loss against an official-style reference (per-image loop, all logits, separate
cosine loss), gradients, save/load (with standardised visual tokens too), and bad inputs."""

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from vpit_fast.data import ShapesDataset, build_tokenizer, encode_all, pad_batch
from vpit_fast.model import VPiTConfig, VPiTModel
from vpit_fast.visual_tokens import VisualTokens, tiny_siglip_config

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
LLMS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("siglip")
    VisualTokens.from_config(tiny_siglip_config()).tower.save_pretrained(path)
    return path


def saved_llm(kind, vocab_size, path, **overrides):
    config_class, model_class = LLMS[kind]
    model_class(config_class(vocab_size=vocab_size, **{**SMALL, **overrides})).save_pretrained(path)
    return path


def build(kind, tokenizer, encoder_dir, tmp_path, config=None, **overrides):
    llm_dir = saved_llm(kind, len(tokenizer), tmp_path / f"{kind}-base", **overrides)
    return VPiTModel.from_base(llm_dir, tokenizer, str(encoder_dir), config, attn_implementation="sdpa")


def shapes_batch(model, tokenizer, size=6, seed=0):
    data = ShapesDataset(size=size, seed=seed, image_size=108)
    batch = pad_batch(encode_all([data[i] for i in range(size)], tokenizer), tokenizer.pad_token_id)
    images = [data.image(k) for k in batch["image_keys"]]
    batch["pixel_values"] = model.visual.processor(images=images, return_tensors="pt")["pixel_values"]
    return batch


def reference_loss(model, batch):
    """The official code's way: a Python loop over images to build the input embeddings, logits for
    every position, full-vocabulary cross-entropy over shifted response labels, a separate cosine
    loss on the vision head's predictions. float64 throughout."""
    llm, cfg = model.llm, model.config
    tokens = model.visual(batch["pixel_values"]).double()
    embeds = llm.get_input_embeddings().weight.double()[batch["input_ids"]].clone()
    n = cfg.num_visual_tokens
    adapter = [layer.double() if isinstance(layer, torch.nn.Linear) else layer for layer in model.adapter]
    for m in range(tokens.shape[0]):
        b, s = int(batch["image_batch_index"][m]), int(batch["image_slots"][m])
        x = tokens[m]
        for layer in adapter:
            x = layer(x)
        embeds[b, s:s + n] = x
    hidden = llm.base_model.double()(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                     position_ids=batch["position_ids"]).last_hidden_state
    logits = hidden[:, :-1] @ llm.get_output_embeddings().weight.double().t()
    text = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=-100)
    preds, targets = [], []
    vision_head = model.heads.vision_head.double()
    for m in torch.nonzero(batch["image_is_target"]).flatten().tolist():
        b, s = int(batch["image_batch_index"][m]), int(batch["image_slots"][m])
        preds.append(vision_head(hidden[b, s - 1:s - 1 + n]))
        targets.append(tokens[m])
    if preds:
        visual = (1 - F.cosine_similarity(torch.cat(preds), torch.cat(targets), dim=-1)).mean()
    else:
        visual = hidden.new_zeros(())
    return cfg.text_weight * text + cfg.visual_weight * visual, text, visual


def float64_copy(model):
    import copy

    return copy.deepcopy(model).double()


@pytest.mark.parametrize("kind", list(LLMS))
def test_construction_adds_tokens_and_pads_vocabulary(kind, tokenizer, encoder_dir, tmp_path):
    tokenizer = build_tokenizer()  # from_base adds tokens in place; keep the shared one intact
    tokenizer.add_tokens(["zebra"])  # a plain word beyond the LLM's rows
    llm_dir = saved_llm(kind, len(tokenizer) - 1, tmp_path / "base")
    original = LLMS[kind][1].from_pretrained(llm_dir).get_input_embeddings().weight.detach().clone()
    model = VPiTModel.from_base(llm_dir, tokenizer, str(encoder_dir), attn_implementation="sdpa")
    cfg = model.config
    rows = model.llm.get_input_embeddings().weight
    assert rows.shape[0] % 128 == 0 and rows.shape[0] >= len(tokenizer) == cfg.text_vocab_size
    assert model.llm.config.vocab_size == rows.shape[0]
    assert model.heads.lm_head.weight is model.llm.get_output_embeddings().weight
    mean = original.mean(0)
    for token_id in (cfg.image_token_id, cfg.image_start_id, cfg.image_end_id, len(tokenizer) - 1, rows.shape[0] - 1):
        torch.testing.assert_close(rows[token_id].detach(), mean)
    untouched = [i for i in range(original.shape[0]) if i not in (cfg.image_token_id, cfg.image_start_id, cfg.image_end_id)]
    torch.testing.assert_close(rows[untouched].detach(), original[untouched])
    assert cfg.visual_dim == model.visual.hidden_size


def test_output_embedding_rows_start_at_their_mean(tokenizer, encoder_dir, tmp_path):
    tokenizer = build_tokenizer()
    llm_dir = saved_llm("llama", len(tokenizer), tmp_path / "base")
    head = LlamaForCausalLM.from_pretrained(llm_dir).lm_head.weight.detach().clone()
    model = VPiTModel.from_base(llm_dir, tokenizer, str(encoder_dir), attn_implementation="sdpa")
    out = model.llm.get_output_embeddings().weight.detach()
    for token_id in (model.config.image_start_id, model.config.image_end_id, out.shape[0] - 1):
        torch.testing.assert_close(out[token_id], head.mean(0))


@pytest.mark.parametrize("kind", list(LLMS))
@pytest.mark.parametrize("vision_head", ["linear", "mlp"])
def test_loss_and_gradients_match_official_style_reference(kind, vision_head, tokenizer, encoder_dir, tmp_path):
    model = build(kind, build_tokenizer(), encoder_dir, tmp_path,
                  VPiTConfig(vision_head=vision_head, text_weight=0.7, visual_weight=1.3))
    batch = shapes_batch(model, model.tokenizer, size=7)
    assert batch["image_is_target"].any() and (~batch["image_is_target"]).any()
    out = model(**VPiTModel.batch_inputs(batch))
    out.loss.backward()

    ref_model = float64_copy(model)
    ref_batch = {k: (v.double() if k == "pixel_values" else v) for k, v in batch.items()}
    loss, text, visual = reference_loss(ref_model, ref_batch)
    loss.backward()
    assert abs(out.text_loss.item() - text.item()) <= 1e-5 * abs(text.item())
    assert abs(out.visual_loss.item() - visual.item()) <= 1e-5 * max(abs(visual.item()), 1e-3)
    assert abs(out.loss.item() - loss.item()) <= 1e-5 * abs(loss.item())
    assert int(out.text_count) == int((batch["labels"][:, 1:] != -100).sum())
    assert int(out.visual_count) == 64 * int(batch["image_is_target"].sum())
    checked = 0
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        if p.grad is None:
            assert q.grad is None or q.grad.abs().max() == 0, name
            continue
        err = (p.grad.double() - q.grad).norm() / q.grad.norm().clamp_min(1e-12)
        assert err < 1e-4, (name, err.item())
        checked += 1
    assert checked >= 4 + 2 * SMALL["num_hidden_layers"]


def test_understanding_only_batch_has_zero_visual_loss(tokenizer, encoder_dir, tmp_path):
    model = build("llama", build_tokenizer(), encoder_dir, tmp_path)
    data = ShapesDataset(size=4, image_size=108, tasks=["image_qa"])
    batch = pad_batch(encode_all([data[i] for i in range(4)], model.tokenizer), model.tokenizer.pad_token_id)
    batch["pixel_values"] = model.visual.processor(images=[data.image(k) for k in batch["image_keys"]],
                                                   return_tensors="pt")["pixel_values"]
    out = model(**VPiTModel.batch_inputs(batch))
    assert int(out.visual_count) == 0 and out.visual_loss.item() == 0.0
    out.loss.backward()
    assert model.heads.vision_head.weight.grad.abs().max() == 0
    assert model.adapter[0].weight.grad.abs().max() > 0  # prompt images still feed the LLM


def test_precomputed_tokens_equal_pixels(tokenizer, encoder_dir, tmp_path):
    model = build("llama", build_tokenizer(), encoder_dir, tmp_path)
    batch = shapes_batch(model, model.tokenizer)
    with_pixels = model(**VPiTModel.batch_inputs(batch))
    tokens = model.visual(batch.pop("pixel_values"))
    with_tokens = model(**VPiTModel.batch_inputs({**batch, "visual_tokens": tokens}))
    assert with_pixels.loss.item() == with_tokens.loss.item()


def test_target_noise_touches_only_target_inputs_in_training(tokenizer, encoder_dir, tmp_path):
    """config.target_noise: in training, the input copies of generation targets are noisy (and
    still unit-norm with normalize_visual), prompt images and the loss targets stay clean; in eval
    mode, and with target_noise=0, the forward is unchanged."""
    model = build("llama", build_tokenizer(), encoder_dir, tmp_path, VPiTConfig(normalize_visual=True))
    batch = shapes_batch(model, model.tokenizer, size=8)
    tokens = model.visual(batch.pop("pixel_values"))
    batch["visual_tokens"] = tokens
    is_target = batch["image_is_target"]
    assert is_target.any() and not is_target.all()
    model.config.target_noise = 0.5
    noisy = model.noisy_targets(tokens, is_target, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noisy[~is_target], tokens[~is_target], rtol=0, atol=0)
    assert (noisy[is_target] - tokens[is_target]).abs().max() > 1e-3
    torch.testing.assert_close(noisy.norm(dim=-1), torch.ones(noisy.shape[:2]))
    cosine = (noisy[is_target] * tokens[is_target]).sum(-1)
    assert cosine.min() > 0.5  # relative noise norm at most 0.5: cos(x, x + n) >= 0.89 on average
    model.eval()
    clean = model(**VPiTModel.batch_inputs(batch)).loss.item()
    assert model(**VPiTModel.batch_inputs(batch)).loss.item() == clean
    model.train()
    assert model(**VPiTModel.batch_inputs(batch)).loss.item() != clean
    model.config.target_noise = 0.0
    assert model(**VPiTModel.batch_inputs(batch)).loss.item() == clean
    with pytest.raises(ValueError, match="target_noise"):
        VPiTConfig(target_noise=-1.0)


def test_save_and_load_round_trip(tokenizer, encoder_dir, tmp_path):
    model = build("qwen2", build_tokenizer(), encoder_dir, tmp_path, VPiTConfig(vision_head="mlp"))
    with torch.no_grad():  # make the adapter and head differ from a fresh initialisation
        for p in [*model.adapter.parameters(), *model.heads.vision_head.parameters()]:
            p.add_(torch.randn_like(p))
    batch = shapes_batch(model, model.tokenizer)
    expected = model(**VPiTModel.batch_inputs(batch)).loss.item()
    model.save_pretrained(tmp_path / "saved")
    loaded = VPiTModel.from_pretrained(tmp_path / "saved", attn_implementation="sdpa")
    assert loaded.config == model.config
    assert len(loaded.tokenizer) == len(model.tokenizer)
    assert loaded(**VPiTModel.batch_inputs(batch)).loss.item() == pytest.approx(expected, rel=1e-6)


def test_standardized_model_round_trip(tokenizer, encoder_dir, tmp_path):
    """The statistics travel with the exported encoder: the loaded model makes the same
    standardised tokens (inputs and targets) and the same loss; without statistics the config's
    standardize_visual is refused."""
    visual = VisualTokens.from_pretrained(str(encoder_dir))
    data = ShapesDataset(size=20, image_size=108)
    visual.fit_standardization([data.image(k) for k in data.image_keys()[:8]])
    llm_dir = saved_llm("llama", len(tokenizer), tmp_path / "llama-base")
    model = VPiTModel.from_base(str(llm_dir), build_tokenizer(), visual, VPiTConfig(standardize_visual=True),
                                attn_implementation="sdpa")
    batch = shapes_batch(model, model.tokenizer)
    raw = VisualTokens.from_pretrained(str(encoder_dir))(batch["pixel_values"])
    torch.testing.assert_close(model.visual(batch["pixel_values"]), (raw - visual.token_mean) / visual.token_std)
    expected = model(**VPiTModel.batch_inputs(batch)).loss.item()
    model.save_pretrained(tmp_path / "saved")
    loaded = VPiTModel.from_pretrained(tmp_path / "saved", attn_implementation="sdpa")
    assert loaded.config.standardize_visual and loaded.visual.standardized
    assert loaded.visual.standardization_digest() == visual.standardization_digest()
    assert loaded(**VPiTModel.batch_inputs(batch)).loss.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="fit_standardization"):  # an encoder without the statistics
        VPiTModel.from_pretrained(tmp_path / "saved", encoder=str(encoder_dir), attn_implementation="sdpa")
    with pytest.raises(ValueError, match="standardized=True"):  # statistics the config does not ask for
        VPiTModel.from_base(str(llm_dir), build_tokenizer(), visual, VPiTConfig(), attn_implementation="sdpa")


def test_bad_inputs_raise_clear_errors(tokenizer, encoder_dir, tmp_path):
    model = build("llama", build_tokenizer(), encoder_dir, tmp_path)
    batch = VPiTModel.batch_inputs(shapes_batch(model, model.tokenizer))
    tokens = model.visual(batch["pixel_values"])
    with pytest.raises(ValueError, match="not both"):
        model(**batch, visual_tokens=tokens)
    with pytest.raises(ValueError, match="image_slots must lie"):
        model(**{**batch, "image_slots": batch["image_slots"] * 0})
    with pytest.raises(ValueError, match="image_is_target must be"):
        model(**{**batch, "image_is_target": batch["image_is_target"][:1]})
    with pytest.raises(ValueError, match="visual tokens must be"):
        model(**{**{k: v for k, v in batch.items() if k != "pixel_values"}, "visual_tokens": tokens[:, :10]})
    with pytest.raises(ValueError, match="vpit_varlen"):
        model(**batch, cu_seqlens=torch.tensor([0, batch["input_ids"].numel()], dtype=torch.int32), max_seqlen=4)
    with pytest.raises(ValueError, match="vision_head"):
        VPiTConfig(vision_head="conv")
    with pytest.raises(ValueError, match="square"):
        VPiTConfig(num_visual_tokens=60)
    with pytest.raises(FileNotFoundError, match="vpit_config.json"):
        VPiTModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_packed_batch_equals_padded_batch(kind, encoder_dir, tmp_path):
    from vpit_fast.data import collate_packed, flatten_packed, pack

    tokenizer = build_tokenizer()
    llm_dir = saved_llm(kind, len(tokenizer), tmp_path / "base")
    model = VPiTModel.from_base(llm_dir, tokenizer, str(encoder_dir))  # default: vpit_varlen attention
    data = ShapesDataset(size=9, seed=3, image_size=108)
    samples = encode_all([data[i] for i in range(9)], tokenizer)
    tokens = {k: t for k, t in zip(sorted({k for s in samples for k in s.image_keys}),
                                   model.visual.encode_images([data.image(k) for k in
                                                               sorted({k for s in samples for k in s.image_keys})]))}

    def run(batch):
        model.zero_grad(set_to_none=True)
        batch["visual_tokens"] = torch.stack([tokens[k] for k in batch["image_keys"]])
        out = model(**VPiTModel.batch_inputs(batch), reduction="sum")
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    rows = pack(samples, budget=max(len(s) for s in samples) + 40, pad_id=tokenizer.pad_token_id)
    assert len(rows) < len(samples)  # several samples share a row
    padded, padded_grads = run(pad_batch(samples, tokenizer.pad_token_id))
    packed_batch = collate_packed(rows)
    for batch in (packed_batch, flatten_packed(packed_batch, tokenizer.pad_token_id),
                  flatten_packed(packed_batch, tokenizer.pad_token_id, pad_to_multiple_of=64)):
        packed, packed_grads = run(batch)
        assert int(packed.text_count) == int(padded.text_count)
        assert int(packed.visual_count) == int(padded.visual_count)
        for a, b in ((packed.text_loss, padded.text_loss), (packed.visual_loss, padded.visual_loss)):
            assert abs(a.item() - b.item()) <= 1e-5 * abs(b.item())
        assert packed_grads.keys() == padded_grads.keys()
        for name, g in padded_grads.items():
            err = (packed_grads[name] - g).norm() / g.norm().clamp_min(1e-12)
            assert err < 1e-4, (name, err.item())


def test_presets_use_real_weights_only_when_cached(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from vpit_fast import presets

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert presets.local_pretrained("llama3.2-1b") is None and presets.local_pretrained("tiny") is None
    repo = tmp_path / "models--meta-llama--Llama-3.2-1B-Instruct"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "snapshots" / "abc" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    assert presets.local_pretrained("llama3.2-1b") == "meta-llama/Llama-3.2-1B-Instruct"
    assert presets.llm_config("llama3.2-1b").hidden_size == 2048


def test_host_targets_count_on_the_host_and_give_the_same_loss(tokenizer, encoder_dir, tmp_path, monkeypatch):
    """`batch_inputs` moving a batch to a GPU adds the host copies of the labels and image slots;
    the loss then checks and counts its text targets there (the head loss reads nothing back).
    Here the copies are passed on the CPU: the same losses and gradients, the count handed to the
    head loss; anything invalid in the copies gives no count (the head loss checks instead)."""
    import vpit_fast.heads as heads_module

    model = build("llama", tokenizer, encoder_dir, tmp_path)
    batch = VPiTModel.batch_inputs(shapes_batch(model, tokenizer, size=6, seed=1))
    assert "host_targets" not in batch  # nothing moved: the head loss counts on the CPU anyway
    host = {k: batch[k] for k in ("labels", "image_slots", "image_batch_index")}
    T = batch["input_ids"].shape[1]
    expected = int((batch["labels"][:, 1:] != -100).sum())
    assert bool(batch["image_is_target"].any())  # generation targets are checked too
    assert model._host_text_count(host, batch["image_is_target"], T) == expected

    seen = []
    real = heads_module.head_loss

    def spy(*args, **kwargs):
        seen.append(kwargs.get("text_count"))
        return real(*args, **kwargs)

    monkeypatch.setattr(heads_module, "head_loss", spy)
    results = []
    for extra in ({}, {"host_targets": host}):
        model.zero_grad(set_to_none=True)
        out = model(**batch, **extra)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert seen == [None, expected]
    (plain, plain_grads), (hinted, hinted_grads) = results
    for field in ("loss", "text_loss", "visual_loss", "text_count", "visual_count"):
        assert torch.equal(getattr(hinted, field), getattr(plain, field)), field
    for name, g in plain_grads.items():
        assert torch.equal(hinted_grads[name], g), name

    # invalid host copies: no count (the device-side check then raises or passes as before)
    target = int(batch["image_is_target"].nonzero()[0])
    bad_label = host["labels"].clone()
    bad_label[0, -1] = model.heads.lm_head.weight.shape[0]  # past the vocabulary
    slot_text = host["labels"].clone()
    b, s = int(host["image_batch_index"][target]), int(host["image_slots"][target])
    slot_text[b, s + 1] = 5  # a visual row with a text target
    bad_slot = host["image_slots"].clone()
    bad_slot[target] = T  # past the row
    for case in ({"labels": bad_label}, {"labels": slot_text}, {"image_slots": bad_slot},
                 {"labels": host["labels"][:, :-1]}):
        assert model._host_text_count({**host, **case}, batch["image_is_target"], T) is None, case
    with pytest.raises(ValueError, match="both in visual_rows and have a text target"):
        model(**{**batch, "labels": slot_text, "host_targets": {**host, "labels": slot_text}})
