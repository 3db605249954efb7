"""Data of the embedded default: the procedural shapes dataset (every MetaMorph data type as
LLaVA-style records, images drawn on demand) and the word-level tokenizer over its vocabulary."""

from vpit_fast.data.shapes import (HELD_OUT, TASKS, Scene, Shape, ShapesDataset, key_to_scene, render,
                                   scene_to_key, vocabulary)
from vpit_fast.data.tokenizer import SPECIAL_TOKENS, build_tokenizer, normalize_text

__all__ = ["HELD_OUT", "SPECIAL_TOKENS", "TASKS", "Scene", "Shape", "ShapesDataset", "build_tokenizer",
           "key_to_scene", "normalize_text", "render", "scene_to_key", "vocabulary"]
