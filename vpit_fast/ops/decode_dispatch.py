"""The modality-switched dispatch of one decode step (MetaMorph generation), fused.

Every row of the batch goes through both paths, and its mode picks the result: two compiled ops
around the adapter, which stays two cuBLAS/ATen GEMMs:

1. ``decode_dispatch_prepare``: one kernel (one warp per row on CUDA) computes each row's emitted
   id, its visual token (normalised in fp32 when asked, zero on rows that emit none), whether it
   emits one, and the new state;
2. ``adapter(visual)`` (the caller's module);
3. ``decode_dispatch_assemble``: one kernel writes the next input embeddings, the adapter output
   on rows that emit a visual token and the embedding-table row of the emitted id elsewhere.

No host sync anywhere on CUDA, so the step can be captured in a CUDA graph; fake implementations
let torch.compile trace it. Inference only: the ops have no backward (use ``impl="torch"`` when
gradients must flow).

Ids outside the embedding table: on CPU the assemble op raises (the check is free there). On CUDA
a host check would need a sync, so the kernel checks each gathered id on the device and raises a
device-side assertion instead of reading out of bounds (as PyTorch's own ``index_select`` does);
the CUDA context is then unusable, as after any device assert. In generation the ids come from
the sampler, which never samples outside the text vocabulary, and the fixed special ids are
checked here, on the host, before the launch.
"""

import torch

from vpit_fast import _extension
from vpit_fast.ops import reference
from vpit_fast.ops.reference import DONE, IMAGE_MODE, TEXT

__all__ = ["DONE", "IMAGE_MODE", "TEXT", "dispatch_next_inputs"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

if _extension._C is not None:

    @torch.library.register_fake("vpit_fast::decode_dispatch_prepare")
    def _(mode, visual_count, images_left, text_ids, visual_pred, eos_ids, num_visual_tokens,
          image_start_id, image_end_id, image_token_id, pad_id, normalize):
        batch = mode.shape[0]
        return (mode.new_empty(batch), visual_pred.new_empty(visual_pred.shape),
                mode.new_empty(batch, dtype=torch.bool), mode.new_empty(batch), mode.new_empty(batch),
                mode.new_empty(batch))

    @torch.library.register_fake("vpit_fast::decode_dispatch_assemble")
    def _(next_ids, emits_visual, adapted, token_embedding):
        return token_embedding.new_empty((next_ids.shape[0], token_embedding.shape[1]))

    # Without an autograd registration torch would only warn and return wrong (missing)
    # gradients; a backward that says why is the honest inference-only contract.
    def _no_backward(ctx, *grads):
        raise RuntimeError('vpit_fast.dispatch_next_inputs: the compiled decode dispatch is inference only and '
                           'has no backward; use impl="torch" where gradients must flow')

    for _name in ("decode_dispatch_prepare", "decode_dispatch_assemble"):
        torch.library.register_autograd(f"vpit_fast::{_name}", _no_backward)


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _check(mode, visual_count, images_left, text_ids, visual_pred, token_embedding, eos_ids, ids, impl):
    """Raises TypeError/ValueError naming the argument; ``ids``: name -> int of the fixed ids."""
    tensors = dict(mode=mode, visual_count=visual_count, images_left=images_left, text_ids=text_ids,
                   visual_pred=visual_pred, token_embedding=token_embedding, eos_ids=eos_ids)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if mode.dim() != 1:
        raise ValueError(f"mode must be [B], got shape {tuple(mode.shape)}")
    batch = mode.shape[0]
    for name in ("mode", "visual_count", "images_left", "text_ids", "eos_ids"):
        t = tensors[name]
        if t.dtype != torch.int64:
            raise TypeError(f"{name} must be int64, got {t.dtype}")
        if name != "eos_ids" and tuple(t.shape) != (batch,):
            raise ValueError(f"{name} must be [{batch}] like mode, got shape {tuple(t.shape)}")
    if eos_ids.dim() != 1:
        raise ValueError(f"eos_ids must be [E], got shape {tuple(eos_ids.shape)}")
    floats = _FLOAT_DTYPES + ((torch.float64,) if impl == "torch" else ())
    for name in ("visual_pred", "token_embedding"):
        if tensors[name].dtype not in floats:
            raise TypeError(f'{name} must be float32, bfloat16 or float16 (or float64 with impl="torch"), '
                            f"got {tensors[name].dtype}")
    if visual_pred.dim() != 2 or visual_pred.shape[0] != batch or visual_pred.shape[1] == 0:
        raise ValueError(f"visual_pred must be [{batch}, Dv] with Dv > 0, got shape {tuple(visual_pred.shape)}")
    if token_embedding.dim() != 2:
        raise ValueError(f"token_embedding must be [V, H], got shape {tuple(token_embedding.shape)}")
    for name, t in tensors.items():
        if t.device != mode.device:
            raise ValueError(f"{name} is on {t.device} but mode is on {mode.device}: all tensors must share a device")
    vocab = token_embedding.shape[0]
    for name, value in ids.items():
        if not _is_int(value):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if name == "num_visual_tokens":
            if value < 0:
                raise ValueError(f"num_visual_tokens must be >= 0, got {value}")
        elif not 0 <= value < vocab:
            raise ValueError(f"{name} = {value} is outside token_embedding's {vocab} rows")


def dispatch_next_inputs(mode, visual_count, images_left, text_ids, visual_pred, token_embedding, adapter, *,
                         num_visual_tokens, image_start_id, image_end_id, image_token_id, pad_id, eos_ids,
                         normalize, impl="auto"):
    """The modality dispatch and state update of one decode step, for B rows at once: the
    fused version of `vpit_fast.ops.reference.dispatch_next_inputs` (same arguments, same
    results; see its docstring for the per-row rules).

    Args (all tensors on one device):
        mode, visual_count, images_left, text_ids: ``[B]`` int64 (mode 0 text, 1 image, 2 done).
        visual_pred: ``[B, Dv]`` float32, bfloat16 or float16, the vision head's predictions.
        token_embedding: ``[V, H]`` float32, bfloat16 or float16, the input embedding table (read
            in place: any layout whose rows are contiguous).
        adapter: callable ``[B, Dv] -> [B, H]``, run in its parameters' dtype on the emitted
            visual tokens (zero rows where none is emitted); its output is cast to the table's dtype.
        num_visual_tokens, image_start_id, image_end_id, image_token_id, pad_id: ints; the ids
            must be rows of token_embedding.
        eos_ids: ``[E]`` int64 end-of-turn ids (E may be 0).
        normalize: L2-normalise the visual tokens in fp32 (eps 1e-12, as ``F.normalize``).
        impl: ``"auto"`` (the compiled ops on cpu and cuda) or ``"torch"`` (the reference; it also
            takes float64 and carries gradients). The compiled path has no backward.

    Returns:
        (next_embeds ``[B, H]`` in token_embedding's dtype, next_ids ``[B]`` int64, visual
        ``[B, Dv]`` in visual_pred's dtype, mode, visual_count, images_left ``[B]`` int64), new
        tensors. ids and state are exactly the reference's; visual tokens equal it without
        normalisation and agree to rounding with it.
    """
    if impl not in ("auto", "torch"):
        raise ValueError(f'impl must be "auto" or "torch", got {impl!r}')
    ids = dict(num_visual_tokens=num_visual_tokens, image_start_id=image_start_id, image_end_id=image_end_id,
               image_token_id=image_token_id, pad_id=pad_id)
    _check(mode, visual_count, images_left, text_ids, visual_pred, token_embedding, eos_ids, ids, impl)
    if impl == "torch":
        return reference.dispatch_next_inputs(mode, visual_count, images_left, text_ids, visual_pred,
                                              token_embedding, adapter, eos_ids=eos_ids, normalize=normalize, **ids)
    if mode.device.type not in ("cpu", "cuda"):
        raise ValueError(f'mode is on {mode.device}; the compiled ops run on cpu and cuda: use impl="torch"')
    _extension.extension()
    ops = torch.ops.vpit_fast
    next_ids, visual, emits_visual, new_mode, new_count, new_left = ops.decode_dispatch_prepare(
        mode, visual_count, images_left, text_ids, visual_pred, eos_ids, num_visual_tokens, image_start_id,
        image_end_id, image_token_id, pad_id, bool(normalize))
    adapter_dtype = next(iter(adapter.parameters())).dtype if hasattr(adapter, "parameters") else visual.dtype
    adapted = adapter(visual.to(adapter_dtype)).to(token_embedding.dtype)
    next_embeds = ops.decode_dispatch_assemble(next_ids, emits_visual, adapted, token_embedding)
    return next_embeds, next_ids, visual, new_mode, new_count, new_left
