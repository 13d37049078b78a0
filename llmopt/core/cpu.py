"""Facts about the CPU this process runs on: its model name and instruction-set flags.

Read once (``/proc/cpuinfo`` on Linux, :func:`platform.processor` elsewhere) and cached. Used by
``kernel="auto"`` (a kernel may declare CPU flags it needs to be fast, see
:attr:`llmopt.kernels.Kernel.cpu_flags`) and by every benchmark, which records the model name.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass
from typing import FrozenSet, Optional

import torch

__all__ = ["CPUInfo", "cpu_info", "cpu_model"]


@dataclass(frozen=True)
class CPUInfo:
    """``model``: the marketing name (``"AMD EPYC 9654 96-Core Processor"``); ``flags``: the
    instruction-set flags as Linux names them (``avx512_vnni``, ``avx512_bf16``, ``amx_int8``, ...;
    empty where unknown); ``capability``: ``torch.backends.cpu.get_cpu_capability()`` (``"AVX512"``);
    ``machine``: ``platform.machine()``."""

    model: str
    flags: FrozenSet[str]
    capability: str
    machine: str

    def has(self, flag: str) -> bool:
        return flag in self.flags

    def describe(self) -> str:
        """One line for logs and benchmark headers: model, torch capability, the int8/bf16 flags."""
        notable = [f for f in ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
                   if f in self.flags]
        return f"{self.model} ({self.machine}, {self.capability}{', ' if notable else ''}{' '.join(notable)})"


def _read_cpuinfo(path: str = "/proc/cpuinfo") -> "tuple[Optional[str], FrozenSet[str]]":
    model: Optional[str] = None
    flags: FrozenSet[str] = frozenset()
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip() or None
                elif key in ("flags", "Features") and not flags:  # Features: Linux on ARM
                    flags = frozenset(value.split())
                if model is not None and flags:
                    break
    except OSError:
        pass
    return model, flags


@functools.lru_cache(maxsize=None)
def cpu_info() -> CPUInfo:
    """This machine's :class:`CPUInfo`, read once per process."""
    model, flags = _read_cpuinfo()
    if not model:
        model = platform.processor() or platform.machine() or "unknown"
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - very old torch
        capability = "unknown"
    return CPUInfo(model=model, flags=flags, capability=capability, machine=platform.machine())


def cpu_model() -> str:
    """The CPU model name (``"AMD EPYC"``, ``"Intel(R) Xeon(R) Platinum 8480+"``, ...)."""
    return cpu_info().model
