"""Train a small VPiT model with ``transformers.Trainer`` (runnable example).

    python -m vpit_fast.integrations.trainer_example --max-steps 60 --output-dir runs/hf-trainer

What it shows, for trainers of the LLaVA / Cambrian / MetaMorph lineage:

- `VPiTModel` is an ``nn.Module`` whose forward returns a transformers ``ModelOutput`` with
  ``loss``, so ``Trainer`` (and its DeepSpeed ZeRO-3 or FSDP integrations) drives it unchanged.
- The batches come from `vpit_fast.data.VPiTDataset` (packed rows); the collator passes only the
  forward's arguments (`VPiTModel.batch_inputs`).

Replacing your own logits + cross-entropy + cosine code instead (a model that keeps its own
forward): make a `vpit_fast.VPiTHeads` a submodule of the model (wrapping your LM head, so the
weights are shared and the state dict keeps its keys), and at the end of your forward call it with
the shifted rows::

    hidden = outputs.last_hidden_state                       # [B, T, H]
    next_labels = F.pad(labels[:, 1:], (0, 1), value=-100)   # row t predicts token t + 1
    rows = first_slot_positions[:, None] - 1 + torch.arange(64)   # visual targets' rows, flat over B*T
    loss = self.heads(hidden.flatten(0, 1), next_labels.flatten(), rows.flatten(),
                      target_tokens.flatten(0, 1)).loss

Calling the heads module (not `vpit_fast.head_loss` with ``lm_head.weight``) matters under
ZeRO-3 and FSDP: their hooks gather the weights when the module's forward runs.
"""

import argparse
import tempfile

import torch

__all__ = ["main"]


def build(work_dir, num_records=200):
    """A tiny VPiT model and packed shapes data with precomputed visual tokens."""
    from transformers import LlamaForCausalLM

    from vpit_fast import presets
    from vpit_fast.data import ShapesDataset, build_tokenizer
    from vpit_fast.data.dataset import VPiTDataset
    from vpit_fast.model import VPiTConfig, VPiTModel
    from vpit_fast.visual_tokens import VisualTokens

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    encoder = VisualTokens.from_config(presets.encoder_config("tiny"))
    model = VPiTModel.from_base(LlamaForCausalLM(presets.llm_config("tiny", vocab_size=len(tokenizer))),
                                tokenizer, encoder, VPiTConfig())
    data = ShapesDataset(size=num_records, image_size=encoder.tower.config.image_size)
    records = list(data)
    keys = sorted({k for r in records for k in r["image"]})
    tokens = encoder.precompute(keys, data.image, f"{work_dir}/visual_tokens", progress=False)
    dataset = VPiTDataset(records, tokenizer, tokens, budget=512)
    return model, dataset


def main(argv=None):
    from transformers import Trainer, TrainingArguments

    from vpit_fast.model import VPiTModel

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--records", type=int, default=200)
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args(argv)

    work_dir = args.output_dir or tempfile.mkdtemp(prefix="vpit-hf-trainer-")
    model, dataset = build(work_dir, args.records)
    training = TrainingArguments(
        output_dir=work_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, warmup_steps=min(10, args.max_steps // 5), logging_steps=5,
        save_strategy="no", report_to=[], remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
        bf16=torch.cuda.is_available(), dataloader_num_workers=0, seed=0)
    trainer = Trainer(model=model, args=training, train_dataset=dataset,
                      data_collator=lambda items: VPiTModel.batch_inputs(dataset.collate(items)))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    print(f"[trainer example] loss {losses[0]:.4f} -> {losses[-1]:.4f} over {args.max_steps} steps")
    return losses


if __name__ == "__main__":
    main()
