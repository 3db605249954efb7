"""The decode step's decoder layers through the fused decode-layer ops, for LLaMA-family LLMs.

transformers' decoder layer runs about fifteen kernels per decode step (norms, separate q / k / v
projections, RoPE, cache writes, the MLP halves, residual adds); `FusedDecodeLayers` runs each
layer as four ops plus attention (`vpit_fast.ops.decode_layer`, `vpit_fast.ops.decode_attention`)
over the same weights and the same transformers ``StaticCache``, with no copy of any weight. It
covers the LLM families whose layers are LLaMA's (LLaMA, Qwen2, Mistral: RMSNorm, RoPE with
static frequencies, SiLU-gated MLP, optional projection biases); `unsupported_reason` says why
another model is not covered, and `vpit_fast.generation` then runs transformers' layers.
"""

import torch

from vpit_fast.ops.decode_layer import MAX_ROWS

__all__ = ["AUTO_MAX_ROWS", "FusedDecodeLayers", "MAX_ROWS", "unsupported_reason"]

# Rows up to which `generate(fused_layers="auto")` takes the fused layers on CUDA: what was measured
# faster. H100, LLaMA-3.2-1B, bf16: at 1 row a decode step took 1.64 ms against 2.82 ms with
# transformers' layers (CUDA graph; 1.61 against 1.87 ms compiled). At 4 rows the fused kernels
# took 118-150 us a layer against 61-72 us at 1 row (benchmarks/RESULTS.md), and no comparison with
# transformers' layers at 2-8 rows has been made, so those run transformers' layers unless
# ``fused_layers=True`` asks (the ops take up to MAX_ROWS rows).
AUTO_MAX_ROWS = 1

MODEL_TYPES = ("llama", "qwen2", "mistral")
# RoPE types whose frequencies are fixed at load time (dynamic types change them per sequence).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
_PROJECTIONS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                ("mlp", ("gate_proj", "up_proj", "down_proj")))
_NORMS = ("input_layernorm", "post_attention_layernorm")


def unsupported_reason(llm):
    """None when `FusedDecodeLayers` runs ``llm`` (a transformers causal LM), else why not (str)."""
    config = llm.config.get_text_config()
    if config.model_type not in MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {MODEL_TYPES}"
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act {getattr(config, 'hidden_act', None)!r} is not 'silu'"
    dtype = llm.get_input_embeddings().weight.dtype
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the model is {dtype}; the fused kernels take float32, bfloat16 or float16"
    base = llm.base_model
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        return "the model has no rotary_emb with inv_freq"
    if getattr(rotary, "rope_type", "default") not in STATIC_ROPE_TYPES:
        return f"RoPE type {rotary.rope_type!r} is not one of {STATIC_ROPE_TYPES}"
    for i, layer in enumerate(base.layers):
        for block_name, names in _PROJECTIONS:
            block = getattr(layer, block_name, None)
            for name in names:
                if not isinstance(getattr(block, name, None), torch.nn.Linear):
                    return f"layer {i} has no nn.Linear {block_name}.{name}"
        for name in _NORMS:
            norm = getattr(layer, name, None)
            if norm is None or not hasattr(norm, "variance_epsilon") or norm.weight is None:
                return f"layer {i}'s {name} is not an RMSNorm with a weight"
        if any(hasattr(layer.self_attn, name) for name in ("q_norm", "k_norm")):
            return f"layer {i} normalises queries and keys (q_norm / k_norm)"
    return None


class FusedDecodeLayers:
    """The decoder layers and final norm of ``llm`` for one new token per row, over ``cache``
    (a transformers ``StaticCache`` whose layers are allocated). Weights are read from the
    modules at each call, so the model's current weights are always the ones used."""

    def __init__(self, llm, cache):
        reason = unsupported_reason(llm)
        if reason is not None:
            raise ValueError(f"FusedDecodeLayers does not cover this model: {reason}")
        self.base = llm.base_model
        self.cache = cache

    def __call__(self, embeds, positions, cursor, key_valid):
        """embeds ``[R, H]`` (the new tokens' input embeddings); positions ``[R]`` int64; cursor:
        one-element int64 cache slot of the new tokens; key_valid ``[R, L]`` bool (the slot
        ``cursor`` included). Writes each layer's k and v at slot ``cursor``. Returns the final
        norm's output ``[R, H]``."""
        ops = torch.ops.vpit_fast
        rotary = self.base.rotary_emb
        inv_freq = rotary.inv_freq.float()  # a model cast to bf16 casts this buffer too; transformers reads it so
        x = embeds.clone()  # the residual stream, updated in place
        rows = x.shape[0]
        for layer, cached in zip(self.base.layers, self.cache.layers):
            attn, mlp = layer.self_attn, layer.mlp
            ln1, ln2 = layer.input_layernorm, layer.post_attention_layernorm
            q = ops.decode_qkv_rope(x, ln1.weight, ln1.variance_epsilon, attn.q_proj.weight, attn.k_proj.weight,
                                    attn.v_proj.weight, attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias,
                                    inv_freq, rotary.attention_scaling, positions, cursor, cached.keys,
                                    cached.values)
            a = ops.decode_attention(q, cached.keys, cached.values, key_valid, float(attn.scaling))
            ops.decode_proj_add_(x, a.view(rows, -1), attn.o_proj.weight, attn.o_proj.bias)
            m = ops.decode_gate_up(x, ln2.weight, ln2.variance_epsilon, mlp.gate_proj.weight, mlp.up_proj.weight,
                                   mlp.gate_proj.bias, mlp.up_proj.bias)
            ops.decode_proj_add_(x, m, mlp.down_proj.weight, mlp.down_proj.bias)
        return self.base.norm(x)
