"""`Fp32GradSum`: micro-batch gradients of bf16 parameters summed in fp32 and rounded once, as
`vpit-train` does on one GPU with grad_accum > 1 (autograd would sum them in bf16)."""

import torch

from vpit_fast.train.grad_accum import Fp32GradSum


def _accumulate(params, grads_per_micro_batch, fp32):
    """Runs one backward per micro-batch whose gradient for params[i] is grads[i]."""
    summer = Fp32GradSum(params) if fp32 else None
    for n, grads in enumerate(grads_per_micro_batch):
        loss = sum((p * g).sum() for p, g in zip(params, grads) if g is not None)
        loss.backward()
        if summer is not None:
            summer.collect(last=n == len(grads_per_micro_batch) - 1)


def test_small_gradients_are_not_lost_against_a_large_sum():
    """256 + 1 is 256 in bf16: autograd's bf16 sum of 256 and fifteen 1s stays 256, the fp32 sum
    is 271, rounded once to bf16."""
    grads = [[torch.full((4,), 256.0)]] + [[torch.ones(4)] for _ in range(15)]
    plain = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    _accumulate([plain], grads, fp32=False)
    assert torch.equal(plain.grad, torch.full((4,), 256.0, dtype=torch.bfloat16))
    summed = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    _accumulate([summed], grads, fp32=True)
    assert summed.grad.dtype == torch.bfloat16
    assert torch.equal(summed.grad, torch.full((4,), 271.0).to(torch.bfloat16))


def test_random_sums_are_the_rounded_exact_sum_and_fp32_parameters_are_left_alone():
    shapes = [(7, 5), (64,), (3, 3, 3)]
    low = [torch.nn.Parameter(torch.zeros(s, dtype=torch.bfloat16)) for s in shapes]
    full = torch.nn.Parameter(torch.zeros(6))
    micro = []
    for n in range(8):
        grads = [torch.randn(s) * 10 ** (n % 3) for s in shapes]
        if n == 5:
            grads[1] = None  # a parameter with no gradient in one micro-batch
        micro.append(grads + [torch.randn(6)])
    _accumulate(low + [full], micro, fp32=True)
    for i, p in enumerate(low):
        exact = sum(g[i].to(torch.bfloat16).double() for g in micro if g[i] is not None)
        assert p.grad.dtype == torch.bfloat16
        assert torch.equal(p.grad, exact.to(torch.bfloat16)), i  # fp32 sum of 8 terms: exact here
    expected = sum(g[-1] for g in micro)  # autograd's own fp32 sum
    assert torch.allclose(full.grad, expected, rtol=1e-6, atol=1e-6)


def test_train_step_sums_micro_batches_in_fp32(tmp_path):
    """vpit-train's step on a bf16 model: the gradient is the fp32 sum of each micro-batch's own
    gradient, rounded once (computed here one micro-batch at a time); with fp32_grad_accum=false,
    autograd's bf16 sum, which differs."""
    from test_train import config

    from vpit_fast.train import loop
    from vpit_fast.train.parallel import Runtime

    runtime = Runtime(0, 1, 0, torch.device("cpu"), distributed=False, fsdp=False)
    cfg = config(tmp_path, "grad_accum=4", "evaluate=false")
    model = loop.build_model(cfg)
    train_set, _, _ = loop.build_data(cfg, model, runtime)  # as the loop: data first, then the cast
    model.visual = None  # the batches carry precomputed tokens
    model.to(torch.bfloat16)
    micro_batches = loop.Batches(train_set, cfg, runtime).next(4)
    params = [p for p in model.parameters() if p.requires_grad]

    # each micro-batch alone, with the step's loss weights, its gradient added in fp32
    sums = [torch.zeros(p.shape, dtype=torch.float32) for p in params]
    text_total, visual_total = loop.step_counts(micro_batches, model.config.num_visual_tokens, runtime)
    torch.manual_seed(0)  # the same target noise draws in both runs
    for batch in micro_batches:
        model.zero_grad(set_to_none=True)
        out = model(**model.batch_inputs(batch), reduction="sum",
                    text_weight=model.config.text_weight / max(text_total, 1.0),
                    visual_weight=model.config.visual_weight / max(visual_total, 1.0))
        out.loss.backward()
        for total, p in zip(sums, params):
            if p.grad is not None:
                total += p.grad.float()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loop.train_step(model, micro_batches, cfg, runtime)
    stepped = [p.grad for p in params]
    for total, grad in zip(sums, stepped):
        assert grad is not None and torch.equal(grad, total.to(torch.bfloat16))

    model.zero_grad(set_to_none=True)
    cfg.fp32_grad_accum = False
    torch.manual_seed(0)
    loop.train_step(model, micro_batches, cfg, runtime)
    assert any(not torch.equal(p.grad, g) for p, g in zip(params, stepped))
