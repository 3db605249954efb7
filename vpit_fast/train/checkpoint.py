"""Atomic, resumable training checkpoints with torch.distributed.checkpoint (DCP), and safetensors
export for inference.

A checkpoint is the directory ``<root>/step-<n>``:

- ``.metadata`` and ``__<rank>_<i>.distcp``: DCP files holding the model and optimizer state as
  returned by ``torch.distributed.checkpoint.state_dict.get_state_dict`` (sharded DTensors under
  FSDP2, plain tensors otherwise; DCP can reload them at another world size);
- ``rng/rank-<r>.pt``: each rank's RNG states (python ``random``, numpy's global generator when
  numpy is imported, torch CPU, torch CUDA on every visible device when CUDA is initialised);
- ``trainer_state.json``: the step, world size, scheduler state and the caller's ``extra`` dict
  (data position, loss history, config...), JSON so that it can be read by eye.

It is written to ``<root>/.tmp-step-<n>`` and renamed once every rank has finished, so a directory
named ``step-<n>`` is always complete; a crash leaves only a ``.tmp-`` directory, which
`latest_checkpoint` ignores and the next save removes. Works in one process without
``init_process_group`` (DCP's ``no_dist`` mode) and across ranks of an initialised process group.
"""

import contextlib
import json
import os
import random
import re
import shutil
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

_STEP_DIR = re.compile(r"^step-(\d+)$")
_STATE_FILE = "trainer_state.json"


def _distributed():
    return dist.is_available() and dist.is_initialized()


def _rank():
    return dist.get_rank() if _distributed() else 0


def _barrier():
    if _distributed():
        dist.barrier()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every single-process save/load, even when ``no_dist=True`` asks for exactly
    that; the warning says nothing the caller does not know."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _fsync_dir(path):
    """Makes a rename inside ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state():
    """This process's RNG states as a dict of tensors, ints and tuples (loadable with
    ``torch.load(weights_only=True)``)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if "numpy" in sys.modules:  # only if the run uses numpy; importing it here would cost time
        kind, keys, pos, has_gauss, cached = sys.modules["numpy"].random.get_state()
        state["numpy"] = (kind, keys.tolist(), int(pos), int(has_gauss), float(cached))
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restores what `rng_state` returned. CUDA states are set on as many devices as both the
    saved state and this process have."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def _is_complete(path):
    return os.path.isfile(os.path.join(path, ".metadata")) and os.path.isfile(os.path.join(path, _STATE_FILE))


def _step_dirs(root):
    """[(step, path)] of the complete checkpoints in ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and _is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root):
    """Path of the complete checkpoint with the highest step in ``root`` (``step-<n>`` holding
    DCP metadata and trainer state), or None. ``.tmp-`` directories of interrupted saves are
    ignored."""
    found = _step_dirs(root)
    return found[-1][1] if found else None


def _model_and_optim_state(model, optimizer):
    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def save_checkpoint(root, step, model, optimizer=None, scheduler=None, extra=None, keep_last=3):
    """Writes checkpoint ``<root>/step-<step>`` (see the module docstring); every rank calls it.

    step: int >= 0. optimizer: must have taken at least one step (its state must exist; DCP
        would otherwise create it with a fake step and change the run). scheduler: anything with
        ``state_dict()`` returning JSON-safe values (the LambdaLR of `build_scheduler` does).
    extra: JSON-serialisable dict, returned by `load_checkpoint`; checked before anything is
        written (TypeError naming the problem). Rank 0's is the one saved.
    keep_last: after the new checkpoint is complete, rank 0 deletes all but the ``keep_last``
        highest-step ones (never the new one); None keeps all.
    An existing ``step-<step>`` is replaced only once the new one is complete.
    Returns the checkpoint's path.
    """
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep_last is not None and (not isinstance(keep_last, int) or keep_last < 1):
        raise ValueError(f"keep_last must be a positive int or None, got {keep_last!r}")
    if optimizer is not None and not optimizer.state:
        raise ValueError("optimizer has no state yet; save a checkpoint after the first optimizer.step()")
    trainer_state = {
        "step": step,
        "world_size": dist.get_world_size() if _distributed() else 1,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "extra": extra if extra is not None else {},
    }
    try:
        trainer_json = json.dumps(trainer_state, indent=1)
    except (TypeError, ValueError) as e:
        raise TypeError(f"extra and the scheduler state must be JSON-serialisable: {e}") from None

    root = os.fspath(root)
    final = os.path.join(root, f"step-{step}")
    tmp = os.path.join(root, f".tmp-step-{step}")
    rank = _rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
    _barrier()

    with _quiet_single_process():
        dcp.save(_model_and_optim_state(model, optimizer), checkpoint_id=tmp, no_dist=not _distributed())
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    torch.save(rng_state(), os.path.join(tmp, "rng", f"rank-{rank:05d}.pt"))
    if rank == 0:
        with open(os.path.join(tmp, _STATE_FILE), "w") as f:
            f.write(trainer_json)
            f.flush()
            os.fsync(f.fileno())
    _barrier()  # every rank's shards and RNG file are on disk

    if rank == 0:
        old = os.path.join(root, f".old-step-{step}")
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
        _prune(root, keep_last, keep=final)
    _barrier()  # no rank returns (and maybe reads root) before the rename
    return final


def _prune(root, keep_last, keep):
    """Deletes leftover ``.tmp-``/``.old-`` directories and all but the ``keep_last`` newest
    checkpoints (never ``keep``)."""
    for name in os.listdir(root):
        if name.startswith((".tmp-step-", ".old-step-")):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    if keep_last is None:
        return
    found = _step_dirs(root)
    for _, path in found[: max(0, len(found) - keep_last)]:
        if os.path.abspath(path) != os.path.abspath(keep):
            shutil.rmtree(path, ignore_errors=True)


def read_trainer_state(path):
    """The ``trainer_state.json`` of checkpoint ``path``: {"step", "world_size", "scheduler",
    "extra"}."""
    with open(os.path.join(path, _STATE_FILE)) as f:
        return json.load(f)


def load_checkpoint(path, model, optimizer=None, scheduler=None):
    """Loads checkpoint ``path`` into ``model`` (and ``optimizer``, ``scheduler`` when given, in
    place) and restores this rank's RNG states; every rank calls it. Build the model exactly as
    when saving (same FSDP2 sharding, same parameter groups) before calling. A freshly built
    optimizer is fine: DCP initialises its state before overwriting it.

    Returns the ``extra`` dict given to `save_checkpoint`. Raises FileNotFoundError when ``path``
    is not a complete checkpoint, ValueError when a scheduler is given but none was saved. When
    the world size changed, the RNG file of this rank may be missing: a warning says the run will
    not continue bit-exactly and RNG states are left alone.
    """
    path = os.fspath(path)
    if not _is_complete(path):
        raise FileNotFoundError(f"{path} is not a complete checkpoint (needs .metadata and {_STATE_FILE})")
    trainer_state = read_trainer_state(path)
    if scheduler is not None and trainer_state["scheduler"] is None:
        raise ValueError(f"{path} holds no scheduler state, but a scheduler was given")

    state = _model_and_optim_state(model, optimizer)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=path, no_dist=not _distributed())
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if scheduler is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])

    rng_file = os.path.join(path, "rng", f"rank-{_rank():05d}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        warnings.warn(f"{rng_file} is missing (world size {trainer_state['world_size']} when saved): "
                      "RNG states not restored, the resumed run will not match bit for bit")
    return trainer_state["extra"]


def export_safetensors(model, out_dir, filename="model.safetensors"):
    """Writes the full, unsharded state dict of ``model`` (parameters and persistent buffers, in
    their own dtypes) to ``<out_dir>/<filename>`` with metadata ``{"format": "pt"}``; every rank
    calls it. Under FSDP2 the shards are gathered to rank 0's CPU
    (``get_model_state_dict(full_state_dict=True, cpu_offload=True)``) and only rank 0 writes.
    Tied weights are written under each of their names. Returns the file's path."""
    from safetensors.torch import save_file

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    path = os.path.join(os.fspath(out_dir), filename)
    if _rank() == 0:
        os.makedirs(out_dir, exist_ok=True)
        tensors, seen = {}, set()
        for name, tensor in state.items():
            tensor = tensor.detach().cpu()
            storage = tensor.untyped_storage().data_ptr()
            # safetensors refuses tensors that share memory; copies keep every name loadable.
            shared = storage in seen and tensor.numel() > 0
            tensors[name] = tensor.clone() if shared or not tensor.is_contiguous() else tensor
            seen.add(storage)
        save_file(tensors, path + ".tmp", metadata={"format": "pt"})
        os.replace(path + ".tmp", path)
    _barrier()
    return path
