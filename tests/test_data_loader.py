"""The training data pipeline (`vpit_fast.data.dataset`): shapes records written to JSONL + a PNG
folder, read back through the folder source with a tiny SigLIP processor; packing, workers, the
(seed, epoch) order, resume, the distributed split, skipped and corrupt inputs, precomputed
tokens. 4 visual tokens per image keep the rows short."""

import json
import re
import warnings

import pytest
import torch

from vpit_fast.data.conversations import MalformedRecord
from vpit_fast.data.dataset import (EpochBatchSampler, ImageFunction, ImageLoadError, VPiTDataset, load_records,
                                    make_dataloader)
from vpit_fast.data.packing import PackedBatch
from vpit_fast.data.shapes import ShapesDataset
from vpit_fast.data.tokenizer import build_tokenizer
from vpit_fast.visual_tokens import VisualTokens, load_precomputed, tiny_siglip_config

N = 4
BUDGET = 96


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataset(size=40, image_size=32)


@pytest.fixture(scope="module")
def files(shapes, tmp_path_factory):
    """(records path, image folder): 40 records of every task and their PNGs."""
    root = tmp_path_factory.mktemp("shapes")
    path = shapes.write_jsonl(root / "train.jsonl")
    shapes.save_images(root / "images")
    return path, root / "images"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def processor():
    return VisualTokens.from_config(tiny_siglip_config()).processor  # resizes to 108x108


@pytest.fixture(scope="module")
def packed(files, tok, processor):
    return VPiTDataset(files[0], tok, files[1], num_visual_tokens=N, processor=processor, budget=BUDGET)


def all_batches(loader):
    return list(loader)


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert torch.equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


def test_load_records(tmp_path, shapes):
    records = [shapes[i] for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(records, indent=1))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    assert load_records(tmp_path / "a.json") == records == load_records(str(tmp_path / "a.jsonl"))
    (tmp_path / "bad.jsonl").write_text(json.dumps(records[0]) + "\n{broken\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        load_records(tmp_path / "bad.jsonl")
    (tmp_path / "bad.json").write_text('[\n{"id": 1},\n{"id": }\n]')
    with pytest.raises(ValueError, match=r"bad\.json:3: invalid JSON"):
        load_records(tmp_path / "bad.json")
    (tmp_path / "dict.json").write_text('{"id": 1}')
    with pytest.raises(ValueError, match="holds a list"):
        load_records(tmp_path / "dict.json")
    with pytest.raises(ValueError, match=r"\.json or \.jsonl"):
        load_records(tmp_path / "a.txt")


def test_packed_items_and_batches(packed, shapes, tok, processor):
    # Every sample in exactly one row, rows within budget.
    assert len(packed.samples) == 40 and packed.skipped == {"malformed": 0, "missing_image": 0, "too_long": 0}
    flat = sorted(i for row in packed.rows for i in row)
    assert flat == list(range(40)) and len(packed) < 40
    assert all(sum(len(packed.samples[i]) for i in row) <= BUDGET for row in packed.rows)
    item = packed[0]
    assert isinstance(item["row"], PackedBatch) and item["row"].input_ids.shape == (BUDGET,)
    assert item["pixel_values"].shape == (len(item["row"].image_keys), 3, 108, 108)

    batches = all_batches(make_dataloader(packed, batch_size=3, drop_last=False))
    seen = []
    image_id = tok.convert_tokens_to_ids("<image>")
    for batch in batches:
        assert batch["input_ids"].shape == (len(batch["sample_ids"]), BUDGET)
        assert int(batch["cu_seqlens"][-1]) == batch["input_ids"].numel()
        # no row holds more than the budget of real tokens
        assert ((batch["segment_ids"] >= 0).sum(1) <= BUDGET).all()
        seen += [sid for row in batch["sample_ids"] for sid in row]
        pixel_values = batch["pixel_values"]
        assert pixel_values.dtype == torch.float32 and pixel_values.shape[0] == len(batch["image_keys"])
        assert (batch["input_ids"][batch["image_batch_index"], batch["image_slots"]] == image_id).all()
    assert sorted(seen) == sorted(r["id"] for r in shapes)
    # The pixels are the processor's output for the PNG of each key, in image_keys order.
    last = batches[-1]
    expected = processor(images=[shapes.image(k) for k in last["image_keys"]], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(last["pixel_values"], expected, rtol=0, atol=0)


def test_workers_give_the_same_batches(packed):
    serial = all_batches(make_dataloader(packed, batch_size=2, num_workers=0, seed=3, epoch=1, drop_last=False))
    parallel = all_batches(make_dataloader(packed, batch_size=2, num_workers=2, seed=3, epoch=1, drop_last=False))
    assert_same_batches(serial, parallel)


def test_order_depends_on_seed_and_epoch_only(packed):
    def order(**kwargs):
        return [b["sample_ids"] for b in make_dataloader(packed, batch_size=2, **kwargs)]
    assert order(seed=1, epoch=0) == order(seed=1, epoch=0)
    assert order(seed=1, epoch=0) != order(seed=1, epoch=1) and order(seed=1, epoch=0) != order(seed=2, epoch=0)
    assert order(shuffle=False) == [[packed[i]["row"].sample_ids, packed[i + 1]["row"].sample_ids]
                                    for i in range(0, len(packed) - 1, 2)]


def test_len_and_resume(packed):
    full = make_dataloader(packed, batch_size=2, seed=5)
    assert len(full) == len(packed) // 2 == full.batch_sampler.batches_per_epoch
    assert len(make_dataloader(packed, batch_size=2, drop_last=False)) == -(-len(packed) // 2)
    batches = all_batches(full)
    for k in (0, 3, len(batches)):
        tail = make_dataloader(packed, batch_size=2, seed=5, start_batch=k)
        assert len(tail) == len(batches) - k
        assert_same_batches(all_batches(tail), batches[k:])
    with pytest.raises(ValueError, match="start_batch"):
        make_dataloader(packed, batch_size=2, start_batch=len(batches) + 1)


def test_resume_loads_no_skipped_images(files, tok, processor, shapes):
    loaded = []

    def draw(key):
        loaded.append(key)
        return shapes.image(key)

    dataset = VPiTDataset(files[0], tok, ImageFunction(draw), num_visual_tokens=N, processor=processor,
                          budget=BUDGET)
    full = all_batches(make_dataloader(dataset, batch_size=2))
    loaded.clear()
    tail = all_batches(make_dataloader(dataset, batch_size=2, start_batch=4))
    assert_same_batches(tail, full[4:])
    assert loaded == [k for batch in full[4:] for k in batch["image_keys"]]


@pytest.mark.parametrize("drop_last", [True, False])
def test_ranks_split_each_global_batch(packed, drop_last):
    world_size, batch_size = 2, 2
    one = [b["sample_ids"] for b in make_dataloader(packed, batch_size=world_size * batch_size, seed=7,
                                                    drop_last=drop_last, pin_memory=False)]
    ranks = [[b["sample_ids"] for b in make_dataloader(packed, batch_size=batch_size, seed=7, rank=r,
                                                       world_size=world_size, drop_last=drop_last)]
             for r in range(world_size)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    assert drop_last or len(one[-1]) < world_size * batch_size  # the short last batch is exercised
    for b, rows in enumerate(one):
        shares = [ranks[r][b] for r in range(world_size)]
        if len(rows) == world_size * batch_size or drop_last:
            assert shares == [rows[r::world_size] for r in range(world_size)]  # interleaved, disjoint
        else:  # a short last batch: every rank gets as many rows, topped up from the epoch's start
            assert len(shares[0]) == len(shares[1])
            assert [r for share in zip(*shares) for r in share][:len(rows)] == rows
    with pytest.raises(ValueError, match="rank"):
        EpochBatchSampler(10, 2, rank=2, world_size=2)


def test_plain_mode(files, tok, processor, shapes):
    dataset = VPiTDataset(files[0], tok, files[1], num_visual_tokens=N, processor=processor, budget=None,
                          pad_to_multiple_of=8)
    assert len(dataset) == 40
    batch = next(iter(make_dataloader(dataset, batch_size=4, shuffle=False)))
    samples = dataset.samples[:4]
    assert batch["sample_ids"] == [s.id for s in samples] == [shapes[i]["id"] for i in range(4)]
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["attention_mask"].sum(1).tolist() == [len(s) for s in samples]
    assert batch["pixel_values"].shape == (sum(len(s.image_keys) for s in samples), 3, 108, 108)


def test_missing_image_and_malformed_record(files, tok, processor, shapes):
    records = load_records(files[0])[:6]
    records[2]["image"][0] = "no-such-image.png"
    records[4] = {"id": "broken", "conversations": [{"from": "human", "value": "What?"}]}
    with pytest.warns(UserWarning) as caught:
        dataset = VPiTDataset(records, tok, files[1], num_visual_tokens=N, processor=processor, budget=BUDGET)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert "skipped 1 malformed record(s) of 6: 'broken'" in messages[0]
    missing = str(files[1] / "no-such-image.png")
    assert f"skipped 1 record(s) of 5 with missing images: {records[2]['id']!r} ({missing})" in messages[1]
    assert len(dataset.samples) == 4 and dataset.skipped == {"malformed": 1, "missing_image": 1, "too_long": 0}
    assert records[2]["id"] not in {s.id for s in dataset.samples}

    with pytest.raises(MalformedRecord, match="'broken'"):
        VPiTDataset(records, tok, files[1], num_visual_tokens=N, processor=processor, on_error="raise")
    with pytest.raises(FileNotFoundError, match=f"{records[2]['id']!r}.*no-such-image.png"):
        VPiTDataset(records[:4], tok, files[1], num_visual_tokens=N, processor=processor, on_error="raise")


def test_samples_longer_than_budget(files, tok, processor):
    records = load_records(files[0])[:7]  # one of every task
    with pytest.warns(UserWarning, match=r"skipped \d+ record\(s\) of 7 longer than the budget of 30 tokens: "):
        dataset = VPiTDataset(records, tok, files[1], num_visual_tokens=N, processor=processor, budget=30)
    assert all(len(s) <= 30 for s in dataset.samples) and 0 < len(dataset.samples) < 7
    assert dataset.skipped["too_long"] == 7 - len(dataset.samples)
    with pytest.raises(ValueError, match="longer than the budget of 30 tokens"):
        VPiTDataset(records, tok, files[1], num_visual_tokens=N, processor=processor, budget=30, on_error="raise")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_image_names_record_and_path(tmp_path, files, tok, processor, num_workers):
    records = load_records(files[0])[:2]
    for record in records:
        for name in record["image"]:
            (tmp_path / name).write_bytes((files[1] / name).read_bytes())
    bad = tmp_path / records[1]["image"][0]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    dataset = VPiTDataset(records, tok, tmp_path, num_visual_tokens=N, processor=processor, budget=None)
    dataset[0]  # the intact record loads
    with pytest.raises(ImageLoadError, match=re.escape(f"record {records[1]['id']!r}: cannot load image {bad}:")):
        all_batches(make_dataloader(dataset, batch_size=2, num_workers=num_workers))


def test_precomputed_tokens(tmp_path, files, tok, shapes):
    records = load_records(files[0])[:14]
    keys = sorted({k for r in records for k in r["image"]})
    encoder = VisualTokens.from_config(tiny_siglip_config(), out_size=(2, 2))  # N = 4 tokens per image
    tokens = encoder.precompute(keys, shapes.image, tmp_path / "tokens", shard_size=16, progress=False)
    dataset = VPiTDataset(records, tok, load_precomputed(tmp_path / "tokens"), num_visual_tokens=N, budget=BUDGET)
    batches = all_batches(make_dataloader(dataset, batch_size=2, num_workers=2, drop_last=False))
    assert sum(len(b["image_keys"]) for b in batches) == sum(len(r["image"]) for r in records)
    for batch in batches:
        assert "pixel_values" not in batch
        expected = torch.stack([tokens[k] for k in batch["image_keys"]])
        assert batch["visual_tokens"].shape == (len(batch["image_keys"]), N, 32)
        assert torch.equal(batch["visual_tokens"], expected)
    # A plain mapping works too; the token count must match num_visual_tokens.
    mapping = {k: torch.full((N, 3), float(i)) for i, k in enumerate(keys)}
    item = VPiTDataset(records, tok, mapping, num_visual_tokens=N, budget=BUDGET)[0]
    assert item["visual_tokens"][:, 0, 0].tolist() == [keys.index(k) for k in item["row"].image_keys]
    with pytest.raises(ValueError, match="4 tokens per image, but num_visual_tokens is 64"):
        VPiTDataset(records, tok, mapping, num_visual_tokens=64)


def test_text_only_batch_has_empty_images(tok, processor, tmp_path):
    record = {"id": "t", "conversations": [{"from": "human", "value": "What shape is in the image?"},
                                           {"from": "gpt", "value": "circle"}]}
    dataset = VPiTDataset([record, {**record, "id": "u"}], tok, tmp_path, num_visual_tokens=N, processor=processor,
                          budget=BUDGET)
    batch = next(iter(make_dataloader(dataset, batch_size=1)))
    assert batch["pixel_values"].shape == (0, 3, 108, 108) and batch["image_keys"] == []


def test_bad_arguments(files, tok, processor):
    path, images = files
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="processor is required"):
            VPiTDataset(path, tok, images, num_visual_tokens=N)
        with pytest.raises(ValueError, match="budget"):
            VPiTDataset(path, tok, images, num_visual_tokens=N, processor=processor, budget=0)
        with pytest.raises(ValueError, match="on_error"):
            VPiTDataset(path, tok, images, num_visual_tokens=N, processor=processor, on_error="ignore")
        with pytest.raises(NotADirectoryError):
            VPiTDataset(path, tok, images / "nowhere", num_visual_tokens=N, processor=processor)
        with pytest.raises(TypeError, match="images must be"):
            VPiTDataset(path, tok, 3, num_visual_tokens=N, processor=processor)
        with pytest.raises(ValueError, match="batch_size"):
            EpochBatchSampler(10, 0)


def test_packing_seed_mixes_rows(files, tok, processor, packed):
    other = VPiTDataset(files[0], tok, files[1], num_visual_tokens=N, processor=processor, budget=BUDGET, seed=1)
    rows = lambda d: sorted(sorted(d.samples[i].id for i in row) for row in d.rows)  # noqa: E731
    assert rows(other) != rows(packed)
    assert sorted(i for row in other.rows for i in row) == list(range(40))
