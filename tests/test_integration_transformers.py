"""vpit_fast.integrations.transformers on tiny Hugging Face causal LMs built from configs (CPU,
fp32): the fused loss and every parameter's gradient equal the unpatched model's, outputs without
labels are bit-identical, reverting, saving and loading, tied embeddings, num_items_in_batch, a
weight that exists only inside lm_head's forward (as under ZeRO-3), and an HF Trainer run with
gradient accumulation that logs the same losses patched and unpatched."""

import copy

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from vpit_fast.integrations.transformers import (
    SUPPORTED_ARCHITECTURES,
    FusedCrossEntropyPatch,
    apply_fused_cross_entropy,
    revert_fused_cross_entropy,
)

from conftest import rel_error

VOCAB, BATCH, SEQ = 1000, 3, 14
MODEL_TYPES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Ministral3ForCausalLM": "ministral3",
    "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "Phi3ForCausalLM": "phi3",
    "GemmaForCausalLM": "gemma", "OlmoForCausalLM": "olmo", "Olmo2ForCausalLM": "olmo2",
    "SmolLM3ForCausalLM": "smollm3", "Starcoder2ForCausalLM": "starcoder2",
}
MAIN_ARCHITECTURES = ["LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"]


def tiny_model(arch="LlamaForCausalLM", **overrides):
    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    settings.update(overrides)
    config = AutoConfig.for_model(MODEL_TYPES[arch], **settings)
    model = AutoModelForCausalLM.from_config(config).float()
    assert type(model).__name__ == arch
    return model


def make_batch():
    """Input ids and labels with a prompt of random length per row (-100) and one all-prompt row
    padded by -100 at the end, so several rows of every sequence are ignored."""
    input_ids = torch.randint(3, VOCAB, (BATCH, SEQ))
    labels = input_ids.clone()
    for row in range(BATCH):
        labels[row, : int(torch.randint(1, SEQ // 2, ()))] = -100
    labels[-1, -3:] = -100
    return input_ids, labels


def loss_and_grads(model, input_ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=labels, **kwargs)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same_loss_and_grads(expected, actual, tol=1e-5):
    (out_ref, grads_ref), (out, grads) = expected, actual
    assert out.loss.dtype == torch.float32
    assert rel_error(out.loss, out_ref.loss) < tol, (out.loss.item(), out_ref.loss.item())
    assert grads.keys() == grads_ref.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert rel_error(grad, grads_ref[name]) < tol, name


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_loss_and_all_gradients_match_unpatched(arch):
    model = tiny_model(arch)
    input_ids, labels = make_batch()
    expected = loss_and_grads(model, input_ids, labels)
    patch = apply_fused_cross_entropy(model)
    assert isinstance(patch, FusedCrossEntropyPatch)
    actual = loss_and_grads(model, input_ids, labels)
    assert actual[0].logits is None  # not materialised: the point of the fused loss
    assert_same_loss_and_grads(expected, actual)


@pytest.mark.parametrize("arch", MAIN_ARCHITECTURES)
def test_outputs_without_labels_are_identical(arch):
    model = tiny_model(arch).eval()
    input_ids, _ = make_batch()
    mask = torch.ones_like(input_ids)
    mask[0, :2] = 0
    kwargs = dict(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=True)
    with torch.no_grad():
        expected = model(**kwargs)
        expected_kept = model(input_ids=input_ids, logits_to_keep=1)
        apply_fused_cross_entropy(model)
        actual = model(**kwargs)
        actual_kept = model(input_ids=input_ids, logits_to_keep=1)
        generated = model.generate(input_ids[:1], max_new_tokens=3, do_sample=False)
        revert_fused_cross_entropy(model)
        expected_generated = model.generate(input_ids[:1], max_new_tokens=3, do_sample=False)
    assert torch.equal(actual.logits, expected.logits)
    assert torch.equal(actual_kept.logits, expected_kept.logits)
    for a, b in zip(actual.hidden_states, expected.hidden_states):
        assert torch.equal(a, b)
    assert actual.past_key_values.get_seq_length() == SEQ
    assert torch.equal(generated, expected_generated)


@pytest.mark.parametrize("arch", MAIN_ARCHITECTURES)
def test_revert_restores_the_original_behaviour(arch):
    model = tiny_model(arch)
    input_ids, labels = make_batch()
    expected = model(input_ids=input_ids, labels=labels)
    with apply_fused_cross_entropy(model) as patch:
        assert patch.active and model(input_ids=input_ids, labels=labels).logits is None
    assert not patch.active
    assert "forward" not in vars(model) and "forward" not in vars(model.lm_head)
    assert model.forward.__func__ is type(model).forward
    after = model(input_ids=input_ids, labels=labels)
    assert torch.equal(after.logits, expected.logits) and torch.equal(after.loss, expected.loss)
    with pytest.raises(RuntimeError, match="already reverted"):
        patch.revert()
    with pytest.raises(ValueError, match="not patched"):
        revert_fused_cross_entropy(model)
    apply_fused_cross_entropy(model)  # can be applied again
    assert model(input_ids=input_ids, labels=labels).logits is None


def test_apply_twice_returns_the_same_patch_and_other_instances_are_untouched():
    model, other = tiny_model(), tiny_model()
    patch = apply_fused_cross_entropy(model)
    assert apply_fused_cross_entropy(model) is patch
    input_ids, labels = make_batch()
    assert other(input_ids=input_ids, labels=labels).logits is not None


@pytest.mark.parametrize("arch", MAIN_ARCHITECTURES)
def test_save_and_load_round_trip(arch, tmp_path):
    model = tiny_model(arch)
    keys_before = list(model.state_dict().keys())
    apply_fused_cross_entropy(model)
    assert list(model.state_dict().keys()) == keys_before
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert list(loaded.state_dict().keys()) == keys_before
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    input_ids, labels = make_batch()
    expected = loaded(input_ids=input_ids, labels=labels).loss  # loaded models are not patched
    assert rel_error(model(input_ids=input_ids, labels=labels).loss, expected) < 1e-5
    apply_fused_cross_entropy(loaded)
    assert rel_error(loaded(input_ids=input_ids, labels=labels).loss, expected) < 1e-5


def test_tied_embeddings_stay_tied_and_match(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    input_ids, labels = make_batch()
    expected = loss_and_grads(model, input_ids, labels)
    apply_fused_cross_entropy(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    actual = loss_and_grads(model, input_ids, labels)
    # The tied weight's gradient sums the embedding's and the head's parts.
    assert "model.embed_tokens.weight" in actual[1]
    assert_same_loss_and_grads(expected, actual)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("as_tensor", [True, False])
def test_num_items_in_batch_divides_the_sum(as_tensor):
    model = tiny_model()
    input_ids, labels = make_batch()
    # As under gradient accumulation: the count of the whole accumulated batch, larger than this one's.
    count = int((labels[:, 1:] != -100).sum()) + 17
    num_items = torch.tensor(count) if as_tensor else count
    expected = loss_and_grads(model, input_ids, labels, num_items_in_batch=num_items)
    mean = model(input_ids=input_ids, labels=labels).loss
    apply_fused_cross_entropy(model)
    actual = loss_and_grads(model, input_ids, labels, num_items_in_batch=num_items)
    assert_same_loss_and_grads(expected, actual)
    valid = int((labels[:, 1:] != -100).sum())
    assert rel_error(actual[0].loss, mean.detach() * valid / count) < 1e-5


def test_shift_labels_ignore_index_and_return_dict_false():
    model = tiny_model()
    input_ids, labels = make_batch()
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    expected = model(input_ids=input_ids, labels=labels, shift_labels=shifted).loss
    relabelled = torch.where(labels == -100, torch.full_like(labels, -1), labels)
    expected_ignore = model(input_ids=input_ids, labels=relabelled, ignore_index=-1).loss
    apply_fused_cross_entropy(model)
    # shift_labels are used as given: labels themselves are then not read
    actual = model(input_ids=input_ids, labels=torch.zeros_like(labels), shift_labels=shifted).loss
    assert rel_error(actual, expected) < 1e-5
    assert rel_error(model(input_ids=input_ids, labels=relabelled, ignore_index=-1).loss, expected_ignore) < 1e-5
    as_tuple = model(input_ids=input_ids, labels=labels, return_dict=False, use_cache=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1  # loss only: None fields are dropped
    assert rel_error(as_tuple[0], expected) < 1e-5


def test_no_valid_target_gives_zero_not_nan():
    model = tiny_model()
    input_ids, _ = make_batch()
    apply_fused_cross_entropy(model)
    loss = model(input_ids=input_ids, labels=torch.full_like(input_ids, -100)).loss
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters() if p.grad is not None)


def test_weight_present_only_inside_lm_head_forward_as_under_zero3():
    """ZeRO-3 keeps a partition of each weight and gathers it in the owning module's forward
    pre-hook; imitate that: lm_head.weight is empty except inside lm_head's forward."""
    model = tiny_model()
    input_ids, labels = make_batch()
    expected = loss_and_grads(model, input_ids, labels)
    apply_fused_cross_entropy(model)
    weight = model.lm_head.weight
    full = weight.data
    seen_labels = []

    def gather(module, args, kwargs):
        seen_labels.append(kwargs.get("labels") is not None)
        weight.data = full

    def release(module, args, kwargs, output):
        weight.data = full.new_empty(0)

    model.lm_head.register_forward_pre_hook(gather, with_kwargs=True)
    model.lm_head.register_forward_hook(release, with_kwargs=True)
    release(None, None, None, None)
    model.zero_grad(set_to_none=True)
    out = model(input_ids=input_ids, labels=labels)
    assert seen_labels == [True] and weight.numel() == 0
    weight.data = full  # ZeRO-3 gathers again for backward through hooks on lm_head's outputs
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert_same_loss_and_grads(expected, (out, grads))


def test_autocast_bfloat16_close_to_unpatched():
    model = tiny_model()
    input_ids, labels = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(input_ids=input_ids, labels=labels).loss
        apply_fused_cross_entropy(model)
        actual = model(input_ids=input_ids, labels=labels).loss
    assert actual.dtype == torch.float32
    assert rel_error(actual, expected) < 1e-2


def test_bad_uses_are_refused_clearly():
    input_ids, labels = make_batch()
    with pytest.raises(TypeError, match="model must be"):
        apply_fused_cross_entropy("llama")
    with pytest.raises(ValueError, match="supports"):
        apply_fused_cross_entropy(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="impl"):
        apply_fused_cross_entropy(tiny_model(), impl="triton")

    class OwnForward(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    with pytest.raises(ValueError, match="supports"):
        apply_fused_cross_entropy(OwnForward(tiny_model().config))
    biased = tiny_model()
    biased.lm_head = nn.Linear(64, VOCAB, bias=True)
    with pytest.raises(ValueError, match="without bias"):
        apply_fused_cross_entropy(biased)
    custom = tiny_model()
    custom.loss_function = lambda **kwargs: torch.tensor(0.0)
    with pytest.raises(ValueError, match="custom loss_function"):
        apply_fused_cross_entropy(custom)

    model = tiny_model()
    apply_fused_cross_entropy(model)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(input_ids=input_ids, labels=labels, logits_to_keep=1)
    with pytest.raises(ValueError, match="labels must be"):
        model(input_ids=input_ids, labels=labels[:, :-1])
    with pytest.raises(ValueError, match="labels"):  # a target outside the vocabulary
        model(input_ids=input_ids, labels=torch.full_like(labels, VOCAB))
    model.resize_token_embeddings(VOCAB + 8)
    with pytest.raises(RuntimeError, match="replaced"):
        model(input_ids=input_ids, labels=labels)
    revert_fused_cross_entropy(model)
    apply_fused_cross_entropy(model)
    assert model(input_ids=input_ids, labels=labels).logits is None


def test_trainer_with_gradient_accumulation_logs_the_same_losses(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    class RecordingTrainer(Trainer):
        """Records each micro-batch's loss as the Trainer computed it (unrounded)."""

        def training_step(self, *args, **kwargs):
            loss = super().training_step(*args, **kwargs)
            self.micro_losses.append(loss.item())
            return loss

    generator = torch.Generator().manual_seed(7)
    dataset = []
    for _ in range(12):  # the prompt length varies, so micro-batches hold different target counts
        input_ids = torch.randint(3, VOCAB, (SEQ,), generator=generator)
        labels = input_ids.clone()
        labels[: int(torch.randint(1, SEQ - 2, (), generator=generator))] = -100
        dataset.append({"input_ids": input_ids, "labels": labels})
    initial = tiny_model().state_dict()

    def train(patched):
        model = tiny_model()
        model.load_state_dict(initial)
        if patched:
            apply_fused_cross_entropy(model)
        head_calls = []
        model.lm_head.register_forward_pre_hook(
            lambda module, args, kwargs: head_calls.append(kwargs.get("labels") is not None), with_kwargs=True)
        args = TrainingArguments(
            output_dir=str(tmp_path / ("patched" if patched else "plain")), use_cpu=True, report_to=[],
            per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-3,
            logging_steps=1, save_strategy="no", seed=0, data_seed=0, remove_unused_columns=False,
            disable_tqdm=True, dataloader_num_workers=0)
        trainer = RecordingTrainer(model=model, args=args, train_dataset=dataset)
        trainer.micro_losses = []
        assert trainer.model_accepts_loss_kwargs  # so num_items_in_batch reaches the model
        trainer.train()
        logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        return trainer.micro_losses, logged, head_calls, model.state_dict()

    plain_losses, plain_logged, plain_calls, plain_state = train(patched=False)
    fused_losses, fused_logged, fused_calls, fused_state = train(patched=True)
    assert len(plain_losses) == len(fused_losses) == 6 and len(fused_logged) == 3
    assert not any(plain_calls) and all(fused_calls) and len(fused_calls) == 6
    for fused, plain in zip(fused_losses + fused_logged, plain_losses + plain_logged):
        assert abs(fused - plain) <= 1e-4 * abs(plain), (fused_losses, plain_losses)
    for name, tensor in fused_state.items():
        assert rel_error(tensor, plain_state[name]) < 1e-4, name


def test_deepcopy_of_a_patched_model_is_patched_independently():
    model = tiny_model()
    apply_fused_cross_entropy(model)
    clone = copy.deepcopy(model)
    revert_fused_cross_entropy(model)
    input_ids, labels = make_batch()
    assert clone(input_ids=input_ids, labels=labels).logits is None
    assert model(input_ids=input_ids, labels=labels).logits is not None
    clone.zero_grad(set_to_none=True)
    clone(input_ids=input_ids, labels=labels).loss.backward()
    assert clone.lm_head.weight.grad is not None and model.lm_head.weight.grad is None


def test_hf_trainer_example_trains_a_vpit_model():
    from vpit_fast.integrations.trainer_example import main

    losses = main(["--max-steps", "15", "--records", "60", "--batch-size", "2"])
    assert len(losses) >= 2 and losses[-1] < losses[0]
