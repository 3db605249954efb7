"""Held-out evaluation at the end of a run: losses and image-QA accuracy against chance.

Image-QA accuracy is exact match of the whole answer under greedy decoding, measured in one
teacher-forced pass: greedy decoding reproduces the reference answer exactly when, at every answer
position, the most likely token (over the real vocabulary, not the padding rows) is the reference
token given the reference prefix; that is what is counted. Chance is the mean over the questions of
one over the number of possible answers to that kind of question (6 colours, 4 shapes, 5 positions,
2 sizes, 1 or 2 shapes).
"""

import torch
import torch.distributed as dist

__all__ = ["evaluate", "qa_chance"]


def qa_chance(answer):
    """The probability of guessing ``answer`` among the answers its question allows."""
    from vpit_fast.data.shapes import COLORS, POSITIONS, SHAPES, SIZES

    answer = answer.strip().rstrip(".").lower()
    for options in (COLORS, SHAPES, POSITIONS, SIZES):
        if answer in options:
            return 1.0 / len(options)
    if answer in ("1", "2"):
        return 0.5
    raise ValueError(f"{answer!r} is not an answer of the shapes dataset")


@torch.no_grad()
def _rows_exact(model, batch, device):
    """Per sample of a packed or padded batch: (sample id, all response tokens greedy-correct,
    text loss sum, text count, visual loss sum, visual count)."""
    from vpit_fast.model import VPiTModel

    inputs = VPiTModel.batch_inputs(batch, device)
    out = model(**inputs, reduction="sum")
    hidden, labels = out.hidden, inputs["labels"]
    next_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    rows = (next_labels != -100).nonzero()
    logits = model.heads.lm_head(hidden[rows[:, 0], rows[:, 1]])[:, :model.config.text_vocab_size]
    correct = logits.argmax(-1) == next_labels[rows[:, 0], rows[:, 1]]
    if "segment_ids" in batch:
        segment = batch["segment_ids"].to(device)[rows[:, 0], rows[:, 1]]
        ids = [(int(r), int(s)) for r, s in zip(rows[:, 0], segment)]
        names = {(r, s): sample for r, samples in enumerate(batch["sample_ids"]) for s, sample in enumerate(samples)}
    else:
        ids = [(int(r), 0) for r in rows[:, 0]]
        names = {(r, 0): sample for r, sample in enumerate(batch["sample_ids"])}
    exact = {}
    for key, ok in zip(ids, correct.tolist()):
        exact[names[key]] = exact.get(names[key], True) and ok
    return exact, out


def evaluate(model, eval_set, records, config, runtime):
    """Held-out losses and image-QA accuracy of ``model`` on ``eval_set`` (a `VPiTDataset` of the
    shapes dataset's eval split, built from ``records``). Runs on rank 0 on an unsharded model (under FSDP2 the export is
    loaded); returns ``{"text_loss", "visual_loss", "image_qa_accuracy", "image_qa_chance"}`` as
    floats (on rank 0; an empty dict elsewhere)."""
    from vpit_fast.data.dataset import make_dataloader
    from vpit_fast.model import VPiTModel

    results = {}
    if runtime.is_main:
        plain = model
        if runtime.fsdp:
            plain = VPiTModel.from_pretrained(f"{config.out_dir}/export", dtype=torch.bfloat16, device=runtime.device)
        was_training = plain.training
        plain.eval()
        loader = make_dataloader(eval_set, config.data.batch_size, shuffle=False, drop_last=False, pin_memory=False)
        exact, sums = {}, torch.zeros(4, dtype=torch.float64)
        for batch in loader:
            batch_exact, out = _rows_exact(plain, batch, runtime.device)
            exact.update(batch_exact)
            sums += torch.tensor([out.text_loss.item(), out.text_count.item(), out.visual_loss.item(),
                                  out.visual_count.item()], dtype=torch.float64)
        plain.train(was_training)
        results["text_loss"] = float(sums[0] / sums[1].clamp_min(1))
        results["visual_loss"] = float(sums[2] / sums[3].clamp_min(1))
        qa = [r for r in records if r.get("task") == "image_qa" and r["id"] in exact]
        if qa:
            results["image_qa_accuracy"] = sum(exact[r["id"]] for r in qa) / len(qa)
            results["image_qa_chance"] = sum(qa_chance(r["conversations"][1]["value"]) for r in qa) / len(qa)
            results["image_qa_count"] = len(qa)
    if runtime.distributed:
        dist.barrier()
    return results
