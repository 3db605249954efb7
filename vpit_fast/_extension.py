"""Loads the compiled extension vpit_fast._C once, with an actionable error when it is missing."""

import importlib

import torch  # noqa: F401  (loads libc10 and libtorch, which vpit_fast._C links against)

_C = None
_import_error = None
try:
    _C = importlib.import_module("vpit_fast._C")  # also registers the torch.library ops
except ImportError as error:  # kept: impl="torch" still works without a build
    _import_error = error


def extension():
    """The compiled module, or a RuntimeError that says how to build it."""
    if _C is None:
        raise RuntimeError(
            "vpit_fast's compiled kernels are not built or failed to load "
            f"({_import_error}). Build them with `pip install -e . --no-build-isolation` "
            'in the repository, or pass impl="torch" to use the pure-PyTorch reference.'
        )
    return _C


def build_info():
    """A dict: version, cuda (bool), cuda_archs, torch_version the extension was compiled with."""
    return dict(extension().build_info())
