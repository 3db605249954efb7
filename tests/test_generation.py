"""Multimodal generation (`vpit_fast.generation`) on tiny random LLaMA/Qwen2 models, fp32 on CPU:
the cached, batched decoder against the official-style loop (no cache, one prompt at a time),
batched against one-by-one, the modality dispatch on hand-built states, forced mode switches,
end-of-turn handling, classifier-free guidance, sampling, input validation, the CLI, and (CUDA
only) the CUDA-graph decode step against the eager one."""

import sys
import types

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from conftest import requires_cuda
from vpit_fast.data import build_tokenizer
from vpit_fast.generation import (DONE, IMAGE_MODE, TEXT, dispatch_next_inputs, encode_prompt, generate,
                                  generate_uncached, sample_tokens, start_decoding)
from vpit_fast.model import VPiTConfig, VPiTModel

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
DV, N = 16, 64
IMAGE_PROMPT = "generate an image of a red circle"
RESPONSE = "here is an image based on your request: <image_start>"


def tiny_model(kind="llama", attn="vpit_varlen", normalize=False, device="cpu"):
    tokenizer = build_tokenizer()
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_class, model_class = classes[kind]
    llm = model_class(config_class(vocab_size=len(tokenizer), **SMALL))
    model = VPiTModel.from_base(llm, tokenizer, None, VPiTConfig(normalize_visual=normalize), visual_dim=DV,
                                attn_implementation=attn)
    # The default initialisation keeps the visual feedback loop (token -> adapter -> LLM -> vision
    # head -> token) contracting, so fp32 rounding differences do not grow over 64 steps.
    return model.to(device).eval()


def force_token(model, token_id, scale=1000.0):
    """Makes ``token_id`` the LM head's argmax in every state: component 0 of the residual stream
    is held at a large constant (every input embedding, the adapter's output, no layer writes it),
    so the final norm's output has a positive component 0, and the LM-head row of ``token_id``
    reads only that component, scaled up."""
    llm = model.llm
    with torch.no_grad():
        llm.get_input_embeddings().weight[:, 0] = 100.0
        model.adapter[2].weight[0] = 0
        model.adapter[2].bias[0] = 100.0
        for layer in llm.base_model.layers:
            layer.self_attn.o_proj.weight[0] = 0
            layer.mlp.down_proj.weight[0] = 0
        llm.base_model.norm.weight[0] = 1.0
        head = model.heads.lm_head.weight
        head[:, 0] = 0
        head[token_id] = 0
        head[token_id, 0] = scale
    return model


def mixed_batch(model):
    """Three prompts of different lengths: one with a prompt image, one starting its answer in
    image mode, one plain text. Returns generate's keyword arguments."""
    return dict(prompts=["what is this? <image>", IMAGE_PROMPT, "describe the picture of a large blue square"],
                visual_tokens=[torch.randn(1, N, DV), None, None], response_prefix=[None, RESPONSE, None])


# Two candidate logits closer than this (relative to the largest logit) are a near-tie: which one
# greedy decoding picks depends on rounding, so cached and uncached runs may part there.
NEAR_TIE = 1e-4


class Reference(list):
    """`generate_uncached`'s results, with each prompt's LM-head logits ``{step: [V]}`` at the
    steps it chose a text token (see `reference`)."""

    text_logits = ()
    image_end_id = None


def reference(model, *args, **kwargs):
    """The official-style loop's results, with the logits behind every greedy choice recorded (a
    hook on the LM head, which the loop runs once per text step, one prompt at a time)."""
    calls = []
    hook = model.heads.lm_head.register_forward_hook(lambda module, inputs, output: calls.append(output[0].float()))
    try:
        results = Reference(generate_uncached(model, *args, **kwargs))
    finally:
        hook.remove()
    cfg, calls = model.config, iter(calls)
    results.image_end_id = cfg.image_end_id
    results.text_logits = [{step: next(calls) for step, token in enumerate(g.token_ids.tolist())
                            if token not in (cfg.image_token_id, cfg.image_end_id)} for g in results]
    assert next(calls, None) is None, "more LM-head calls than text steps"
    return results


def first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def assert_same(ours, reference, atol=1e-5):
    """Token for token and visual token for visual token. Against a `Reference`, a row may part
    from it only at a near-tie of the reference's logits (both tokens within NEAR_TIE); it is
    compared up to there."""
    assert len(ours) == len(reference)
    for row, (a, b) in enumerate(zip(ours, reference)):
        ids_a, ids_b = a.token_ids.tolist(), b.token_ids.tolist()
        part = first_difference(ids_a, ids_b)
        if part is not None and reference.text_logits:
            logits = reference.text_logits[row].get(part)
            assert logits is not None, f"row {row} parts from the reference at step {part}, not a text step"
            gap = (logits[ids_a[part]] - logits[ids_b[part]]).abs().item()
            assert gap <= NEAR_TIE * logits.abs().max().item(), (
                f"row {row} step {part}: token {ids_a[part]} against {ids_b[part]}, logit gap {gap:.3g} is no near-tie")
            ids_a, ids_b = ids_a[:part], ids_b[:part]
            # images finished before the parting step (each ends with <image_end>, before any text step)
            pairs = list(zip(a.visual_tokens, b.visual_tokens))[:ids_b.count(reference.image_end_id)]
        else:
            assert ids_a == ids_b
            assert a.text == b.text and a.finished == b.finished
            assert len(a.visual_tokens) == len(b.visual_tokens)
            pairs = zip(a.visual_tokens, b.visual_tokens)
        for x, y in pairs:
            assert x.shape == (N, DV)
            torch.testing.assert_close(x, y, atol=atol, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# cached == official style; batched == one by one
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("kind,attn,normalize", [("llama", "vpit_varlen", False), ("llama", "sdpa", True),
                                                 ("qwen2", "vpit_varlen", True)])
def test_cached_batched_equals_uncached_official_style(kind, attn, normalize, dtype):
    """float32 runs the compiled dispatch and fused decode layers; float64 (where they step aside
    for PyTorch's ops) leaves rounding no room to part the two runs at a near-tie."""
    model = tiny_model(kind, attn, normalize).to(dtype)
    batch = mixed_batch(model)
    batch["visual_tokens"][0] = batch["visual_tokens"][0].to(dtype)
    ours = generate(model, **batch, max_new_tokens=72)
    assert_same(ours, reference(model, **batch, max_new_tokens=72))
    assert len(ours[1].visual_tokens) == 1  # the image-mode row made one complete image, then text
    assert ours[1].token_ids[N].item() == model.config.image_end_id
    if normalize:
        torch.testing.assert_close(ours[1].visual_tokens[0].norm(dim=-1), torch.ones(N, dtype=dtype))


def test_batched_equals_one_by_one():
    model = tiny_model()
    batch = mixed_batch(model)
    together = generate(model, **batch, max_new_tokens=70)
    alone = [generate(model, p, visual_tokens=[t], response_prefix=x, max_new_tokens=70)[0]
             for p, t, x in zip(batch["prompts"], batch["visual_tokens"], batch["response_prefix"])]
    assert_same(together, alone)


@pytest.mark.parametrize("standardize", [False, True])
def test_images_through_the_encoder_equal_precomputed_tokens(standardize):
    """Prompt images reach the model in the token space of training: raw, or standardised with
    the encoder's statistics (what a precomputed token set of that encoder holds)."""
    from vpit_fast.data import ShapesDataset
    from vpit_fast.visual_tokens import VisualTokens, tiny_siglip_config

    tokenizer = build_tokenizer()
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), **SMALL))
    visual = VisualTokens.from_config(tiny_siglip_config())
    data = ShapesDataset(size=12, image_size=108)
    pictures = [data.image(key) for key in data.image_keys()[:2]]
    pixels = visual.processor(images=pictures, return_tensors="pt")["pixel_values"]
    tokens = visual(pixels)
    if standardize:
        visual.fit_standardization([data.image(key) for key in data.image_keys()[:8]])
        tokens = (tokens - visual.token_mean) / visual.token_std
    model = VPiTModel.from_base(llm, tokenizer, visual, VPiTConfig(standardize_visual=standardize)).eval()
    prompts = ["what is this? <image>", "compare <image> and <image>"]
    from_images = generate(model, prompts, images=[[pictures[0]], pictures], max_new_tokens=6)
    from_tokens = generate(model, prompts, visual_tokens=[tokens[:1], tokens], max_new_tokens=6)
    assert_same(from_images, from_tokens)


# ---------------------------------------------------------------------------------------------
# the dispatch, hand-built
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
def test_dispatch_on_hand_built_states(normalize):
    V, H = 20, 8
    table = torch.randn(V, H)
    adapter = nn.Sequential(nn.Linear(DV, H), nn.GELU(), nn.Linear(H, H))
    start, end, slot, pad, eos = 11, 12, 10, 0, 13
    # rows: text word, text <image_start>, text eos, image token 3, image token 63, image after 64, done
    mode = torch.tensor([TEXT, TEXT, TEXT, IMAGE_MODE, IMAGE_MODE, IMAGE_MODE, DONE])
    count = torch.tensor([0, 0, 0, 3, N - 1, N, 0])
    left = torch.tensor([2, 2, 2, 1, 1, 1, 0])
    text_ids = torch.tensor([5, start, eos, 6, start, 7, 8])
    pred = torch.randn(7, DV)
    embeds, ids, visual, new_mode, new_count, new_left = dispatch_next_inputs(
        mode, count, left, text_ids, pred, table, adapter, num_visual_tokens=N, image_start_id=start,
        image_end_id=end, image_token_id=slot, pad_id=pad, eos_ids=torch.tensor([eos]), normalize=normalize)
    assert ids.tolist() == [5, start, eos, slot, slot, end, pad]
    assert new_mode.tolist() == [TEXT, IMAGE_MODE, DONE, IMAGE_MODE, IMAGE_MODE, TEXT, DONE]
    assert new_count.tolist() == [0, 0, 0, 4, N, 0, 0]
    assert new_left.tolist() == [2, 1, 2, 1, 1, 1, 0]
    expected_visual = torch.nn.functional.normalize(pred, dim=-1) if normalize else pred
    for row in (3, 4):
        torch.testing.assert_close(visual[row], expected_visual[row])
        torch.testing.assert_close(embeds[row], adapter(expected_visual[row]))
    for row, token in ((0, 5), (1, start), (2, eos), (5, end), (6, pad)):
        assert visual[row].abs().max() == 0
        torch.testing.assert_close(embeds[row], table[token])


def test_decode_attention_equals_transformers_sdpa_with_repeated_kv_heads():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from vpit_fast.generation import decode_attention

    module = types.SimpleNamespace(num_key_value_groups=4, is_causal=True)
    q, k, v = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 37, 16), torch.randn(3, 2, 37, 16)
    mask = torch.rand(3, 1, 1, 37) < 0.7
    mask[..., 0] = True
    ours, _ = decode_attention(module, q, k, v, mask, scaling=0.3)
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    torch.testing.assert_close(ours, expected)
    with pytest.raises(ValueError, match="one query token"):
        decode_attention(module, torch.randn(3, 8, 2, 16), k, v, None)


# ---------------------------------------------------------------------------------------------
# forced mode switches, end of turn
# ---------------------------------------------------------------------------------------------


def test_forced_image_start_gives_images_of_exactly_64_tokens_per_row():
    model = tiny_model()
    cfg = model.config
    force_token(model, cfg.image_start_id)
    prompts = [IMAGE_PROMPT, IMAGE_PROMPT]
    kwargs = dict(response_prefix=[RESPONSE, None], max_new_tokens=140)
    ours = generate(model, prompts, **kwargs)
    assert_same(ours, reference(model, prompts, **kwargs))
    start, end, slot = cfg.image_start_id, cfg.image_end_id, cfg.image_token_id
    one_image = [slot] * N + [end]
    # row 0 starts in image mode (its prefix ends with <image_start>); row 1 samples <image_start> first
    assert ours[0].token_ids.tolist() == (one_image + [start]) * 2 + [slot] * 8
    assert ours[1].token_ids.tolist() == ([start] + one_image) * 2 + [start] + [slot] * 7
    assert [len(g.visual_tokens) for g in ours] == [2, 2]  # the cut-off third image is left out
    assert not ours[0].finished and ours[0].text.split() == ["<image>", "<image>"]

    limited = generate(model, prompts, max_images=1, **kwargs)
    assert_same(limited, reference(model, prompts, max_images=1, **kwargs))
    for g, prefix in zip(limited, ([], [start])):
        ids = g.token_ids.tolist()
        assert ids[:len(prefix) + N + 1] == prefix + one_image
        after = ids[len(prefix) + N + 1:]
        assert len(after) > 0 and not {start, end, slot} & set(after)  # back to text for good
        assert len(g.visual_tokens) == 1


def test_image_run_steps_skip_the_lm_head_with_the_same_results():
    """Inside an image no row samples text: those steps may skip the LM head (`image_run_steps`
    counts them from the state) and give what the full step gives."""
    model = tiny_model(normalize=True)
    prompts, kwargs = [IMAGE_PROMPT, "a"], dict(response_prefix=RESPONSE, max_new_tokens=80)
    lm_head_calls = []
    hook = model.heads.lm_head.register_forward_hook(lambda *args: lm_head_calls.append(1))
    runs = []
    for image_run in (True, False):
        decoder = start_decoding(model, prompts, **kwargs)  # the prefill emits visual token 0
        lm_head_calls.clear()
        # 63 visual tokens and <image_end> to go in both rows
        assert decoder.image_run_steps() == N
        for step in range(1, 80):
            decoder.step(image_run=image_run and step <= N)
        runs.append((decoder.out_ids.clone(), decoder.out_visual.clone(), len(lm_head_calls)))
        assert decoder.image_run_steps() == 0  # back in text mode
    hook.remove()
    (ids, visual, calls), (full_ids, full_visual, full_calls) = runs
    assert torch.equal(ids, full_ids) and torch.equal(visual, full_visual)
    assert (calls, full_calls) == (79 - N, 79)
    assert ids[:, N].tolist() == [model.config.image_end_id] * 2
    assert_same(generate(model, prompts, **kwargs), reference(model, prompts, **kwargs))

    # a row in text mode samples every step; its first token is forced to text (a random model
    # may otherwise open an image there too: seed 1686435689 did)
    text_model = tiny_model(normalize=True)
    force_token(text_model, text_model.tokenizer("a", add_special_tokens=False).input_ids[0])
    text_row = start_decoding(text_model, prompts, response_prefix=[RESPONSE, None], max_new_tokens=80)
    assert text_row.image_run_steps() == 0


def test_end_of_turn_stops_and_min_new_tokens_delays_it():
    model = tiny_model()
    eos = model.tokenizer.eos_token_id
    force_token(model, eos)
    first = generate(model, ["a", "a longer prompt than a"], max_new_tokens=20, stop_check_interval=1)
    for g in first:
        assert g.token_ids.tolist() == [eos] and g.finished and g.text == ""
    delayed = generate(model, "a", max_new_tokens=20, min_new_tokens=5, max_images=0)
    assert len(delayed[0].token_ids) == 6 and delayed[0].token_ids[-1] == eos and delayed[0].finished
    assert eos not in delayed[0].token_ids[:5].tolist()
    assert_same(delayed, reference(model, "a", max_new_tokens=20, min_new_tokens=5, max_images=0))


# ---------------------------------------------------------------------------------------------
# classifier-free guidance
# ---------------------------------------------------------------------------------------------


def test_cfg_scale_one_equals_no_guidance_and_guidance_matches_the_reference():
    model = tiny_model(normalize=True)
    batch = mixed_batch(model)
    plain = generate(model, **batch, max_new_tokens=67)
    assert_same(generate(model, **batch, max_new_tokens=67, cfg_scale=1.0), plain)
    guided = generate(model, **batch, max_new_tokens=67, cfg_scale=3.0)
    assert_same(guided, reference(model, **batch, max_new_tokens=67, cfg_scale=3.0))
    assert (guided[1].visual_tokens[0] - plain[1].visual_tokens[0]).abs().max() > 1e-3
    torch.testing.assert_close(guided[1].visual_tokens[0].norm(dim=-1), torch.ones(N))


def test_unconditional_prompt_is_the_same_turn_with_an_empty_user_message():
    model = tiny_model()
    uncond = encode_prompt(model, "what is this? <image>", torch.randn(1, N, DV), RESPONSE, unconditional=True)
    expected = model.tokenizer.apply_chat_template([{"role": "user", "content": ""}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]
    expected = list(expected) + model.tokenizer.encode(RESPONSE, add_special_tokens=False)
    assert uncond.input_ids.tolist() == expected and uncond.visual_tokens is None


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------


def test_sampling_follows_temperature_top_k_and_top_p():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")]).repeat(40000, 1)
    gen = torch.Generator().manual_seed(0)
    assert (sample_tokens(logits[:4]) == 0).all()

    def freq(**kwargs):
        ids = sample_tokens(logits, generator=gen, **kwargs)
        return torch.bincount(ids, minlength=6).double() / ids.numel()

    torch.testing.assert_close(freq(temperature=1.0), (logits[0] / 1.0).softmax(-1).double(), atol=0.01, rtol=0)
    torch.testing.assert_close(freq(temperature=2.0), (logits[0] / 2.0).softmax(-1).double(), atol=0.01, rtol=0)
    top2 = freq(temperature=1.0, top_k=2)
    torch.testing.assert_close(top2[:2], logits[0, :2].softmax(-1).double(), atol=0.01, rtol=0)
    assert top2[2:].sum() == 0
    # p = [.56, .21, .13, .08, .03, 0]: top_p 0.7 keeps the first two (mass before them: 0, .56 < .7 <= .77)
    nucleus = freq(temperature=1.0, top_p=0.7)
    torch.testing.assert_close(nucleus[:2], logits[0, :2].softmax(-1).double(), atol=0.01, rtol=0)
    assert nucleus[2:].sum() == 0
    assert freq(temperature=1.0, top_k=3, top_p=0.5)[0] == 1.0
    assert freq(temperature=5.0, top_k=1)[0] == 1.0


def test_sampled_generation_is_reproducible_with_a_generator():
    model = tiny_model()
    runs = [generate(model, ["a", "b c"], max_new_tokens=12, temperature=1.0, top_k=10, top_p=0.9,
                     generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert_same(*runs)
    greedy = generate(model, ["a", "b c"], max_new_tokens=12)
    assert [g.token_ids.tolist() for g in runs[0]] != [g.token_ids.tolist() for g in greedy]


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(min_new_tokens=300), "min_new_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_k=True), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(max_images=-1), "max_images"),
    (dict(cfg_scale=float("inf")), "cfg_scale"), (dict(stop_check_interval=0), "stop_check_interval"),
    (dict(eos_token_ids=[10 ** 6]), "eos_token_ids"), (dict(cuda_graph=True), "cuda_graph"),
    (dict(response_prefix="<image_start> red"), "response_prefix"),
    (dict(response_prefix=["a", "b"]), "response_prefix"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        generate(model, "red", **kwargs)


def test_bad_prompts_raise_clear_errors():
    model = tiny_model()
    with pytest.raises(TypeError, match="prompt"):
        generate(model, [3])
    with pytest.raises(ValueError, match="2 <image> placeholder"):
        generate(model, "a <image> b <image>", visual_tokens=[torch.randn(1, N, DV)])
    with pytest.raises(ValueError, match="literal <image_start>"):
        generate(model, "a <image_start> b")
    with pytest.raises(ValueError, match=r"visual_tokens must be \[M, 64, 16\]"):
        generate(model, "a <image>", visual_tokens=[torch.randn(1, N, 3)])
    with pytest.raises(ValueError, match="no encoder"):
        generate(model, "a <image>", images=[["picture"]])
    with pytest.raises(ValueError, match="not both"):
        generate(model, "a <image>", images=[["picture"]], visual_tokens=[torch.randn(1, N, DV)])


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_prints_text_writes_tokens_and_pictures(tmp_path, monkeypatch, capsys):
    from vpit_fast.generate_cli import main

    model = tiny_model()
    model.save_pretrained(tmp_path / "ckpt")
    decoded = []

    class FakeVisualizer:
        @classmethod
        def from_pretrained(cls, directory):
            return cls()

        def decode(self, tokens, **kwargs):
            from PIL import Image
            decoded.append(tokens)
            return [Image.new("RGB", (8, 8), (255, 0, 0)) for _ in range(tokens.shape[0])]

    monkeypatch.setitem(sys.modules, "vpit_fast.visualizer", types.SimpleNamespace(Visualizer=FakeVisualizer))
    out = tmp_path / "out"
    code = main([IMAGE_PROMPT, "--checkpoint", str(tmp_path / "ckpt"), "--out-dir", str(out), "--visualizer", "v",
                 "--response-prefix", RESPONSE, "--max-new-tokens", "70", "--max-images", "1", "--device", "cpu",
                 "--dtype", "float32"])
    assert code == 0
    expected = generate(model, IMAGE_PROMPT, response_prefix=RESPONSE, max_new_tokens=70, max_images=1)[0]
    assert capsys.readouterr().out.strip() == expected.text
    tokens = load_file(str(out / "visual_tokens.safetensors"))["visual_tokens"]
    assert tokens.shape == (1, N, DV)
    torch.testing.assert_close(tokens[0], expected.visual_tokens[0])
    assert (out / "image_0.png").is_file() and decoded[0].shape == (1, N, DV)

    monkeypatch.setitem(sys.modules, "vpit_fast.visualizer", types.SimpleNamespace())
    with pytest.raises(SystemExit, match="vpit_fast.visualizer.Visualizer"):
        main([IMAGE_PROMPT, "--checkpoint", str(tmp_path / "ckpt"), "--visualizer", "v"])
    with pytest.raises(SystemExit, match="not a VPiTModel directory"):
        main([IMAGE_PROMPT, "--checkpoint", str(tmp_path)])


# ---------------------------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------------------------


@pytest.mark.cuda
@requires_cuda
def test_cuda_graph_decode_equals_eager_decode():
    model = tiny_model(normalize=True, device="cuda")
    batch = mixed_batch(model)
    eager = generate(model, **batch, max_new_tokens=72)
    graphed = generate(model, **batch, max_new_tokens=72, cuda_graph=True)
    assert_same(graphed, eager)
    again = generate(model, **batch, max_new_tokens=72, cuda_graph=True)  # the kept graph, replayed
    assert_same(again, eager)
    guided = generate(model, **batch, max_new_tokens=72, cfg_scale=2.0)
    assert_same(generate(model, **batch, max_new_tokens=72, cfg_scale=2.0, cuda_graph=True), guided)
    assert_same(eager, reference(model, **batch, max_new_tokens=72))
    # every row inside an image: the captured image-run step replays for those steps
    images = dict(prompts=[IMAGE_PROMPT, "a"], response_prefix=RESPONSE, max_new_tokens=80)
    assert_same(generate(model, **images, cuda_graph=True), reference(model, **images))


@pytest.mark.cuda
@requires_cuda
def test_cuda_graph_prefill_is_captured_and_replayed_per_prompt_length():
    from vpit_fast.generation import _DECODERS

    model = tiny_model(normalize=True, device="cuda")
    batch = mixed_batch(model)
    eager = generate(model, **batch, max_new_tokens=72)
    assert_same(generate(model, **batch, max_new_tokens=72, cuda_graph=True), eager)
    decoder = _DECODERS[model]
    assert decoder.prefill_graphs and all(g is not None for g in decoder.prefill_graphs.values())
    # Other prompts of the same padded length replay the captured prefill with their own inputs.
    other = {key: list(reversed(value)) for key, value in batch.items()}
    assert_same(generate(model, **other, max_new_tokens=72, cuda_graph=True), generate(model, **other, max_new_tokens=72))
    assert len(decoder.prefill_graphs) == 1 and _DECODERS[model] is decoder
