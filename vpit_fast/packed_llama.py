"""LLaMA's decoder stack over packed batches, as `VPiTModel` runs it in training.

Differences from `transformers.LlamaModel.forward`, same values:

- No mask is built. transformers' mask code reads ``position_ids`` on the host to look for packed
  rows (a device sync every step); the packed attention takes its segments from the
  ``cu_seq_lens_q`` kwargs instead. Always on for packed batches through LLaMA.
- Opt-in, `use_residual_norms(llm)`: each residual add is folded into the norm that follows it
  (`vpit_fast.ops.rms_norm`), so the backward reads each row once for the norm, the residual
  gradient and the weight gradient. It switches the model's `LlamaDecoderLayer` and
  `LlamaRMSNorm` modules to the subclasses here (in place; parameters and saved names
  unchanged). A layer called with ``pending=`` returns ``(residual, mlp_out)`` unsummed and the
  next layer's input norm (or the final norm) adds them; called without it, the subclasses run
  transformers' own forward, so generation, padded batches and any other caller see
  transformers' model. Off by default until its CUDA kernel has run on a GPU (README, "Not
  supported yet").
"""

import torch
from transformers.models.llama import modeling_llama

from vpit_fast.ops.rms_norm import add_rms_norm

__all__ = ["ResidualLlamaDecoderLayer", "ResidualRMSNorm", "is_packed_llama", "packed_llama_forward",
           "use_residual_norms", "uses_residual_norms"]


class ResidualRMSNorm(modeling_llama.LlamaRMSNorm):
    """`LlamaRMSNorm`; ``norm(x, delta)`` returns ``(x + delta, norm(x + delta))`` (`add_rms_norm`)."""

    def forward(self, hidden_states, delta=None):
        if delta is None:
            return super().forward(hidden_states)
        return add_rms_norm(hidden_states, delta, self.weight, self.variance_epsilon)


class ResidualLlamaDecoderLayer(modeling_llama.LlamaDecoderLayer):
    """`LlamaDecoderLayer`; with ``pending=`` (the previous layer's unsummed MLP output) it returns
    ``(residual, mlp_out)`` and leaves their sum to the next norm."""

    def forward(self, hidden_states, *args, pending=None, **kwargs):
        if pending is None:
            return super().forward(hidden_states, *args, **kwargs)
        if args:
            raise TypeError("ResidualLlamaDecoderLayer with pending= takes keyword arguments only")
        residual, normed = self.input_layernorm(hidden_states, pending)
        attended, _ = self.self_attn(hidden_states=normed, **kwargs)
        residual, normed = self.post_attention_layernorm(residual, attended)
        return residual, self.mlp(normed)


_SWAPS = {modeling_llama.LlamaDecoderLayer: ResidualLlamaDecoderLayer,
          modeling_llama.LlamaRMSNorm: ResidualRMSNorm}


def use_residual_norms(llm):
    """Switches ``llm``'s `LlamaDecoderLayer` and `LlamaRMSNorm` modules (exact classes: other
    architectures and subclasses are left alone) to the subclasses above. Returns how many."""
    switched = 0
    for module in llm.modules():
        swap = _SWAPS.get(type(module))
        if swap is not None:
            module.__class__ = swap
            switched += 1
    return switched


def is_packed_llama(base):
    """Whether `packed_llama_forward` runs ``base`` (an LLM's ``base_model``): transformers'
    `LlamaModel` itself, not a subclass that may change its forward."""
    return type(base) is modeling_llama.LlamaModel


def _unwrapped(module):
    """The decoder layer under torch.compile's and activation checkpointing's wrappers."""
    for attribute in ("_orig_mod", "_checkpoint_wrapped_module"):
        module = getattr(module, attribute, module)
    return module


def uses_residual_norms(base):
    """Whether `use_residual_norms` switched every layer and the final norm of ``base``."""
    return isinstance(base.norm, ResidualRMSNorm) and all(
        isinstance(_unwrapped(layer), ResidualLlamaDecoderLayer) for layer in base.layers)


def packed_llama_forward(base, embeds, position_ids, attention_kwargs):
    """The final hidden states ``[B, T, H]`` of `LlamaModel` ``base`` for input embeddings
    ``embeds`` ``[B, T, H]``, ``position_ids`` ``[B, T]`` and the packed attention's kwargs."""
    rotary = base.rotary_emb(embeds, position_ids)
    layers = base.layers[: base.config.num_hidden_layers]
    kwargs = dict(attention_mask=None, position_ids=position_ids, position_embeddings=rotary, **attention_kwargs)
    if not uses_residual_norms(base):
        hidden = embeds
        for layer in layers:
            hidden = layer(hidden, **kwargs)
        return base.norm(hidden)
    # the first layer's input norm adds the embeddings to zeros that require grad as its other
    # inputs do, so every layer has one signature (one compiled graph for all of them)
    hidden, pending = torch.zeros_like(embeds).requires_grad_(embeds.requires_grad), embeds
    for layer in layers:
        hidden, pending = layer(hidden, pending=pending, **kwargs)
    return base.norm(hidden, pending)[1]
