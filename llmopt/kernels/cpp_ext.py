"""Build llmopt's C++ kernels at first use, with a clean fallback when that cannot happen.

The sources live in ``llmopt/kernels/csrc``. :func:`load_extension` compiles one with
``torch.utils.cpp_extension.load`` (g++ and ninja) into PyTorch's extension cache
(``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``): about a minute the first time on
2 cores, then a cached load in milliseconds; a changed source is rebuilt. The extension registers its
operators with ``torch.ops`` (so ``torch.compile`` sees them); nothing is imported as a Python module.

Any failure (no compiler, no ninja, a compile error, ``LLMOPT_CPP_EXT=0``) is logged once and
remembered: :func:`load_extension` then returns ``False`` and :func:`extension_error` says why, and
the kernels built on it report that reason from ``unsupported_reason``, so ``kernel="auto"`` goes on
to PyTorch's own kernels.
"""

from __future__ import annotations

import os
import shutil
import threading
from typing import Dict, Optional

from .base import log_once

__all__ = ["load_extension", "extension_error", "extensions_enabled", "CSRC"]

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
_ENV = "LLMOPT_CPP_EXT"

_LOADED: Dict[str, bool] = {}
_ERRORS: Dict[str, str] = {}
_LOCK = threading.Lock()


def _source_dir() -> str:
    return CSRC


def extensions_enabled() -> bool:
    """False when ``LLMOPT_CPP_EXT`` is ``0``/``off``/``false``/``no`` (read at every first load)."""
    return os.environ.get(_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def extension_error(name: str) -> Optional[str]:
    """Why extension ``name`` is not available (``None`` if it loaded or was never tried)."""
    return _ERRORS.get(name)


def _compiler_missing() -> Optional[str]:
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH)"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed (pip install ninja), needed to build the C++ kernels"
    return None


def _first_error(error: Exception) -> str:
    """The compiler's first ``error:`` line from a failed build (ninja's own last line says nothing)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "error:" in line:
            return line
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def load_extension(name: str, source: str) -> bool:
    """Compile (first time) and load ``csrc/<source>`` as extension ``name``; True if its ops are usable.

    Thread-safe, and at most one build attempt per process: a failure is cached with its reason.
    """
    if name in _LOADED:
        return _LOADED[name]
    with _LOCK:
        if name in _LOADED:
            return _LOADED[name]
        reason = None
        if not extensions_enabled():
            reason = f"C++ kernels disabled ({_ENV}=0)"
        else:
            reason = _compiler_missing()
        if reason is None:
            try:
                from torch.utils import cpp_extension

                cpp_extension.load(
                    name=name,
                    sources=[os.path.join(_source_dir(), source)],
                    extra_cflags=["-O3", "-fopenmp", "-std=c++17"],
                    extra_ldflags=["-fopenmp"],
                    is_python_module=False,
                    verbose=False,
                )
            except Exception as error:  # a build failure must not break the library: fall back
                reason = f"building the C++ extension {name!r} failed: {_first_error(error)}"
        _LOADED[name] = reason is None
        if reason is not None:
            _ERRORS[name] = reason
            log_once(f"llmopt: {reason}; falling back to PyTorch's kernels")
        return _LOADED[name]
