"""The picture checker (`vpit_fast.visualizer.check`) and the held-out scenes of the visualizer's
evaluation: right on ground-truth renders (on and off the dataset's positions), wrong on blank,
recoloured and other-kind pictures."""

import random

import numpy as np
import pytest
from PIL import Image

from vpit_fast.data.shapes import COLORS, CORNERS, SHAPES, SIZES, Scene, Shape, key_to_scene, render, scene_to_key
from vpit_fast.visualizer.check import check_picture, parse_request, score, single_shape_keys
from vpit_fast.visualizer.evaluate import held_out_keys, truth


@pytest.mark.parametrize("side", [16, 24, 32])
def test_right_on_every_ground_truth_render(side):
    keys = single_shape_keys()
    assert len(keys) == 240
    result = score([render(k, side) for k in keys], [truth(k) for k in keys])
    assert (result["kind"], result["color"], result["both"]) == (1.0, 1.0, 1.0)
    assert check_picture(render(keys[0], side)).iou == 1.0


def test_off_grid_shapes_are_recognised_wherever_they_are():
    """Shapes moved off the dataset's five positions by up to 12% of the side (not among the
    references): the match over every shift still finds the kind."""
    rng = random.Random(0)
    shapes = [Shape(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES), rng.choice(CORNERS),
                    (rng.randint(-120, 120), rng.randint(-120, 120))) for _ in range(120)]
    result = score([render(Scene((s,)), 24) for s in shapes], [(s.kind, s.color) for s in shapes])
    assert result["color"] == 1.0 and result["kind"] >= 0.95, result


def test_wrong_on_blank_recoloured_and_other_kind_pictures():
    circle = render(scene_to_key(Scene((Shape("circle", "red", "large", "center"),))), 24)
    assert check_picture(circle).shows("circle", "red")

    blank = check_picture(Image.new("RGB", (24, 24), (255, 255, 255)))
    assert (blank.kind, blank.color, blank.pixels) == (None, None, 0) and not blank.shows("circle", "red")

    pixels = np.asarray(circle).copy()
    pixels[(pixels == COLORS["red"]).all(-1)] = COLORS["blue"]  # the same circle, painted blue
    swapped = check_picture(pixels)
    assert swapped.kind == "circle" and swapped.color == "blue" and not swapped.shows("circle", "red")

    for kind in ("square", "triangle", "star"):
        other = check_picture(render(Scene((Shape(kind, "red", "large", "top left"),)), 24))
        assert other.kind == kind and not other.shows("circle", "red")

    # Scoring counts exactly these: one right, one blank, one wrong colour.
    result = score([circle, Image.new("RGB", (24, 24), "white"), Image.fromarray(pixels)],
                   [("circle", "red")] * 3)
    assert result["kind"] == pytest.approx(2 / 3) and result["color"] == pytest.approx(1 / 3)
    assert result["both"] == pytest.approx(1 / 3) and result["chance_both"] == pytest.approx(1 / 24)


def test_noise_does_not_change_the_answer():
    rng = np.random.default_rng(0)
    key = scene_to_key(Scene((Shape("star", "purple", "large", "bottom right"),)))
    pixels = np.asarray(render(key, 32)).astype(float) + rng.normal(0, 25, (32, 32, 3))
    assert check_picture(np.clip(pixels, 0, 255).astype(np.uint8)).shows("star", "purple")
    with pytest.raises(ValueError, match="square RGB"):
        check_picture(np.zeros((8, 9, 3), dtype=np.uint8))


def test_parse_request():
    assert parse_request("Generate an image of a red circle") == ("circle", "red")
    assert parse_request("Draw a large blue star in the top left.") == ("star", "blue")
    assert parse_request("What colour is the shape?") == (None, None)
    assert parse_request("a red circle and a green square") == (None, None)  # two of each: ambiguous


def test_held_out_keys_cover_every_kind_and_colour_evenly():
    keys = held_out_keys(72, seed=0)
    assert len(keys) == len(set(keys)) == 72 and keys == held_out_keys(72, seed=0)
    assert keys != held_out_keys(72, seed=1)
    pairs = [truth(k) for k in keys]
    assert all(pairs.count((kind, color)) == 3 for kind in SHAPES for color in COLORS)
    assert all(len(key_to_scene(k).shapes) == 1 and key_to_scene(k).zoom is None for k in keys)
    with pytest.raises(ValueError, match="multiple of 24"):
        held_out_keys(50)
