"""The fused decode-step dispatch (vpit_fast.ops.decode_dispatch) against its pure-PyTorch
reference (ids and state exactly) and a float64 ground truth (visual tokens and embeddings), on
CPU and (when present) CUDA."""

import copy
import functools
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vpit_fast.ops import reference
from vpit_fast.ops.decode_dispatch import DONE, IMAGE_MODE, TEXT, dispatch_next_inputs

from conftest import DEVICES, HAS_CUDA, SLACK, poison, rel_error, requires_cuda

N = 5  # visual tokens per image
V = 50
START, END, SLOT, PAD = 41, 42, 40, 0
EOS = (43, 44)
IDS = dict(num_visual_tokens=N, image_start_id=START, image_end_id=END, image_token_id=SLOT, pad_id=PAD)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Every kind of row: each transition of the state machine.
CASES = ["word", "start", "eos0", "eos1", "image_first", "image_mid", "image_last", "image_end", "done"]


def mixed_state(batch):
    """A random mix of every case (all of them once batch >= 9). Rows not in text mode get ids
    that would switch a text row (<image_start>, end of turn) or random ones: they must be ignored."""
    cases = torch.randperm(max(batch, len(CASES)))[:batch] % len(CASES)
    mode, count, left, text = [], [], [], []
    for i in cases.tolist():
        case = CASES[i]
        stray = int(torch.tensor([START, EOS[0], int(torch.randint(0, V, ()))])[torch.randint(0, 3, ())])
        word = int(torch.randint(1, SLOT, ()))
        row = {
            "word": (TEXT, 0, word),
            "start": (TEXT, 0, START),
            "eos0": (TEXT, 0, EOS[0]),
            "eos1": (TEXT, 0, EOS[1]),
            "image_first": (IMAGE_MODE, 0, stray),
            "image_mid": (IMAGE_MODE, int(torch.randint(1, N - 1, ())), stray),
            "image_last": (IMAGE_MODE, N - 1, stray),
            "image_end": (IMAGE_MODE, N, stray),
            "done": (DONE, 0, stray),
        }[case]
        mode.append(row[0])
        count.append(row[1])
        text.append(row[2])
        left.append(int(torch.randint(0, 4, ())))
    as_long = functools.partial(torch.tensor, dtype=torch.int64)
    return as_long(mode), as_long(count), as_long(left), as_long(text)


@functools.lru_cache(maxsize=None)
def make_adapter(dv, hidden, dtype, device):
    """An adapter shaped like the model's (Linear, GELU, Linear); a narrow middle keeps it cheap."""
    torch.manual_seed(dv * 7919 + hidden)
    return nn.Sequential(nn.Linear(dv, 64), nn.GELU(), nn.Linear(64, hidden)).to(device, dtype)


def to(device, *tensors):
    return [t.to(device) for t in tensors]


def check_against_reference(batch, dv, hidden, dtype, normalize, device):
    mode, count, left, text = mixed_state(batch)
    pred = torch.randn(batch, dv).to(dtype)
    table = torch.randn(V, hidden).to(dtype)
    eos = torch.tensor(EOS)
    adapter = make_adapter(dv, hidden, dtype, "cpu")
    with torch.no_grad():
        ref = reference.dispatch_next_inputs(mode, count, left, text, pred, table, adapter, eos_ids=eos,
                                             normalize=normalize, **IDS)
        poison(device)
        dev_adapter = make_adapter(dv, hidden, dtype, device)
        ours = dispatch_next_inputs(*to(device, mode, count, left, text, pred, table), dev_adapter,
                                    eos_ids=eos.to(device), normalize=normalize, **IDS)
        # The embedding rows that come from the adapter must be exactly its output on our tokens.
        adapted = dev_adapter(ours[2]).to(dtype).cpu()
    embeds, ids, visual, new_mode, new_count, new_left = [t.cpu() for t in ours]

    for name, a, b in (("ids", ids, ref[1]), ("mode", new_mode, ref[3]), ("count", new_count, ref[4]),
                       ("left", new_left, ref[5])):
        assert a.dtype == torch.int64 and torch.equal(a, b), f"{name}: {a.tolist()} != {b.tolist()}"
    assert visual.shape == (batch, dv) and visual.dtype == dtype
    assert embeds.shape == (batch, hidden) and embeds.dtype == dtype

    emits = (mode == IMAGE_MODE) & (count < N)
    assert (visual[~emits] == 0).all()
    if normalize:
        v64 = F.normalize(pred.double(), dim=-1)[emits]
        ours_err, plain_err = rel_error(visual[emits], v64), rel_error(ref[2][emits], v64)
        assert ours_err <= plain_err + SLACK[dtype], f"visual error {ours_err:.3e} vs plain {plain_err:.3e}"
    else:
        assert torch.equal(visual, ref[2])  # a copy, bit for bit

    assert torch.equal(embeds[~emits], table[ids[~emits]])  # gathers are exact
    assert torch.equal(embeds[emits], adapted[emits])
    if emits.any():
        with torch.no_grad():
            v64 = F.normalize(pred.double(), dim=-1) if normalize else pred.double()
            e64 = copy.deepcopy(adapter).double()(v64)[emits]
        ours_err, plain_err = rel_error(embeds[emits], e64), rel_error(ref[0][emits], e64)
        assert ours_err <= plain_err + SLACK[dtype], f"embeds error {ours_err:.3e} vs plain {plain_err:.3e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [False, True], ids=["plain", "normalize"])
@pytest.mark.parametrize("hidden", [64, 2048])
@pytest.mark.parametrize("dv", [16, 1152])
@pytest.mark.parametrize("batch", [1, 3, 17, 64])
def test_matches_reference(batch, dv, hidden, normalize, dtype, device):
    check_against_reference(batch, dv, hidden, dtype, normalize, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", [False, True])
def test_every_transition_by_hand(normalize, device):
    H, DV = 8, 16
    table = torch.randn(V, H, device=device)
    adapter = make_adapter(DV, H, torch.float32, device)
    # text word, <image_start>, each eos id, <image_start> that is also an eos id (done wins,
    # the image still counts), image count 0 / 3 / n-1 / n, done, and an image row whose stray
    # id is an eos id (ignored).
    mode = torch.tensor([TEXT, TEXT, TEXT, TEXT, TEXT, IMAGE_MODE, IMAGE_MODE, IMAGE_MODE, IMAGE_MODE, DONE,
                         IMAGE_MODE], device=device)
    count = torch.tensor([0, 0, 0, 0, 0, 0, 3, N - 1, N, 0, 2], device=device)
    left = torch.tensor([2, 2, 2, 2, 1, 1, 1, 1, 1, 0, 3], device=device)
    text = torch.tensor([5, START, EOS[0], EOS[1], START, 6, START, 7, EOS[0], 8, EOS[1]], device=device)
    pred = torch.randn(11, DV, device=device)
    eos = torch.tensor(EOS, device=device)
    with torch.no_grad():
        embeds, ids, visual, new_mode, new_count, new_left = dispatch_next_inputs(
            mode, count, left, text, pred, table, adapter, eos_ids=eos, normalize=normalize, **IDS)
        # Row 4: an id that is both <image_start> and end of turn.
        both = dispatch_next_inputs(mode[4:5], count[4:5], left[4:5], text[4:5], pred[4:5], table, adapter,
                                    eos_ids=torch.tensor([START], device=device), normalize=normalize, **IDS)
    assert ids.tolist() == [5, START, EOS[0], EOS[1], START, SLOT, SLOT, SLOT, END, PAD, SLOT]
    assert new_mode.tolist() == [TEXT, IMAGE_MODE, DONE, DONE, IMAGE_MODE, IMAGE_MODE, IMAGE_MODE, IMAGE_MODE,
                                 TEXT, DONE, IMAGE_MODE]
    assert new_count.tolist() == [0, 0, 0, 0, 0, 1, 4, N, 0, 0, 3]
    assert new_left.tolist() == [2, 1, 2, 2, 0, 1, 1, 1, 1, 0, 3]
    assert [t.tolist() for t in both[1:2] + both[3:]] == [[START], [DONE], [0], [0]]
    expected_visual = F.normalize(pred, dim=-1) if normalize else pred
    with torch.no_grad():
        for row in (5, 6, 7, 10):
            torch.testing.assert_close(visual[row], expected_visual[row])
            torch.testing.assert_close(embeds[row], adapter(expected_visual[row]))
    for row in (0, 1, 2, 3, 4, 8, 9):
        assert visual[row].abs().max() == 0
        assert torch.equal(embeds[row], table[ids[row]])


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_no_eos_ids(device):
    table = torch.randn(V, 32, device=device)
    adapter = make_adapter(16, 32, torch.float32, device)
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    with torch.no_grad():
        out = dispatch_next_inputs(empty, empty, empty, empty, torch.randn(0, 16, device=device), table, adapter,
                                   eos_ids=torch.tensor(EOS, device=device), normalize=True, **IDS)
    assert [tuple(t.shape) for t in out] == [(0, 32), (0,), (0, 16), (0,), (0,), (0,)]
    # No end-of-turn ids: an eos-looking id is just a word.
    one = torch.tensor([TEXT], device=device)
    with torch.no_grad():
        _, ids, _, mode, _, _ = dispatch_next_inputs(
            one, one * 0, one * 0, torch.tensor([EOS[0]], device=device), torch.randn(1, 16, device=device), table,
            adapter, eos_ids=empty, normalize=False, **IDS)
    assert ids.tolist() == [EOS[0]] and mode.tolist() == [TEXT]


@pytest.mark.parametrize("device", DEVICES)
def test_strided_and_unaligned_inputs(device):
    # Strided state, a strided prediction, a table whose rows are padded (read in place) and
    # bf16 views that start one element in (no 16-byte packs): the kernels must fall back.
    batch, dv, hidden = 9, 24, 40
    mode, count, left, text = mixed_state(batch)
    stride2 = [torch.stack([t, t], 1).reshape(-1)[::2] for t in (mode, count, left, text)]
    assert not stride2[0].is_contiguous()
    pred = torch.randn(1 + batch * dv, dtype=torch.bfloat16)[1:].view(batch, dv)
    wide = torch.randn(V, hidden + 3, dtype=torch.bfloat16)
    table = wide[:, 1:hidden + 1]
    adapter = make_adapter(dv, hidden, torch.bfloat16, "cpu")
    eos = torch.tensor(EOS)
    with torch.no_grad():
        ref = reference.dispatch_next_inputs(mode, count, left, text, pred, table, adapter, eos_ids=eos,
                                             normalize=False, **IDS)
        dev_pred = torch.randn(1 + batch * dv, dtype=torch.bfloat16, device=device)
        dev_pred[1:].copy_(pred.reshape(-1))
        dev_wide = wide.to(device)
        ours = dispatch_next_inputs(*to(device, *stride2), dev_pred[1:].view(batch, dv), dev_wide[:, 1:hidden + 1],
                                    make_adapter(dv, hidden, torch.bfloat16, device), eos_ids=eos.to(device),
                                    normalize=False, **IDS)
    for a, b in zip(ours[1:], ref[1:]):
        assert torch.equal(a.cpu(), b)
    emits = (mode == IMAGE_MODE) & (count < N)
    assert torch.equal(ours[0].cpu()[~emits], ref[0][~emits])


def test_out_of_range_id_raises_on_cpu():
    table = torch.randn(V, 8)
    adapter = make_adapter(16, 8, torch.float32, "cpu")
    one = torch.tensor([TEXT])
    with pytest.raises(RuntimeError, match=r"next_ids\[0\] = 50 is outside token_embedding's 50 rows"):
        dispatch_next_inputs(one, one * 0, one * 0, torch.tensor([V]), torch.randn(1, 16), table, adapter,
                             eos_ids=torch.tensor(EOS), normalize=False, **IDS)
    # Rows that emit a visual token gather nothing: any id is fine there.
    image = torch.tensor([IMAGE_MODE])
    with torch.no_grad():
        dispatch_next_inputs(image, image * 0, image * 0, torch.tensor([10 ** 9]), torch.randn(1, 16), table,
                             adapter, eos_ids=torch.tensor(EOS), normalize=False, **IDS)


@requires_cuda
def test_out_of_range_id_is_a_device_assert_on_cuda():
    # A device-side assert ruins the CUDA context, so it runs in a child process.
    code = (
        "import torch\n"
        "from vpit_fast.ops.decode_dispatch import dispatch_next_inputs\n"
        "d = 'cuda'\n"
        "one = torch.tensor([0], device=d)\n"
        "out = dispatch_next_inputs(one, one, one, torch.tensor([50], device=d), torch.randn(1, 16, device=d),\n"
        "    torch.randn(50, 8, device=d), lambda v: v[:, :8], num_visual_tokens=5, image_start_id=41,\n"
        "    image_end_id=42, image_token_id=40, pad_id=0, eos_ids=torch.tensor([43], device=d), normalize=False)\n"
        "torch.cuda.synchronize()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "device-side assert" in result.stderr or "outside token_embedding" in result.stderr, result.stderr[-2000:]


def test_compiled_path_has_no_backward_and_reference_does():
    adapter = make_adapter(16, 8, torch.float32, "cpu")
    mode, count, left, text = mixed_state(9)
    pred = torch.randn(9, 16, requires_grad=True)
    table = torch.randn(V, 8)
    args = (mode, count, left, text, pred, table, adapter)
    kwargs = dict(eos_ids=torch.tensor(EOS), normalize=True, **IDS)
    embeds = dispatch_next_inputs(*args, **kwargs)[0]
    with pytest.raises(RuntimeError, match="inference only"):
        embeds.sum().backward()
    dispatch_next_inputs(*args, impl="torch", **kwargs)[0].sum().backward()
    assert pred.grad is not None


def test_impl_torch_is_the_reference_and_takes_float64():
    mode, count, left, text = mixed_state(12)
    pred, table = torch.randn(12, 16, dtype=torch.float64), torch.randn(V, 8, dtype=torch.float64)
    adapter = nn.Linear(16, 8).double()
    kwargs = dict(eos_ids=torch.tensor(EOS), normalize=True, **IDS)
    with torch.no_grad():
        ours = dispatch_next_inputs(mode, count, left, text, pred, table, adapter, impl="torch", **kwargs)
        ref = reference.dispatch_next_inputs(mode, count, left, text, pred, table, adapter, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize", [False, True])
def test_opcheck(device, normalize):
    mode, count, left, text = to(device, *mixed_state(11))
    pred = torch.randn(11, 24, device=device, dtype=torch.bfloat16)
    eos = torch.tensor(EOS, device=device)
    prepare = torch.ops.vpit_fast.decode_dispatch_prepare.default
    torch.library.opcheck(prepare, (mode, count, left, text, pred, eos, N, START, END, SLOT, PAD, normalize))
    next_ids, visual, emits, *_ = prepare(mode, count, left, text, pred, eos, N, START, END, SLOT, PAD, normalize)
    table = torch.randn(V, 40, device=device, dtype=torch.bfloat16)
    adapted = torch.randn(11, 40, device=device, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.vpit_fast.decode_dispatch_assemble.default, (next_ids, emits, adapted, table))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    adapter = make_adapter(16, 32, torch.float32, device)
    eos = torch.tensor(EOS, device=device)

    def step(mode, count, left, text, pred, table):
        return dispatch_next_inputs(mode, count, left, text, pred, table, adapter, eos_ids=eos, normalize=True,
                                    **IDS)

    compiled = torch.compile(step, fullgraph=True)
    args = (*to(device, *mixed_state(13)), torch.randn(13, 16, device=device), torch.randn(V, 32, device=device))
    with torch.no_grad():
        eager, traced = step(*args), compiled(*args)
    for a, b in zip(traced, eager):
        if a.is_floating_point():
            torch.testing.assert_close(a, b)
        else:
            assert torch.equal(a, b)


@requires_cuda
def test_cuda_graph_capture():
    adapter = make_adapter(64, 128, torch.bfloat16, "cuda")
    eos = torch.tensor(EOS, device="cuda")
    state = to("cuda", *mixed_state(17))
    pred = torch.randn(17, 64, device="cuda", dtype=torch.bfloat16)
    table = torch.randn(V, 128, device="cuda", dtype=torch.bfloat16)

    def step():
        return dispatch_next_inputs(*state, pred, table, adapter, eos_ids=eos, normalize=True, **IDS)

    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm-up outside the graph
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = step()
        for t, new in zip(state, mixed_state(17)):
            t.copy_(new)
        pred.copy_(torch.randn_like(pred))
        graph.replay()
        expected = step()
    for a, b in zip(static, expected):
        assert torch.equal(a, b)


def good_args():
    mode, count, left, text = mixed_state(4)
    return dict(mode=mode, visual_count=count, images_left=left, text_ids=text, visual_pred=torch.randn(4, 16),
                token_embedding=torch.randn(V, 8), adapter=make_adapter(16, 8, torch.float32, "cpu"),
                eos_ids=torch.tensor(EOS), normalize=False, **IDS)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(mode=torch.zeros(4, 1, dtype=torch.int64)), ValueError, r"mode must be \[B\]"),
        (dict(mode=torch.zeros(4, dtype=torch.int32)), TypeError, "mode must be int64"),
        (dict(visual_count=torch.zeros(5, dtype=torch.int64)), ValueError, r"visual_count must be \[4\]"),
        (dict(images_left=torch.zeros(4)), TypeError, "images_left must be int64"),
        (dict(text_ids=[1, 2, 3, 4]), TypeError, "text_ids must be a torch.Tensor"),
        (dict(eos_ids=torch.tensor(EOS, dtype=torch.int32)), TypeError, "eos_ids must be int64"),
        (dict(eos_ids=torch.tensor([EOS])), ValueError, r"eos_ids must be \[E\]"),
        (dict(visual_pred=torch.randn(3, 16)), ValueError, r"visual_pred must be \[4, Dv\]"),
        (dict(visual_pred=torch.randn(4, 0)), ValueError, "Dv > 0"),
        (dict(visual_pred=torch.randn(4, 16, dtype=torch.float64)), TypeError, "visual_pred must be float32"),
        (dict(token_embedding=torch.randn(V, 8, dtype=torch.float64)), TypeError, "token_embedding must be float32"),
        (dict(token_embedding=torch.randn(V)), ValueError, r"token_embedding must be \[V, H\]"),
        (dict(pad_id=V), ValueError, "pad_id = 50 is outside token_embedding's 50 rows"),
        (dict(image_end_id=-1), ValueError, "image_end_id = -1 is outside"),
        (dict(image_start_id=41.0), TypeError, "image_start_id must be an int"),
        (dict(num_visual_tokens=-1), ValueError, "num_visual_tokens must be >= 0"),
        (dict(impl="triton"), ValueError, "impl must be"),
        (dict(visual_pred=torch.randn(4, 16, device="meta")), ValueError, "visual_pred is on meta but mode is on cpu"),
    ],
)
def test_bad_input_raises_clear_errors(change, error, match):
    kwargs = good_args()
    kwargs.update(change)
    with pytest.raises(error, match=match):
        dispatch_next_inputs(**kwargs)


def test_direct_op_calls_are_checked_in_cpp():
    op = torch.ops.vpit_fast
    mode, count, left, text = mixed_state(4)
    pred, eos = torch.randn(4, 16), torch.tensor(EOS)
    consts = (N, START, END, SLOT, PAD, False)
    with pytest.raises(RuntimeError, match=r"decode_dispatch_prepare: text_ids must be \[4\], got shape \[3\]"):
        op.decode_dispatch_prepare(mode, count, left, text[:3], pred, eos, *consts)
    with pytest.raises(RuntimeError, match="decode_dispatch_prepare: visual_count must be Long, got Int"):
        op.decode_dispatch_prepare(mode, count.int(), left, text, pred, eos, *consts)
    with pytest.raises(RuntimeError, match="visual_pred must be float32, bfloat16 or float16, got Double"):
        op.decode_dispatch_prepare(mode, count, left, text, pred.double(), eos, *consts)
    with pytest.raises(RuntimeError, match="num_visual_tokens must be >= 0"):
        op.decode_dispatch_prepare(mode, count, left, text, pred, eos, -1, *consts[1:])
    ids, emits = torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.bool)
    table = torch.randn(V, 8)
    with pytest.raises(RuntimeError, match="decode_dispatch_assemble: adapted is BFloat16 but token_embedding is Float"):
        op.decode_dispatch_assemble(ids, emits, torch.randn(4, 8, dtype=torch.bfloat16), table)
    with pytest.raises(RuntimeError, match=r"adapted must be \[4, 8\], got shape \[4, 9\]"):
        op.decode_dispatch_assemble(ids, emits, torch.randn(4, 9), table)
    with pytest.raises(RuntimeError, match="emits_visual must be Bool"):
        op.decode_dispatch_assemble(ids, emits.long(), torch.randn(4, 8), table)
    if HAS_CUDA:
        with pytest.raises(RuntimeError, match="visual_pred is on cuda:0 but mode is on cpu"):
            op.decode_dispatch_prepare(mode, count, left, text, pred.cuda(), eos, *consts)
        with pytest.raises(RuntimeError, match="token_embedding is on cpu but next_ids is on cuda:0"):
            op.decode_dispatch_assemble(ids.cuda(), emits.cuda(), torch.randn(4, 8, device="cuda"), table)
