"""Response masks from chat templates without ``{% generation %}`` blocks (incremental rendering,
`vpit_fast.data.conversations`): identical to the generation-block path on our tokenizer, exact by
hand on LLaMA-3 and Qwen2 (ChatML) templates set on a copy of our word-level tokenizer, the
default template for a tokenizer without one, and the error for a template that is not
prefix-stable."""

import re

import pytest
import torch
from tokenizers import AddedToken

from vpit_fast.data.conversations import GENERATION_BLOCK, chat_template, encode_all, encode_conversation
from vpit_fast.data.shapes import ShapesDataset
from vpit_fast.data.tokenizer import CHAT_TEMPLATE, build_tokenizer, vocabulary

N = 2  # visual tokens per image

# The templates as their model cards ship them (LLaMA-3-8B-Instruct, Qwen2-7B-Instruct).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

RECORD = {"id": "two-turns", "image": ["a.png", "b.png"], "conversations": [
    {"from": "human", "value": "<image> What colour is the shape?"},
    {"from": "gpt", "value": "Red."},
    {"from": "human", "value": "Draw a red circle."},
    {"from": "gpt", "value": "Here is an image based on your request: <image>"}]}
IMG = ["<image_start>", *["<image>"] * N, "<image_end>"]
TARGET_IMG = [("<image_start>", True), *[("<image>", False)] * N, ("<image_end>", True)]


def prompt(*tokens):
    return [(t, False) for t in tokens]


def response(*tokens):
    return [(t, True) for t in tokens]


def with_template(template, special=(), words=()):
    """A fresh copy of our tokenizer with ``template``, the template's special tokens, a newline
    token (real tokenizers have one; our word-level one drops whitespace) and missing words."""
    tokenizer = build_tokenizer()
    tokenizer.add_tokens([AddedToken("\n", normalized=False, special=False)])
    tokenizer.add_tokens(list(special), special_tokens=True)
    tokenizer.add_tokens([w for w in words if w not in set(vocabulary())])
    tokenizer.chat_template = template
    return tokenizer


def check(tokenizer, record, expected):
    """The sample's tokens and labels are exactly ``expected``: (token, labelled) pairs."""
    sample = encode_conversation(record, tokenizer, num_visual_tokens=N)
    assert tokenizer.convert_ids_to_tokens(sample.input_ids.tolist()) == [t for t, _ in expected]
    labelled = torch.tensor([flag for _, flag in expected])
    assert torch.equal(sample.labels, torch.where(labelled, sample.input_ids, -100))
    return sample


def test_llama3_template():
    tokenizer = with_template(LLAMA3_TEMPLATE, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                              ["user", "assistant"])
    assert GENERATION_BLOCK.search(chat_template(tokenizer)) is None  # "add_generation_prompt" is no block
    user = prompt("<|start_header_id|>", "user", "<|end_header_id|>", "\n", "\n")
    assistant = prompt("<|start_header_id|>", "assistant", "<|end_header_id|>", "\n", "\n")
    sample = check(tokenizer, RECORD, [
        *prompt("<s>"), *user, *prompt(*IMG, "what", "colour", "is", "the", "shape", "?", "<|eot_id|>"),
        *assistant, *response("red", ".", "<|eot_id|>"),
        *user, *prompt("draw", "a", "red", "circle", ".", "<|eot_id|>"),
        *assistant, *response("here", "is", "an", "image", "based", "on", "your", "request", ":"), *TARGET_IMG,
        *response("<|eot_id|>")])
    assert sample.image_slots.tolist() == [7, 51] and sample.image_is_target.tolist() == [False, True]


def test_qwen2_chatml_template():
    tokenizer = with_template(QWEN2_TEMPLATE, ["<|im_start|>", "<|im_end|>"],
                              ["user", "assistant", "system", "helpful"])
    system = prompt("<|im_start|>", "system", "\n", "you", "are", "a", "helpful", "assistant", ".", "<|im_end|>",
                    "\n")
    user = prompt("<|im_start|>", "user", "\n")
    assistant = prompt("<|im_start|>", "assistant", "\n")
    # The newline after <|im_end|> belongs to the template, not to the response.
    check(tokenizer, RECORD, [
        *system, *user, *prompt(*IMG, "what", "colour", "is", "the", "shape", "?", "<|im_end|>", "\n"),
        *assistant, *response("red", ".", "<|im_end|>"), *prompt("\n"),
        *user, *prompt("draw", "a", "red", "circle", ".", "<|im_end|>", "\n"),
        *assistant, *response("here", "is", "an", "image", "based", "on", "your", "request", ":"), *TARGET_IMG,
        *response("<|im_end|>"), *prompt("\n")])


def test_same_labels_as_generation_blocks():
    ours = build_tokenizer()
    stripped = build_tokenizer()
    stripped.chat_template = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", CHAT_TEMPLATE)
    assert GENERATION_BLOCK.search(CHAT_TEMPLATE) and not GENERATION_BLOCK.search(stripped.chat_template)
    multi_turn = {**RECORD, "image": ["a", "b"]}
    records = [multi_turn, *ShapesDataset(size=21, seed=5)]  # every task, 3 times
    for a, b in zip(encode_all(records, ours, N), encode_all(records, stripped, N), strict=True):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
        assert (a.labels != -100).any()
        assert torch.equal(a.image_slots, b.image_slots) and torch.equal(a.image_is_target, b.image_is_target)


def test_no_template_uses_the_default():
    bare = build_tokenizer()
    bare.chat_template = None
    assert chat_template(bare) == CHAT_TEMPLATE
    record = {**RECORD, "image": ["a", "b"]}
    expected = encode_conversation(record, build_tokenizer(), N)
    got = encode_conversation(record, bare, N)
    assert torch.equal(got.input_ids, expected.input_ids) and torch.equal(got.labels, expected.labels)


def test_template_that_is_not_prefix_stable():
    # The message count up front changes the first token with every turn.
    tokenizer = build_tokenizer()
    tokenizer.chat_template = "{{- messages | length -}} " + re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "",
                                                                     CHAT_TEMPLATE)
    name = re.escape(type(tokenizer).__name__)
    with pytest.raises(ValueError, match=rf"tokenizer {name}\(.*not prefix-stable \(record 'two-turns'\)"):
        encode_conversation({**RECORD, "image": ["a", "b"]}, tokenizer, N)
    # A template error is not a malformed record: encode_all does not skip it.
    with pytest.raises(ValueError, match="prefix-stable"):
        encode_all([{**RECORD, "image": ["a", "b"]}], tokenizer, N)
