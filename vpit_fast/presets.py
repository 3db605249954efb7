"""Model shapes by name: the embedded default's tiny LLaMA and SigLIP, and random-weight stand-ins
with the shapes of the paper's models (for benchmarks and scaling runs; nothing is downloaded).

`llm_config(name, vocab_size)` returns a transformers ``LlamaConfig``; `encoder_config(name)` a
``SiglipVisionConfig``. `local_pretrained(name)` names the real checkpoint of a preset when it is in
the local Hugging Face cache: `vpit-train` then loads its weights instead of random ones. Any other
checkpoint is loaded by hub name or path (see `vpit_fast.VPiTModel.from_base`).
"""

from transformers import LlamaConfig, SiglipVisionConfig

__all__ = ["ENCODERS", "LLMS", "PRETRAINED", "encoder_config", "llm_config", "local_pretrained"]

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

# Name -> LlamaConfig fields (vocab_size comes from the tokenizer, or the model's own 128256).
LLMS = {
    # The embedded default: small enough to train on two CPU cores in minutes.
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False),
    "llama3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                        num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
                        rms_norm_eps=1e-5, tie_word_embeddings=True, rope_scaling=_LLAMA3_ROPE),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                      tie_word_embeddings=False),
}
LLAMA3_VOCAB = 128256

# Name -> SiglipVisionConfig fields. "tiny" and "siglip-so400m" have a 27x27 patch grid and
# "tiny-local" a 9x9 one, so the real resampling to 8x8 runs for each.
ENCODERS = {
    "tiny": dict(image_size=108, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64),
    # The tiny train preset's encoder. Its visual tokens must be local (each shows only its own
    # place in the picture) for free-running generation to work: MetaMorph reads the penultimate
    # layer, which for this 1-layer tower is the patch embeddings plus position embeddings, with
    # no attention. The 2-layer "tiny" tower's penultimate layer has been through one attention
    # layer that (random weights) spreads the whole image into every token; the first generated
    # token, predicted from the text alone, then stayed at the dataset mean, every later token
    # followed from it, and the tiny model generated the same image for every prompt.
    # Patches of 12 pixels, about one token's cell each: a token is then a projection of its cell's
    # pixels, outline included. With 4-pixel patches a token was the mean of about 11 patch
    # embeddings, which keeps little more than how much of the cell is covered, and the shape's
    # kind (a few partly covered cells) was hard to learn and to retrieve
    # (benchmarks/RESULTS.md, "The embedded default").
    "tiny-local": dict(image_size=108, patch_size=12, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64),
    "siglip-so400m": dict(image_size=384, patch_size=14, hidden_size=1152, num_hidden_layers=27,
                          num_attention_heads=16, intermediate_size=4304),
}


# The checkpoints whose shapes the presets copy: used instead of random weights when present
# in the local Hugging Face cache (nothing is downloaded).
PRETRAINED = {
    "llama3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B-Instruct",
    "siglip-so400m": "google/siglip-so400m-patch14-384",
}


def local_pretrained(name):
    """The hub id of preset ``name``'s real checkpoint when its files are in the local Hugging Face
    cache, else None (the preset then builds random weights)."""
    repo = PRETRAINED.get(name)
    if repo is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, "config.json")
    return repo if isinstance(found, str) else None


def _lookup(table, name, what):
    if name not in table:
        raise ValueError(f"unknown {what} preset {name!r}; choose one of {sorted(table)}")
    return dict(table[name])


def llm_config(name, vocab_size=None, **overrides):
    """A ``LlamaConfig`` for preset ``name`` (see `LLMS`); ``vocab_size`` defaults to LLaMA-3's
    128256. Keyword arguments override fields."""
    fields = _lookup(LLMS, name, "LLM")
    fields["vocab_size"] = LLAMA3_VOCAB if vocab_size is None else vocab_size
    fields.update(overrides)
    return LlamaConfig(**fields)


def encoder_config(name, **overrides):
    """A ``SiglipVisionConfig`` for preset ``name`` (see `ENCODERS`)."""
    fields = _lookup(ENCODERS, name, "encoder")
    fields.update(overrides)
    return SiglipVisionConfig(**fields)
