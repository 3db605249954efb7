"""The word-level tokenizer of the embedded default, built with the `tokenizers` library over the
closed vocabulary of the shapes dataset and wrapped as a `transformers.PreTrainedTokenizerFast`
with a chat template.

Normalisation (what ``decode(encode(text))`` gives back, see `normalize_text`): lower case; words
separated by single spaces; punctuation marks stand alone as tokens and decode attached to the
word before them with one space after (``"left."``, ``"request: <image>"``); every digit is its own
token, so numbers decode with spaces between digits (``"12"`` -> ``"1 2"``; the dataset only uses
single digits). Special tokens are never lower-cased or split.
"""

import re

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from vpit_fast.data.shapes import IMAGE, vocabulary

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
USER, ASSISTANT, END = "<|user|>", "<|assistant|>", "<|end|>"
IMAGE_START, IMAGE_END = "<image_start>", "<image_end>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, USER, ASSISTANT, END, IMAGE, IMAGE_START, IMAGE_END)  # ids 0..9
PUNCTUATION = ".,?:!;"

# Roles may be given LLaVA-style ({"from": "human"|"gpt", "value"}) or HF-style ({"role", "content"}).
# The assistant's text and its <|end|> sit in a generation block, so
# apply_chat_template(..., return_assistant_tokens_mask=True) marks exactly the tokens VPiT trains on.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set role = message['role'] if message['role'] is defined else message['from'] -%}"
    "{%- set content = message['content'] if message['content'] is defined else message['value'] -%}"
    "{%- if role == 'user' or role == 'human' -%}"
    "{{- '<|user|> ' + content + ' <|end|>\n' -}}"
    "{%- elif role == 'assistant' or role == 'gpt' -%}"
    "{{- '<|assistant|> ' -}}{%- generation -%}{{- content + ' <|end|>' -}}{%- endgeneration -%}{{- '\n' -}}"
    "{%- else -%}"
    "{{- raise_exception('unknown role: ' + role) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|> ' -}}{%- endif -%}"
)


def normalize_text(text):
    """The form ``decode(encode(text))`` returns (see the module docstring). Returns a str."""
    text = text.lower()
    text = re.sub(r"(\d)(?=\d)", r"\1 ", text)
    text = re.sub(rf"\s*([{re.escape(PUNCTUATION)}])", r"\1 ", text)
    return " ".join(text.split())


def _backend(words):
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(f"[{re.escape(PUNCTUATION)}]"), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    # WordPiece puts a space before every token but the first; the replacements then pull
    # punctuation back onto the word before it (each decoder step sees one token at a time).
    tokenizer.decoder = decoders.Sequence([
        decoders.WordPiece(prefix="##", cleanup=False),
        *[decoders.Replace(" " + p, p) for p in PUNCTUATION],
    ])
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])])
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def build_tokenizer(save_dir=None):
    """Builds the tokenizer: ids 0..9 are `SPECIAL_TOKENS`, then the dataset's words in sorted
    order; plain ``encode`` prepends ``<s>`` (LLaMA's convention), the chat template does too.
    ``eos_token`` is ``<|end|>``, so generation stops at the end of the assistant's turn.
    Saves it with ``save_pretrained(save_dir)`` when given (reload with
    ``AutoTokenizer.from_pretrained(save_dir)``). Returns a ``PreTrainedTokenizerFast``."""
    # Imported here so `vpit_fast.data.shapes` works without transformers installed.
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_backend(vocabulary()),
        bos_token=BOS, eos_token=END, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=[EOS, USER, ASSISTANT, IMAGE, IMAGE_START, IMAGE_END],
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer
