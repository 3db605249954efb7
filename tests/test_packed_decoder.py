"""`VPiTModel`'s packed LLaMA decoder (`vpit_fast.packed_llama`): no transformers mask code (which
reads position_ids on the host, a device sync each step) and, after `use_residual_norms`,
residual adds folded into the norms; the same hidden states and gradients as
`LlamaModel.forward`, in float64."""

import copy

import pytest
import torch

from conftest import rel_error


def _grads(model):
    return {name: p.grad for name, p in model.named_parameters()}


def _vpit():
    from transformers import LlamaConfig, LlamaForCausalLM

    from vpit_fast.data import build_tokenizer
    from vpit_fast.model import VPiTConfig, VPiTModel

    tokenizer = build_tokenizer()
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=16, max_position_embeddings=256))
    model = VPiTModel.from_base(llm, tokenizer, None, VPiTConfig(visual_dim=8, num_visual_tokens=4))
    return model.double()


def _packed(model, lengths):
    """A packed single-row batch of segments with the given lengths (positions restart per segment)."""
    T = sum(lengths)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return {"input_ids": torch.randint(10, model.config.text_vocab_size, (1, T)), "position_ids": positions,
            "cu_seqlens": cu, "max_seqlen": max(lengths)}


@pytest.mark.parametrize("residual_norms", [False, True], ids=["transformers-layers", "residual-norms"])
def test_packed_decoder_loop_equals_llama_forward_and_never_reads_positions_on_host(monkeypatch, residual_norms):
    """`VPiTModel` runs a packed batch's LLaMA layers itself; transformers' `LlamaModel.forward`
    over the same batch (which looks for packed rows in position_ids, a device sync) gives the
    same hidden states (bitwise: the forward runs the same ops) and gradients: bitwise with
    transformers' layers, within 1e-6 with the residual norms (their backward sums in fp32, as
    transformers' norm computes in fp32 even in a float64 model, in another order)."""
    import transformers.masking_utils as masking

    from vpit_fast.packed_llama import (ResidualLlamaDecoderLayer, ResidualRMSNorm, is_packed_llama,
                                        use_residual_norms, uses_residual_norms)

    model = _vpit()
    base = model.llm.base_model
    assert is_packed_llama(base) and not uses_residual_norms(base)
    if residual_norms:
        assert use_residual_norms(model.llm) == 3 * len(base.layers) + 1  # layers, their 2 norms, final norm
        assert isinstance(base.layers[0].input_layernorm, ResidualRMSNorm) and uses_residual_norms(base)
        assert all(isinstance(layer, ResidualLlamaDecoderLayer) for layer in base.layers)
    batch = _packed(model, [9, 17, 5, 12])
    reference = copy.deepcopy(model)

    def through_llama_model(embeds, position_ids, attention_mask, attention_kwargs):
        return reference.llm.base_model(inputs_embeds=embeds, position_ids=position_ids, use_cache=False,
                                        **attention_kwargs).last_hidden_state

    reference._decoder = through_llama_model
    hidden_ref = reference(**batch).hidden
    # a random projection: mean(hidden ** 2) of a norm's output is nearly constant, and its
    # gradient cancels to rounding noise
    probe = torch.randn_like(hidden_ref)
    (hidden_ref * probe).sum().backward()

    def no_host_read(position_ids):
        raise AssertionError("the packed loop must not call transformers' packed-sequence detection")

    monkeypatch.setattr(masking, "find_packed_sequence_indices", no_host_read)
    hidden = model(**batch).hidden
    (hidden * probe).sum().backward()
    assert torch.equal(hidden, hidden_ref)
    grads_ref = _grads(reference)
    for name, g in _grads(model).items():
        assert (g is None) == (grads_ref[name] is None), name
        if g is not None:
            assert g.abs().max() > 0, name
            if residual_norms:
                assert rel_error(g, grads_ref[name]) <= 1e-6, name
            else:
                assert torch.equal(g, grads_ref[name]), name
    # the reference path does call the detection, so the patch above is live
    with pytest.raises(AssertionError, match="packed-sequence detection"):
        reference(**batch)
