"""`generate(..., compile_step=True)`: the decode step's model work compiled with torch.compile
(inductor) gives the uncompiled step's tokens, greedy and sampled (the draw stays eager, so a
seeded generator gives the same tokens), on tiny fp32 models; on CUDA also inside the CUDA graph."""

import pytest
import torch

from conftest import requires_cuda
from test_generation import IMAGE_PROMPT, RESPONSE, assert_same, mixed_batch, reference, tiny_model
from vpit_fast.generation import generate


def test_compiled_step_equals_uncompiled_step_greedy_and_sampled():
    model = tiny_model(normalize=True)
    batch = mixed_batch(model)
    plain = generate(model, **batch, max_new_tokens=72)
    assert_same(generate(model, **batch, max_new_tokens=72, compile_step=True), plain)
    assert len(plain[1].visual_tokens) == 1  # the image-mode row went through the vision head and adapter

    def sampled(compile_step):
        return generate(model, ["a", "b c"], max_new_tokens=12, temperature=1.0, top_k=10, compile_step=compile_step,
                        generator=torch.Generator().manual_seed(7))

    assert_same(sampled(True), sampled(False))


def test_compile_step_must_be_a_bool():
    model = tiny_model()
    with pytest.raises(ValueError, match="compile_step"):
        generate(model, "red", compile_step="yes")


@pytest.mark.cuda
@requires_cuda
def test_compiled_cuda_graph_decode_equals_eager_decode():
    model = tiny_model(normalize=True, device="cuda")
    batch = mixed_batch(model)
    eager = generate(model, **batch, max_new_tokens=72)
    compiled = generate(model, **batch, max_new_tokens=72, cuda_graph=True, compile_step=True)
    assert_same(compiled, eager, atol=1e-4)
    assert_same(generate(model, **batch, max_new_tokens=72, cuda_graph=True, compile_step=True), eager, atol=1e-4)
    guided = generate(model, **batch, max_new_tokens=72, cfg_scale=2.0)
    assert_same(generate(model, **batch, max_new_tokens=72, cfg_scale=2.0, cuda_graph=True, compile_step=True),
                guided, atol=1e-4)
    assert_same(eager, reference(model, **batch, max_new_tokens=72))
    images = dict(prompts=[IMAGE_PROMPT, "a"], response_prefix=RESPONSE, max_new_tokens=80)  # image-run steps
    assert_same(generate(model, **images, cuda_graph=True, compile_step=True), reference(model, **images), atol=1e-4)
