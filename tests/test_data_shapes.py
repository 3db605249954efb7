"""The shapes dataset and its tokenizer: determinism, record structure, the held-out split, what the
images show, what every task's answer says, and the tokenizer's round trip, saving and chat template."""

import itertools
import json
import re

import numpy as np
import pytest
from PIL import Image

from vpit_fast.data import (HELD_OUT, TASKS, Scene, Shape, ShapesDataset, build_tokenizer, key_to_scene,
                            normalize_text, render, scene_to_key)
from vpit_fast.data.shapes import (ANCHORS, BACKGROUND, COLORS, DEFAULT_POSITION, DEFAULT_SIZE, DIRECTIONS, FRAME_STEP,
                                   IMAGE, NUM_FRAMES, POSITIONS, SHAPES, SIZES, shows_held_out, target_keys)

SIDE = 64
N = 7 * 30  # 30 records of every task per split


@pytest.fixture(scope="module")
def records():
    return {split: list(ShapesDataset(split, N, seed=0, image_size=SIDE)) for split in ("train", "eval")}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def all_records(records):
    return records["train"] + records["eval"]


def of_task(records, task):
    return [r for r in all_records(records) if r["task"] == task]


def pixels(image):
    """(H, W, 3) uint8 array and the mask of non-background pixels."""
    a = np.asarray(image)
    return a, (a != BACKGROUND).any(-1)


def centroid(image):
    """Centre of the non-background pixels in continuous image coordinates (x, y)."""
    _, mask = pixels(image)
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean() + 0.5, ys.mean() + 0.5])


def texts(records):
    return [turn["value"] for r in all_records(records) for turn in r["conversations"]]


# ----------------------------------------------------------------------------------------------
# Records

def test_deterministic_by_split_seed_index(records):
    again = ShapesDataset("train", N, seed=0, image_size=SIDE)
    assert [again[i] for i in range(N)] == records["train"]
    for record in records["train"][:40]:
        for key in record["image"]:
            assert again.image(key).tobytes() == render(key, SIDE).tobytes()
    other = list(ShapesDataset("train", N, seed=1, image_size=SIDE))
    assert sum(a["conversations"] != b["conversations"] for a, b in zip(other, records["train"])) > N // 2
    assert ShapesDataset("train", N)[-1] == ShapesDataset("train", N)[N - 1]
    with pytest.raises(IndexError):
        ShapesDataset("train", N)[N]


def test_every_task_appears(records):
    for split in ("train", "eval"):
        assert {r["task"] for r in records[split]} == set(TASKS)
    chosen = ShapesDataset("train", 6, tasks=["image_editing", "video_qa"])
    assert [r["task"] for r in chosen] == ["image_editing", "video_qa"] * 3


def test_record_structure(records):
    for record in all_records(records):
        json.dumps(record)
        human, gpt = record["conversations"]
        assert (human["from"], gpt["from"]) == ("human", "gpt")
        placeholders = human["value"].count(IMAGE) + gpt["value"].count(IMAGE)
        assert placeholders == len(record["image"]) >= 1
        for key in record["image"]:
            assert re.fullmatch(r"[a-z0-9_+-]+", key)  # a safe file name
            assert scene_to_key(key_to_scene(key)) == key
    assert len({r["id"] for r in all_records(records)}) == 2 * N


def test_held_out_split(records):
    for record in records["train"]:
        assert not any(shows_held_out(k) for k in target_keys(record))
    for record in records["eval"]:
        targets = target_keys(record)
        assert any(shows_held_out(k) for k in (targets or record["image"]))
    # Held-out pairs still reach train as understanding data (prompt images).
    assert any(shows_held_out(k) for r in records["train"] for k in r["image"])
    # Generation prompts in train never describe a held-out pair.
    for record in records["train"]:
        if record["task"] == "text_to_image":
            prompt = record["conversations"][0]["value"]
            assert not any(f"{color} {kind}" in prompt for kind, color in HELD_OUT)


# ----------------------------------------------------------------------------------------------
# Images

def test_large_centred_circle_is_its_colour():
    for color, rgb in COLORS.items():
        a, _ = pixels(render(Scene([Shape("circle", color, "large", "center")]), SIDE))
        assert tuple(a[SIDE // 2, SIDE // 2]) == rgb


def test_every_shape_is_drawn_where_and_how_named():
    for kind, color, size, position in itertools.product(SHAPES, COLORS, SIZES, POSITIONS):
        image = render(Scene([Shape(kind, color, size, position)]), SIDE)
        a, mask = pixels(image)
        assert (a[mask] == COLORS[color]).all()  # no anti-aliasing: exactly the named colour
        assert np.abs(centroid(image) - np.array(ANCHORS[position]) * SIDE).max() < 1.0
        small = pixels(render(Scene([Shape(kind, color, "small", position)]), SIDE))[1].sum()
        large = pixels(render(Scene([Shape(kind, color, "large", position)]), SIDE))[1].sum()
        assert large > 3 * small


def test_zoom_is_a_2x_close_up():
    for kind, position in itertools.product(SHAPES, POSITIONS):
        shape = Shape(kind, "blue", "large", position)
        zoomed = render(Scene([shape], zoom=position), SIDE)
        assert np.abs(centroid(zoomed) - SIDE / 2).max() < 1.0
        ratio = pixels(zoomed)[1].sum() / pixels(render(Scene([shape]), SIDE))[1].sum()
        assert 3.3 < ratio < 4.7


def test_two_shape_scenes_do_not_overlap(records):
    for record in all_records(records):
        for key in record["image"]:
            scene = key_to_scene(key)
            if len(scene.shapes) == 2 and scene.zoom is None:
                alone = sum(pixels(render(Scene([s]), SIDE))[1].sum() for s in scene.shapes)
                assert pixels(render(scene, SIDE))[1].sum() == alone


# ----------------------------------------------------------------------------------------------
# Answers

def test_image_qa_answers(records):
    for record in of_task(records, "image_qa") + of_task(records, "visual_thinking"):
        scene = key_to_scene(record["image"][0])
        question = record["conversations"][0]["value"].lower()
        answer = record["conversations"][1]["value"].split()[-1] if record["task"] == "visual_thinking" \
            else record["conversations"][1]["value"]
        by_kind = {s.kind: s for s in scene.shapes}
        if m := re.search(r"what colour is the (\w+)\?", question):
            shape = scene.shapes[0] if m[1] == "shape" else by_kind[m[1]]
            assert answer == shape.color
        elif m := re.search(r"what shape is in the ([a-z ]+)\?", question):
            expected = scene.shapes[0] if m[1] == "image" else next(s for s in scene.shapes if s.position == m[1])
            assert answer == expected.kind
        elif m := re.search(r"where is the (\w+)\?", question):
            assert answer == by_kind[m[1]].position
        elif m := re.search(r"is the (\w+) small or large\?", question):
            assert answer == by_kind[m[1]].size
        else:
            assert "how many shapes" in question and answer == str(len(scene.shapes))


def test_visual_thinking_shows_a_close_up_first(records):
    for record in of_task(records, "visual_thinking"):
        assert record["conversations"][1]["value"].startswith(IMAGE + " ")
        scene, close_up = (key_to_scene(k) for k in record["image"])
        assert close_up.zoom is not None and len(close_up.shapes) == 1
        assert close_up.shapes[0] in scene.shapes and close_up.zoom == close_up.shapes[0].position


def test_text_to_image_describes_the_target(records):
    short = 0
    for record in of_task(records, "text_to_image"):
        prompt, response = (t["value"] for t in record["conversations"])
        assert response == f"Here is an image based on your request: {IMAGE}"
        shapes = key_to_scene(record["image"][0]).shapes
        if " in the " not in prompt:  # the short form: colour and kind only, the default size and place
            (s,) = shapes
            assert prompt.endswith(f"a {s.color} {s.kind}.") and (s.size, s.position) == (DEFAULT_SIZE, DEFAULT_POSITION)
            short += 1
            continue
        for s in shapes:
            assert f"a {s.size} {s.color} {s.kind} in the {s.position}" in prompt
    assert short > 0


def test_editing_changes_exactly_the_named_attribute(records):
    seen = set()
    for record in of_task(records, "image_editing"):
        before, after = (key_to_scene(k) for k in record["image"])
        instruction = record["conversations"][0]["value"]
        m = re.search(r"(Make|Move|Turn) the (\w+) (?:to the |into a )?([a-z ]+)\.", instruction)
        verb, kind, value = m.groups()
        attribute = {"Move": "position", "Turn": "kind"}.get(verb) or ("color" if value in COLORS else "size")
        seen.add(attribute)
        changed = [(b, a) for b, a in zip(before.shapes, after.shapes) if b != a]
        assert len(before.shapes) == len(after.shapes) and len(changed) == 1
        b, a = changed[0]
        assert b.kind == kind and getattr(a, attribute) == value != getattr(b, attribute)
        fields = ("kind", "color", "size", "position", "offset")
        assert [f for f in fields if getattr(a, f) != getattr(b, f)] == [attribute]
        if attribute == "color":  # and the pixels follow
            mask = pixels(render(Scene([a]), SIDE))[1]
            assert (pixels(render(after, SIDE))[0][mask] == COLORS[value]).all()
    assert seen == {"color", "size", "position", "kind"}


def test_frame_prediction_moves_consistently(records):
    for record in of_task(records, "frame_prediction"):
        assert len(record["image"]) == NUM_FRAMES + 1 and target_keys(record) == record["image"][-1:]
        centres = np.stack([centroid(render(k, SIDE)) for k in record["image"]])
        steps = np.diff(centres, axis=0)
        assert np.abs(steps - steps[0]).max() < 1.0  # constant velocity, target included
        assert np.isclose(np.abs(steps[0]).sum(), FRAME_STEP / 1000 * SIDE, atol=1.0)


def test_video_qa_names_the_direction(records):
    for record in of_task(records, "video_qa"):
        first, last = (centroid(render(k, SIDE)) for k in (record["image"][0], record["image"][-1]))
        direction = np.sign(np.round(last - first))
        assert tuple(direction) == DIRECTIONS[record["conversations"][1]["value"]]


def test_reordering_answer_is_the_correct_permutation(records):
    for record in of_task(records, "frame_reordering"):
        order = [int(t) for t in record["conversations"][1]["value"].split()]
        assert sorted(order) == list(range(NUM_FRAMES)) and order != sorted(order)
        shapes = [key_to_scene(record["image"][k]).shapes[0] for k in order]
        start = re.search(r"starts in the ([a-z ]+)\.", record["conversations"][0]["value"])[1]
        assert shapes[0].position == start and shapes[0].offset == (0, 0)
        for t, shape in enumerate(shapes):  # in answer order, frame t lies t steps from the start
            assert max(abs(v) for v in shape.offset) == t * FRAME_STEP


# ----------------------------------------------------------------------------------------------
# Files

def test_jsonl_and_images_round_trip(tmp_path):
    dataset = ShapesDataset("eval", 14, seed=3, image_size=SIDE)
    path = dataset.write_jsonl(tmp_path / "eval.jsonl")
    assert dataset.save_images(tmp_path / "images") == len(dataset.image_keys())
    assert dataset.save_images(tmp_path / "images") == 0  # already there
    loaded = [json.loads(line) for line in path.read_text().splitlines()]
    for record, original in zip(loaded, dataset, strict=True):
        assert record["image"] == [k + ".png" for k in original["image"]]
        assert {**record, "image": original["image"]} == original
        for name in record["image"]:
            with Image.open(tmp_path / "images" / name) as image:
                assert image.tobytes() == dataset.image(name).tobytes()


# ----------------------------------------------------------------------------------------------
# Tokenizer

def test_tokenizer_round_trip_without_unknowns(records, tokenizer):
    assert len(texts(records)) >= 400
    for text in texts(records):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == normalize_text(text)
    assert tokenizer.convert_tokens_to_ids("<unk>") in tokenizer.encode("a zebra", add_special_tokens=False)


def test_normalisation():
    assert normalize_text("Here is  an Image:<image>") == "here is an image: <image>"
    assert normalize_text("Order 2 0 13 .") == "order 2 0 1 3."


def test_special_tokens_are_single_tokens(tokenizer):
    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>", "<image>",
                "<image_start>", "<image_end>"]
    ids = tokenizer.encode(" ".join(specials), add_special_tokens=False)
    assert ids == list(range(len(specials)))
    assert tokenizer.encode("red")[0] == tokenizer.bos_token_id


def test_save_and_reload(tmp_path, records, tokenizer):
    from transformers import AutoTokenizer

    build_tokenizer(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    for text in texts(records)[:100]:
        assert reloaded.encode(text) == tokenizer.encode(text)
    conversation = records["train"][1]["conversations"]
    assert reloaded.apply_chat_template(conversation, tokenize=False) == \
        tokenizer.apply_chat_template(conversation, tokenize=False)


def test_chat_template(records, tokenizer):
    record = next(r for r in records["train"] if r["task"] == "image_editing")
    human, gpt = (t["value"] for t in record["conversations"])
    rendered = tokenizer.apply_chat_template(record["conversations"], tokenize=False)
    assert rendered.startswith("<s>")
    markers = [m.start() for m in re.finditer(r"<\|user\|>|<\|end\|>|<\|assistant\|>", rendered)]
    assert [rendered[i:i + 3] for i in markers] == ["<|u", "<|e", "<|a", "<|e"]
    assert human in rendered and gpt in rendered
    # HF-style roles render the same, and the assistant mask covers the response and its <|end|>.
    hf = [{"role": "user", "content": human}, {"role": "assistant", "content": gpt}]
    assert tokenizer.apply_chat_template(hf, tokenize=False) == rendered
    out = tokenizer.apply_chat_template(hf, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    response = [i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(response) == normalize_text(gpt + " <|end|>")
    assert out["input_ids"].count(tokenizer.bos_token_id) == 1
    prompt = tokenizer.apply_chat_template(hf[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.rstrip().endswith("<|assistant|>")
