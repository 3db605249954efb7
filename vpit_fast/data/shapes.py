"""The procedural shapes dataset of the embedded default: scenes of one or two coloured shapes drawn
with PIL, turned into every data type of the MetaMorph paper as LLaVA/Cambrian-style records.

A record is a plain, JSON-serialisable dict::

    {"id": "train-0-17", "task": "image_editing", "image": [key, key],
     "conversations": [{"from": "human", "value": "<image> Make the circle blue."},
                       {"from": "gpt", "value": "<image>"}]}

Each ``<image>`` placeholder, in order of appearance across the turns, is one entry of ``"image"``;
images in the ``"gpt"`` turn are generation targets. An image key is a string that encodes its
scene (`scene_to_key` / `key_to_scene`), so any process can draw any key on demand, at any size.

Held-out evaluation: the (kind, colour) pairs in `HELD_OUT` never appear in a generation target of
the train split (they do appear in train prompts, i.e. as understanding data, the MetaMorph setting
in which understanding data unlocks generation). Every eval record shows a held-out pair: in a
generation target when the task generates images, otherwise in a prompt image.
"""

import json
import math
import random
import re
import string
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw
from torch.utils.data import Dataset

IMAGE = "<image>"

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {  # named colour -> RGB; drawn without anti-aliasing, so every shape pixel is exactly this
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "yellow": (240, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 135, 30),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
CORNERS = POSITIONS[:4]
BACKGROUND = (255, 255, 255)

# Shape centre of each position, as fractions of the image side (x, y).
ANCHORS = {"top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
           "bottom right": (0.75, 0.75), "center": (0.5, 0.5)}
# Circumradius of each size, as a fraction of the image side. Two large shapes in different corners
# never touch (0.25 + 0.18 < 0.5), which is why two-shape scenes use corners only.
RADIUS = {"small": 0.09, "large": 0.18}

# Held out from train generation targets: one colour per shape, so every shape and every colour is
# still generated in train, only these combinations are new at evaluation.
HELD_OUT = frozenset({("circle", "purple"), ("square", "orange"), ("triangle", "green"), ("star", "blue")})

TASKS = ("image_qa", "text_to_image", "image_editing", "visual_thinking", "video_qa", "frame_prediction",
         "frame_reordering")

# Videos: one shape moves from a corner towards a neighbouring corner, FRAME_STEP per-mille of the
# image side per frame, so frame 4 lands exactly on the neighbouring corner.
FRAME_STEP = 125
NUM_FRAMES = 4  # frames shown in a video prompt
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}

# Every text the dataset produces is one of these, formatted with attribute words, digits or other
# templates; `vocabulary` reads its words from here, so a new template cannot miss the tokenizer.
TEMPLATES = {
    "qa_color": "What colour is the {noun}?",
    "qa_kind": "What shape is in the image?",
    "qa_kind_at": "What shape is in the {position}?",
    "qa_position": "Where is the {kind}?",
    "qa_size": "Is the {kind} small or large?",
    "qa_count": "How many shapes are in the image?",
    "describe": "a {size} {color} {kind} in the {position}",
    "describe_short": "a {color} {kind}",
    "describe_join": "{first} and {second}",
    "t2i_generate": "Generate an image of {description}.",
    "t2i_draw": "Draw {description}.",
    "t2i_create": "Create a picture of {description}.",
    "t2i_answer": "Here is an image based on your request: {image}",
    "edit_color": "Make the {kind} {color}.",
    "edit_size": "Make the {kind} {size}.",
    "edit_position": "Move the {kind} to the {position}.",
    "edit_kind": "Turn the {kind} into a {new_kind}.",
    "think": "{question} Zoom in before you answer.",
    "think_answer": "{image} {answer}",
    "video_qa": "Which way is the {kind} moving?",
    "predict": "Predict the next frame.",
    "reorder": "These frames are shuffled. The {kind} starts in the {position}. Put them in order.",
}
T2I_PROMPTS = ("t2i_generate", "t2i_draw", "t2i_create")
# A text-to-image prompt may name only colour and kind ("Draw a red circle."): the picture then shows
# one shape of the default size in the default position. This fraction of the prompts take that
# form, so the shortest request a user would type is in the training distribution.
SHORT_T2I_FRACTION = 0.15
DEFAULT_SIZE, DEFAULT_POSITION = "large", "center"


# ----------------------------------------------------------------------------------------------
# Scenes and their keys

@dataclass(frozen=True)
class Shape:
    """One shape. ``offset`` moves it from its position's anchor by (dx, dy) per-mille of the image
    side (video frames); it is (0, 0) for still images."""

    kind: str
    color: str
    size: str
    position: str
    offset: tuple[int, int] = (0, 0)

    def __post_init__(self):
        for value, allowed in ((self.kind, SHAPES), (self.color, COLORS), (self.size, SIZES),
                               (self.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"{value!r} is not one of {tuple(allowed)}")
        object.__setattr__(self, "offset", tuple(int(v) for v in self.offset))


@dataclass(frozen=True)
class Scene:
    """The shapes of one image (stored as a tuple, so scenes are hashable values). With ``zoom`` set
    to a position, the image is the 2x enlarged half-size region centred on that position's anchor
    (visual thinking's close-up)."""

    shapes: tuple[Shape, ...]
    zoom: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "shapes", tuple(self.shapes))
        if self.zoom is not None and self.zoom not in POSITIONS:
            raise ValueError(f"zoom {self.zoom!r} is not one of {POSITIONS}")


def _signed(v):
    return ("p" if v >= 0 else "m") + f"{abs(v):03d}"


def scene_to_key(scene):
    """The image key of a scene: a file-name-safe string such as
    ``"circle-red-large-top_left+star-blue-small-bottom_right"``; shapes are joined with ``+``, a
    shape is ``kind-color-size-position`` plus ``-p125-m000`` when it has an offset, and a zoomed
    scene starts with ``zoom-<position>+``."""
    parts = [] if scene.zoom is None else ["zoom-" + scene.zoom.replace(" ", "_")]
    for s in scene.shapes:
        fields = [s.kind, s.color, s.size, s.position.replace(" ", "_")]
        if s.offset != (0, 0):
            fields += [_signed(v) for v in s.offset]
        parts.append("-".join(fields))
    return "+".join(parts)


def key_to_scene(key):
    """Inverse of `scene_to_key`; a trailing ``.png`` (a file name) is ignored. Returns a `Scene`."""
    key = key.removesuffix(".png")
    shapes, zoom = [], None
    for part in key.split("+"):
        fields = part.split("-")
        if fields[0] == "zoom" and len(fields) == 2:
            zoom = fields[1].replace("_", " ")
        elif len(fields) in (4, 6):
            offset = [int(f[1:]) * (1 if f[0] == "p" else -1) for f in fields[4:]] or (0, 0)
            shapes.append(Shape(fields[0], fields[1], fields[2], fields[3].replace("_", " "), tuple(offset)))
        else:
            raise ValueError(f"malformed image key {key!r}")
    return Scene(tuple(shapes), zoom)


def shows_held_out(key):
    """True when the image of ``key`` shows a (kind, colour) pair of `HELD_OUT`."""
    return any((s.kind, s.color) in HELD_OUT for s in key_to_scene(key).shapes)


# ----------------------------------------------------------------------------------------------
# Drawing

def _polygon(cx, cy, radius, corners, inner=None):
    """Vertices of a regular polygon (or star, with inner radius) pointing up, centred on (cx, cy)."""
    points = []
    steps = corners * (1 if inner is None else 2)
    for i in range(steps):
        r = radius if inner is None or i % 2 == 0 else inner
        angle = -90 + 360 * i / steps
        points.append((cx + r * math.cos(math.radians(angle)), cy + r * math.sin(math.radians(angle))))
    return points


def _draw(shapes, side):
    """The shapes on a white ``side x side`` RGB image."""
    image = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for s in shapes:
        ax, ay = ANCHORS[s.position]
        cx, cy = (ax + s.offset[0] / 1000) * side, (ay + s.offset[1] / 1000) * side
        r, fill = RADIUS[s.size] * side, COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif s.kind == "square":
            h = 0.8 * r  # a square inscribed in the circle would look small next to the others
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        elif s.kind == "triangle":  # equilateral: its centroid is the anchor
            draw.polygon(_polygon(cx, cy, r, 3), fill=fill)
        else:
            draw.polygon(_polygon(cx, cy, r, 5, inner=0.45 * r), fill=fill)
    return image


def render(scene, image_size=384):
    """Draws ``scene`` (a `Scene` or an image key). Returns an RGB ``PIL.Image`` of
    ``image_size x image_size``, white background, shapes in their exact named colours."""
    if isinstance(scene, str):
        scene = key_to_scene(scene)
    if scene.zoom is None:
        return _draw(scene.shapes, image_size)
    # Draw at twice the size and cut out one image's worth: a 2x zoom without resampling blur.
    big = _draw(scene.shapes, 2 * image_size)
    ax, ay = ANCHORS[scene.zoom]
    left, top = round((2 * ax - 0.5) * image_size), round((2 * ay - 0.5) * image_size)
    return big.crop((left, top, left + image_size, top + image_size))


# ----------------------------------------------------------------------------------------------
# Tasks: each draws from an rng and returns (human text, gpt text, scenes in placeholder order)

def _text(name, **fields):
    return TEMPLATES[name].format(image=IMAGE, **fields)


def _random_scene(rng):
    """One shape anywhere, or two shapes of different kinds in different corners."""
    if rng.random() < 0.5:
        return Scene((Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES),
                            rng.choice(POSITIONS)),))
    kinds, corners = rng.sample(SHAPES, 2), rng.sample(CORNERS, 2)
    return Scene(tuple(Shape(k, rng.choice(list(COLORS)), rng.choice(SIZES), p) for k, p in zip(kinds, corners)))


def _describe(scene):
    texts = [_text("describe", size=s.size, color=s.color, kind=s.kind, position=s.position) for s in scene.shapes]
    return texts[0] if len(texts) == 1 else _text("describe_join", first=texts[0], second=texts[1])


def _question(rng, scene, attributes=("color", "kind", "position", "size", "count")):
    """A question about one shape of ``scene``; returns (question, one-word answer, the shape)."""
    shape = rng.choice(scene.shapes)
    single = len(scene.shapes) == 1
    attribute = rng.choice(attributes)
    if attribute == "color":
        return _text("qa_color", noun="shape" if single else shape.kind), shape.color, shape
    if attribute == "kind":
        question = _text("qa_kind") if single else _text("qa_kind_at", position=shape.position)
        return question, shape.kind, shape
    if attribute == "position":
        return _text("qa_position", kind=shape.kind), shape.position, shape
    if attribute == "size":
        return _text("qa_size", kind=shape.kind), shape.size, shape
    return _text("qa_count"), str(len(scene.shapes)), shape


def image_qa(rng):
    scene = _random_scene(rng)
    question, answer, _ = _question(rng, scene)
    return f"{IMAGE} {question}", answer, [scene]


def text_to_image(rng):
    if rng.random() < SHORT_T2I_FRACTION:
        shape = Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), DEFAULT_SIZE, DEFAULT_POSITION)
        description = _text("describe_short", color=shape.color, kind=shape.kind)
        return _text(rng.choice(T2I_PROMPTS), description=description), _text("t2i_answer"), [Scene((shape,))]
    scene = _random_scene(rng)
    return _text(rng.choice(T2I_PROMPTS), description=_describe(scene)), _text("t2i_answer"), [scene]


def image_editing(rng):
    """Changes exactly one attribute of one shape; the other shape (if any) stays as it is."""
    scene = _random_scene(rng)
    shape = rng.choice(scene.shapes)
    others = [s for s in scene.shapes if s is not shape]
    attribute = rng.choice(("color", "size", "position", "kind"))
    if attribute == "color":
        edited = replace(shape, color=rng.choice([c for c in COLORS if c != shape.color]))
        instruction = _text("edit_color", kind=shape.kind, color=edited.color)
    elif attribute == "size":
        edited = replace(shape, size=next(s for s in SIZES if s != shape.size))
        instruction = _text("edit_size", kind=shape.kind, size=edited.size)
    elif attribute == "position":  # two-shape scenes keep to free corners so shapes never overlap
        free = POSITIONS if not others else CORNERS
        taken = {s.position for s in scene.shapes}
        edited = replace(shape, position=rng.choice([p for p in free if p not in taken]))
        instruction = _text("edit_position", kind=shape.kind, position=edited.position)
    else:
        taken = {s.kind for s in scene.shapes}
        edited = replace(shape, kind=rng.choice([k for k in SHAPES if k not in taken]))
        instruction = _text("edit_kind", kind=shape.kind, new_kind=edited.kind)
    target = Scene(tuple(edited if s is shape else s for s in scene.shapes))
    return f"{IMAGE} {instruction}", IMAGE, [scene, target]


def visual_thinking(rng):
    """The response first shows a 2x close-up of the shape asked about, then answers."""
    scene = _random_scene(rng)
    question, answer, shape = _question(rng, scene, attributes=("color", "kind", "size"))
    # The close-up holds only this shape (corner regions never reach the other one), so its key
    # names only this shape and the held-out rule judges what is actually drawn.
    close_up = Scene((shape,), zoom=shape.position)
    return _text("think", question=f"{IMAGE} {question}"), _text("think_answer", answer=answer), [scene, close_up]


def _motion(rng):
    """A shape in a corner and a direction towards a neighbouring corner; returns frame(t) -> Scene
    and the direction word."""
    start = Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES), rng.choice(CORNERS))
    ax, ay = ANCHORS[start.position]
    word = rng.choice(["right" if ax < 0.5 else "left", "down" if ay < 0.5 else "up"])
    dx, dy = DIRECTIONS[word]

    def frame(t):
        return Scene((replace(start, offset=(dx * FRAME_STEP * t, dy * FRAME_STEP * t)),))
    return frame, word


def _frames_prompt(n):
    return " ".join([IMAGE] * n)


def video_qa(rng):
    frame, word = _motion(rng)
    kind = frame(0).shapes[0].kind
    return f"{_frames_prompt(NUM_FRAMES)} {_text('video_qa', kind=kind)}", word, [frame(t) for t in range(NUM_FRAMES)]


def frame_prediction(rng):
    frame, _ = _motion(rng)
    frames = [frame(t) for t in range(NUM_FRAMES + 1)]
    return f"{_frames_prompt(NUM_FRAMES)} {_text('predict')}", IMAGE, frames


def frame_reordering(rng):
    """Shows the frames shuffled (never in order); the answer lists the 0-based indices of the shown
    frames from first to last in time, e.g. ``"2 0 1 3"``. The prompt names the start corner,
    because a straight motion played backwards is also a straight motion."""
    frame, _ = _motion(rng)
    shown = list(range(NUM_FRAMES))  # shown[k] = time of the k-th frame shown
    while shown == sorted(shown):
        rng.shuffle(shown)
    order = [shown.index(t) for t in range(NUM_FRAMES)]
    start = frame(0).shapes[0]
    prompt = f"{_frames_prompt(NUM_FRAMES)} {_text('reorder', kind=start.kind, position=start.position)}"
    return prompt, " ".join(map(str, order)), [frame(t) for t in shown]


TASK_BUILDERS = {name: globals()[name] for name in TASKS}


# ----------------------------------------------------------------------------------------------
# The dataset

def target_keys(record):
    """The image keys of a record that are generation targets (those of the gpt turn)."""
    n_prompt = sum(turn["value"].count(IMAGE) for turn in record["conversations"] if turn["from"] == "human")
    return record["image"][n_prompt:]


def in_split(record, split):
    """The held-out rule. train: no generation target shows a `HELD_OUT` pair. eval: a generation
    target shows one, or, for understanding tasks (no targets), a prompt image does."""
    targets = target_keys(record)
    if split == "train":
        return not any(shows_held_out(k) for k in targets)
    return any(shows_held_out(k) for k in (targets or record["image"]))


class ShapesDataset(Dataset):
    """Map-style dataset of records (see the module docstring); record ``i`` depends only on
    (split, seed, i), and task ``i`` is ``tasks[i % len(tasks)]``, so any ``size >= len(tasks)``
    covers every task.

    Args:
        split: ``"train"`` or ``"eval"`` (held-out rule: `in_split`).
        size: number of records.
        seed: varies every record.
        image_size: side of the images `image` draws.
        tasks: names from `TASKS` (all when None).
    """

    def __init__(self, split="train", size=1000, seed=0, image_size=384, tasks=None):
        if split not in ("train", "eval"):
            raise ValueError(f'split must be "train" or "eval", got {split!r}')
        tasks = tuple(TASKS if tasks is None else tasks)
        unknown = [t for t in tasks if t not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"tasks must be a non-empty selection of {TASKS}, got {tasks}")
        self.split, self.size, self.seed, self.image_size, self.tasks = split, size, seed, image_size, tasks

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        """Returns record ``index`` as a new dict."""
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for {self.size} records")
        index %= self.size
        task = self.tasks[index % len(self.tasks)]
        # A string seed goes through SHA-512 in `random`, so records do not depend on PYTHONHASHSEED.
        rng = random.Random(f"vpit-shapes/{self.split}/{self.seed}/{index}")
        for _ in range(10_000):  # rejection sampling: about 1 in 6 draws fits eval, 5 in 6 fit train
            human, gpt, scenes = TASK_BUILDERS[task](rng)
            record = {"id": f"{self.split}-{self.seed}-{index}", "task": task,
                      "image": [scene_to_key(s) for s in scenes],
                      "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}
            if in_split(record, self.split):
                return record
        raise RuntimeError(f"no {self.split} record found for {task}")

    def image(self, key):
        """Draws the image of ``key`` (a file name ``key.png`` works too); returns a PIL RGB image
        of ``image_size x image_size``."""
        return render(key_to_scene(key), self.image_size)

    def image_keys(self):
        """Every distinct image key the records use, sorted."""
        return sorted({key for record in self for key in record["image"]})

    def write_jsonl(self, path, image_suffix=".png"):
        """Writes one record per line. Image entries become ``key + image_suffix``, the file names
        `save_images` writes, so a LLaVA-style loader joins them with the image folder. Returns the
        path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w") as f:
            for record in self:
                record["image"] = [key + image_suffix for key in record["image"]]
                f.write(json.dumps(record) + "\n")
        return path

    def save_images(self, directory):
        """Writes every image the records use as ``<directory>/<key>.png``; files already there are
        kept (their content is fixed by the key and image_size). Returns the number written."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = 0
        for key in self.image_keys():
            path = directory / f"{key}.png"
            if not path.exists():
                self.image(key).save(path, format="PNG")
                written += 1
        return written


# ----------------------------------------------------------------------------------------------
# Vocabulary

def vocabulary():
    """Every word the dataset's texts can contain, lower-case and sorted: the words of `TEMPLATES`,
    the attribute and direction words, the digits and the punctuation marks the templates use.
    ``<image>`` is left out (it is a special token)."""
    words = set(string.digits)
    fixed = [re.sub(r"\{\w+\}", " ", t) for t in TEMPLATES.values()]
    answers = [*SHAPES, *COLORS, *SIZES, *POSITIONS, *DIRECTIONS]
    for text in fixed + answers:
        words.update(re.findall(r"[a-z]+|[^\sa-z0-9]", text.lower()))
    return sorted(words)
