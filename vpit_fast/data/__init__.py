"""Data: LLaVA-style conversation encoding (response-only labels, visual slots) and sequence
packing, plus the embedded default's procedural shapes dataset (every MetaMorph data type, images
drawn on demand) and the word-level tokenizer over its vocabulary."""

from vpit_fast.data.conversations import IGNORE_INDEX, MalformedRecord, Sample, encode_all, encode_conversation
from vpit_fast.data.packing import PackedBatch, collate_packed, flatten_packed, pack, pad_batch
from vpit_fast.data.shapes import (HELD_OUT, TASKS, Scene, Shape, ShapesDataset, key_to_scene, render,
                                   scene_to_key, vocabulary)
from vpit_fast.data.tokenizer import SPECIAL_TOKENS, build_tokenizer, normalize_text

__all__ = ["HELD_OUT", "IGNORE_INDEX", "SPECIAL_TOKENS", "TASKS", "MalformedRecord", "PackedBatch", "Sample",
           "Scene", "Shape", "ShapesDataset", "build_tokenizer", "collate_packed", "encode_all",
           "encode_conversation", "flatten_packed", "key_to_scene", "normalize_text", "pack", "pad_batch",
           "render", "scene_to_key", "vocabulary"]

# The training data pipeline: record files, image sources, the dataset and its DataLoader.
from vpit_fast.data.conversations import chat_template  # noqa: E402
from vpit_fast.data.dataset import (EpochBatchSampler, ImageFolder, ImageFunction, ImageLoadError,  # noqa: E402
                                    PrecomputedImages, VPiTDataset, as_image_source, collate, load_records,
                                    make_dataloader)

__all__ += ["EpochBatchSampler", "ImageFolder", "ImageFunction", "ImageLoadError", "PrecomputedImages",
            "VPiTDataset", "as_image_source", "chat_template", "collate", "load_records", "make_dataloader"]
