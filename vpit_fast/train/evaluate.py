"""Held-out evaluation at the end of a run: losses, image-QA accuracy and generation accuracy,
each against chance.

Image-QA accuracy is exact match of the whole answer under greedy decoding, measured in one
teacher-forced pass: greedy decoding reproduces the reference answer exactly when, at every answer
position, the most likely token (over the real vocabulary, not the padding rows) is the reference
token given the reference prefix; that is what is counted. Chance is the mean over the questions of
one over the number of possible answers to that kind of question (6 colours, 4 shapes, 5 positions,
2 sizes, 1 or 2 shapes).

Generation accuracy: for each held-out text-to-image prompt the model generates freely (greedy,
KV cache) until it has produced one image; the image counts as right when the nearest held-out
target image, by the mean cosine over the 64 visual tokens, shows exactly the asked shapes (kind,
colour, size and position of each). An answer without an image counts as wrong. Chance is the
mean over prompts of the fraction of the candidate images that show the asked shapes. The looser
``generation_kind_color`` scores only the kinds and colours (the held-out pairs are exactly such
combinations never generated in training). ``generation_teacher_forced`` is the same retrieval
on the vision head's predictions when every input visual token is the true one (as in training).
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = ["evaluate", "generation_accuracy", "qa_chance"]


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


def _attributes(key, loose=False):
    from vpit_fast.data.shapes import key_to_scene

    shapes = key_to_scene(key).shapes
    return frozenset((s.kind, s.color) if loose else (s.kind, s.color, s.size, s.position) for s in shapes)


def _candidate_tokens(model, images, keys):
    """``[P, n, Dv]`` visual tokens of ``keys`` from a dataset image source."""
    if images.kind == "tokens":
        return torch.stack([images.load(k) for k in keys])
    return model.visual.encode_images([images.load(k) for k in keys])


@torch.no_grad()
def generation_accuracy(model, records, images, limit=None, batch_size=16):
    """Accuracy of held-out text-to-image generation (see the module docstring) over the first
    ``limit`` text-to-image records (None: all). ``images``: the dataset's image source
    (precomputed tokens or pictures for the model's encoder). Returns a dict of floats (empty
    without text-to-image records)."""
    prompts = [r for r in records if r.get("task") == "text_to_image"][:limit]
    if not prompts:
        return {}
    keys = sorted({r["image"][0] for r in prompts})
    pool = F.normalize(_candidate_tokens(model, images, keys).float(), dim=-1)
    n = model.config.num_visual_tokens
    scores = {"generation_accuracy": 0.0, "generation_chance": 0.0, "generation_kind_color": 0.0,
              "generation_kind_color_chance": 0.0, "generation_with_image": 0.0}
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        outputs = model.generate([r["conversations"][0]["value"] for r in chunk], max_new_tokens=n + 24, max_images=1)
        for record, out in zip(chunk, outputs):
            target = record["image"][0]
            for loose, name in ((False, "generation_accuracy"), (True, "generation_kind_color")):
                asked = _attributes(target, loose)
                matching = [_attributes(k, loose) == asked for k in keys]
                scores[("generation_kind_color_chance" if loose else "generation_chance")] += sum(matching) / len(keys)
                if out.visual_tokens:
                    generated = F.normalize(out.visual_tokens[0].float(), dim=-1)
                    nearest = int((pool * generated).sum(-1).mean(-1).argmax())
                    scores[name] += float(matching[nearest])
            scores["generation_with_image"] += float(bool(out.visual_tokens))
    result = {k: v / len(prompts) for k, v in scores.items()}
    result["generation_count"] = len(prompts)
    result["generation_teacher_forced"] = _teacher_forced_retrieval(model, prompts, images, keys, pool)
    return result


@torch.no_grad()
def _teacher_forced_retrieval(model, prompts, images, keys, pool):
    """The same retrieval on the vision head's predictions when every input is the true visual
    token (as in training): separates what the head learned from what free-running generation
    loses to its own feedback."""
    from vpit_fast.data import encode_all, pad_batch
    from vpit_fast.model import VPiTModel

    samples = encode_all(prompts, model.tokenizer, model.config.num_visual_tokens)
    batch = pad_batch(samples, model.tokenizer.pad_token_id)
    batch["visual_tokens"] = _candidate_tokens(model, images, batch["image_keys"]).to(model.adapter[0].weight.dtype)
    device = model.adapter[0].weight.device
    hidden = model(**VPiTModel.batch_inputs(batch, device)).hidden
    n, right = model.config.num_visual_tokens, 0
    for record, row, slot in zip(prompts, batch["image_batch_index"].tolist(), batch["image_slots"].tolist()):
        predicted = F.normalize(model.heads.vision_head(hidden[row, slot - 1:slot - 1 + n]).float().cpu(), dim=-1)
        nearest = int((pool * predicted).sum(-1).mean(-1).argmax())
        right += _attributes(keys[nearest]) == _attributes(record["image"][0])
    return right / len(prompts)


def evaluate(model, eval_set, records, config, runtime):
    """Held-out losses, image-QA and generation accuracy of ``model`` on ``eval_set`` (a
    `VPiTDataset` of the shapes dataset's eval split, built from ``records``). Runs on rank 0 on an
    unsharded model (under FSDP2 the export is loaded); returns ``{"text_loss", "visual_loss",
    "image_qa_accuracy", "image_qa_chance", "generation_accuracy", "generation_chance", ...}``
    (on rank 0; an empty dict elsewhere)."""
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
        results.update(generation_accuracy(plain, records, eval_set.images))
    if runtime.distributed:
        dist.barrier()
    return results
