"""Lazy loader of the compiled extension `moe_runtime._C`.

The extension is imported on first use, never when `moe_runtime` or `moe_runtime.ops` is
imported. Loading it registers the C++ ops under `torch.ops.moe_runtime` and their fake
(shape-only) kernels; it never initializes CUDA.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch  # loads libtorch, which the extension links against

__all__ = ["BUILD_HINT", "extension_available", "load_extension"]

BUILD_HINT = (
    "build it from the repository root with `pip install --no-build-isolation -e .` "
    "(or `python setup.py build_ext --inplace`), against the installed torch " + torch.__version__
)

_extension: ModuleType | None = None


def load_extension() -> ModuleType:
    """Imports `moe_runtime._C` once and registers the fake kernels of its ops.

    Returns:
        The extension module.

    Raises:
        RuntimeError: The extension is not built or does not load; the message says how to build it.
    """
    global _extension
    if _extension is None:
        try:
            module = importlib.import_module("moe_runtime._C")
        except ImportError as exc:
            raise RuntimeError(
                f"the compiled extension moe_runtime._C is unavailable ({exc}); {BUILD_HINT}"
            ) from exc
        importlib.import_module("moe_runtime.ops._fake")
        _extension = module
    return _extension


def extension_available() -> bool:
    """Whether `moe_runtime._C` is built and loads (loading it if so)."""
    try:
        load_extension()
    except RuntimeError:
        return False
    return True
