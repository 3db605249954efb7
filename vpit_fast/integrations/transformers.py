"""Fused linear cross-entropy for Hugging Face causal LMs: the training loss of a
``LlamaForCausalLM`` (or Qwen2, Mistral, ... see `SUPPORTED_ARCHITECTURES`) computed by
`vpit_fast.head_loss`, without ever materialising the ``[batch, seq, vocab]`` logits.

Usage, before handing the model to a trainer::

    from vpit_fast.integrations.transformers import apply_fused_cross_entropy
    apply_fused_cross_entropy(model)      # returns a handle; handle.revert() undoes it
    Trainer(model=model, ...).train()

What changes. With ``labels``, the patched forward returns a ``CausalLMOutputWithPast`` whose
``loss`` is the fused loss and whose ``logits`` is **None**: not computing the logits is the point
(at a 128k vocabulary they are the largest activation of the model). Everything else follows
Hugging Face's ``ForCausalLMLoss``: labels are shifted (the hidden state at t predicts
``labels[t+1]``; a ``shift_labels`` keyword is used as given), ``ignore_index`` rows cost nothing,
the loss is the mean over the valid targets, or their sum divided by ``num_items_in_batch`` when
that is given (the Trainer's gradient-accumulation normalisation). Without ``labels`` the original
forward runs untouched, so inference and ``generate`` return exactly the same logits.

Design: the loss is computed inside the forward of the module that owns the LM-head weight.
DeepSpeed ZeRO-3 gathers a module's partitioned parameters in that module's forward pre-hook (and
again in backward, through hooks on that forward's outputs); FSDP2 does the same for a module it
shards. A fused loss that reads ``model.lm_head.weight`` from outside ``lm_head``'s forward sees
the empty shard under ZeRO-3. Here the patched model forward runs the decoder, then calls
``self.lm_head(hidden, labels=shifted_labels, ...)`` through ``nn.Module.__call__``, so every hook
on ``lm_head`` runs, and ``lm_head``'s forward (patched too) calls `vpit_fast.head_loss` with its own
``self.weight`` and returns the scalar loss, a tensor output that ZeRO-3 and FSDP2 hook for
backward. ``lm_head`` stays the same ``nn.Linear`` object holding the same Parameter (tied
embeddings stay tied), and nothing is registered as a parameter, buffer or submodule, so the state
dict, ``save_pretrained`` and ``from_pretrained`` are unchanged. Both patches are instance
attributes named ``forward`` (the class is untouched, so other models of the same class are not
affected, and module hooks added before or after still run); reverting removes them and restores
any ``forward`` attribute that was there before (e.g. accelerate's device-map hook).

Limits: ``logits_to_keep`` must be 0 when ``labels`` are given (as in Hugging Face, where any
other value breaks the loss); a batch with no valid target gives loss 0, not Hugging Face's NaN;
``nn.DataParallel`` replicas would call the original module's patched forward (use DDP / torchrun);
weights offloaded by accelerate (``device_map`` with CPU/disk offload) are not loaded for the
fused path; an ``lm_head`` replaced after patching (``resize_token_embeddings``, a LoRA adapter on
``lm_head``) is refused at the next labelled forward: revert, change, apply again.
"""

import types

import torch
import torch.nn.functional as F
from torch import nn
from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
from transformers.modeling_outputs import CausalLMOutputWithPast

from vpit_fast.ops.head_loss import head_loss

# Classes whose forward is Llama's line for line (decoder -> slice_logits_to_keep -> lm_head ->
# ForCausalLMLoss) in transformers 5.x; a subclass that overrides forward is refused.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM", "MistralForCausalLM", "Ministral3ForCausalLM", "Qwen2ForCausalLM",
    "Qwen3ForCausalLM", "Phi3ForCausalLM", "GemmaForCausalLM", "OlmoForCausalLM",
    "Olmo2ForCausalLM", "SmolLM3ForCausalLM", "Starcoder2ForCausalLM",
)

_PATCH_ATTR = "_vpit_fused_cross_entropy"  # the handle, on the patched model
_LINEAR_FORWARD_ATTR = "_vpit_linear_forward"  # lm_head's forward from before the patch
_COMPILED_DEVICES = ("cpu", "cuda")


class FusedCrossEntropyPatch:
    """What `apply_fused_cross_entropy` returns. ``revert()`` (or leaving a ``with`` block) puts
    the model back as it was.

    Attributes:
        model: the patched model.
        lm_head: the ``nn.Linear`` patched to take ``labels``.
        impl, max_chunk_bytes: passed to `vpit_fast.head_loss`.
        original_forward: the model's forward from before the patch (bound).
    """

    def __init__(self, model, impl, max_chunk_bytes):
        self.model = model
        self.lm_head = model.lm_head
        self.impl = impl
        self.max_chunk_bytes = max_chunk_bytes
        self.original_forward = model.forward
        # An instance-level forward that was already there (accelerate's hook) comes back on revert.
        self._previous_model_forward = vars(model).get("forward")
        self._previous_head_forward = vars(self.lm_head).get("forward")

    def _install(self):
        setattr(self.lm_head, _LINEAR_FORWARD_ATTR, self.lm_head.forward)
        self.lm_head.forward = types.MethodType(_lm_head_forward, self.lm_head)
        setattr(self.model, _PATCH_ATTR, self)
        self.model.forward = types.MethodType(_fused_causal_lm_forward, self.model)

    @property
    def active(self):
        """Whether this patch is still installed on its model."""
        return vars(self.model).get(_PATCH_ATTR) is self

    def revert(self):
        """Restore the model's and lm_head's original forward. Reverting twice is an error."""
        if not self.active:
            raise RuntimeError("this fused cross-entropy patch was already reverted")
        for module, previous in ((self.model, self._previous_model_forward),
                                 (self.lm_head, self._previous_head_forward)):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        delattr(self.lm_head, _LINEAR_FORWARD_ATTR)
        delattr(self.model, _PATCH_ATTR)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.revert()


def _supported_class(model):
    """The supported transformers class whose forward `model` runs, or None."""
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED_ARCHITECTURES and cls.__module__.startswith("transformers.models."):
            return cls if type(model).forward is cls.forward else None
    return None


def apply_fused_cross_entropy(model, *, impl="auto", max_chunk_bytes=None):
    """Make ``model(..., labels=labels)`` compute its loss with `vpit_fast.head_loss` inside
    ``model.lm_head``'s forward, with ``logits=None`` in the output (see the module docstring).

    Args:
        model: a Hugging Face causal LM of one of `SUPPORTED_ARCHITECTURES` (an instance of a
            subclass that keeps the class's forward is accepted), with a bias-free ``lm_head``
            and the default causal-LM loss. Apply before wrapping it (DeepSpeed, FSDP, DDP,
            ``torch.compile``) or after; revert in the reverse order.
        impl: ``"auto"`` (the compiled kernels; devices other than cpu and cuda fall back to the
            pure-PyTorch reference) or ``"torch"`` (always the reference).
        max_chunk_bytes: bound on the kernels' logits buffer (`vpit_fast.head_loss`'s default
            when None).

    Returns:
        A `FusedCrossEntropyPatch`. Applying to an already patched model returns its patch.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers causal LM (nn.Module), got {type(model).__name__}")
    existing = vars(model).get(_PATCH_ATTR)
    if existing is not None:
        return existing
    if impl not in ("auto", "torch"):
        raise ValueError(f'impl must be "auto" or "torch", got {impl!r}')
    if max_chunk_bytes is not None and int(max_chunk_bytes) <= 0:
        raise ValueError(f"max_chunk_bytes must be positive, got {max_chunk_bytes}")
    if _supported_class(model) is None:
        raise ValueError(
            f"model is a {type(model).__name__}; apply_fused_cross_entropy supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (and subclasses that keep their forward), whose "
            "forward it reproduces")
    lm_head = getattr(model, "lm_head", None)
    if not isinstance(lm_head, nn.Linear) or lm_head.bias is not None:
        raise ValueError(f"model.lm_head must be an nn.Linear without bias, got {lm_head!r}")
    if "_loss_function" in vars(model) or LOSS_MAPPING.get(getattr(model, "loss_type", None)) not in (
            None, ForCausalLMLoss):
        raise ValueError("model has a custom loss_function or loss_type; the fused loss replaces only "
                         "the default causal-LM cross-entropy")
    patch = FusedCrossEntropyPatch(model, impl, max_chunk_bytes)
    patch._install()
    return patch


def revert_fused_cross_entropy(model):
    """Undo `apply_fused_cross_entropy` on ``model``; a ValueError when it is not patched."""
    patch = vars(model).get(_PATCH_ATTR) if isinstance(model, nn.Module) else None
    if patch is None:
        raise ValueError("model is not patched by apply_fused_cross_entropy")
    patch.revert()


def _fused_causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None,
                             past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                             logits_to_keep=0, **kwargs):
    """The supported classes' forward, with the loss computed by ``self.lm_head(hidden,
    labels=...)`` and ``logits=None`` when labels are given; the original forward otherwise.
    Same signature as the original (HF Trainer reads it: ``**kwargs`` makes it pass
    ``num_items_in_batch``)."""
    patch = vars(self)[_PATCH_ATTR]
    if labels is None:
        return patch.original_forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
            use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
    if not isinstance(logits_to_keep, int) or logits_to_keep != 0:
        raise ValueError("logits_to_keep must be 0 when labels are given (the loss needs every position)")
    if vars(self.lm_head).get(_LINEAR_FORWARD_ATTR) is None:
        raise RuntimeError("model.lm_head was replaced after apply_fused_cross_entropy (e.g. by "
                           "resize_token_embeddings); revert_fused_cross_entropy(model) and apply it again")
    # As transformers' can_return_tuple: an explicit return_dict wins over the config's.
    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)

    # Like the original, every keyword reaches the decoder too (it ignores the loss ones).
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, **kwargs)
    hidden = outputs.last_hidden_state
    ignore_index = kwargs.get("ignore_index", -100)
    shift_labels = kwargs.get("shift_labels")
    if shift_labels is None:  # the hidden state at t predicts labels[t + 1]
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if tuple(shift_labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must be [batch, seq] = {tuple(hidden.shape[:-1])}, got "
                         f"{tuple(shift_labels.shape)}")
    loss = self.lm_head(hidden.reshape(-1, hidden.shape[-1]), labels=shift_labels.reshape(-1),
                        ignore_index=ignore_index, num_items_in_batch=kwargs.get("num_items_in_batch"),
                        impl=patch.impl, max_chunk_bytes=patch.max_chunk_bytes)
    output = CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                    hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    return output if return_dict else output.to_tuple()


def _lm_head_forward(self, hidden, labels=None, *, ignore_index=-100, num_items_in_batch=None,
                     impl="auto", max_chunk_bytes=None):
    """The patched ``lm_head.forward``. Without labels: the original ``nn.Linear`` forward.
    With ``labels`` ``[N]`` (already shifted, ``ignore_index`` where there is no target) and
    ``hidden`` ``[N, H]``: the float32 scalar cross-entropy through ``self.weight``, the mean over
    the valid rows, or their sum / ``num_items_in_batch`` when that is given."""
    if labels is None:
        return vars(self)[_LINEAR_FORWARD_ATTR](hidden)
    weight = self.weight
    # Under device_map the decoder's last layer may sit elsewhere (HF moves labels to the logits).
    hidden, labels = hidden.to(weight.device), labels.to(weight.device, torch.int64)
    device_type = weight.device.type
    if impl == "auto" and device_type not in _COMPILED_DEVICES:
        impl = "torch"
    reduction = "mean" if num_items_in_batch is None else "sum"
    # Text only: no vision head, no visual rows. head_loss casts to the autocast dtype itself.
    result = head_loss(hidden, weight, labels, labels.new_empty(0), hidden.new_empty((0, 1)), None,
                       ignore_index=ignore_index, reduction=reduction, impl=impl, max_chunk_bytes=max_chunk_bytes)
    loss = result.loss
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss

