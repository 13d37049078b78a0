"""Input checks shared by every layer: dtypes, weights a method can compress, layer inputs, N:M patterns.

Each raises a clear ``ValueError``/``TypeError`` naming the problem; callers add the layer's name.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["parse_dtype", "dtype_name", "check_linear_weight", "check_linear_input", "check_nm", "FLOAT_DTYPES",
           "MAX_NM_M", "NM", "check_fields", "check_choice", "check_flag", "check_int", "check_number"]

MAX_NM_M = 256
NM = Tuple[int, int]
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}


def parse_dtype(dtype: Union[str, torch.dtype]) -> torch.dtype:
    """``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16`` (float dtypes only)."""
    if isinstance(dtype, torch.dtype):
        if dtype in FLOAT_DTYPES:
            return dtype
    elif isinstance(dtype, str) and dtype.replace("torch.", "") in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype.replace("torch.", "")]
    raise ValueError(f"unsupported dtype {dtype!r}; expected one of {sorted(_DTYPE_NAMES)}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_linear_weight(weight: Tensor) -> None:
    """Raise a clear error for weights that cannot be quantized (meta, non-float, non-finite)."""
    if weight.device.type == "meta":
        raise ValueError("weight is on the meta device (no data to quantize); materialize the model first")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"unsupported weight dtype {weight.dtype}; expected a floating dtype")
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError("weight is empty")
    # A single float32 sum is non-finite whenever any element is NaN/Inf (and ~40x cheaper than
    # isfinite over the whole tensor); only then count exactly (a huge-but-finite sum is re-checked).
    if not torch.isfinite(weight.sum(dtype=torch.float32)) and not torch.isfinite(weight).all():
        bad = (~torch.isfinite(weight)).sum().item()
        raise ValueError(f"weight has {bad} NaN/Inf values")


def check_linear_input(x: Tensor, in_features: int, layer_type: str) -> None:
    """Clear errors for inputs a linear layer cannot multiply (integer dtype, wrong last dimension)."""
    if not x.is_floating_point():
        raise TypeError(f"{layer_type} expects floating-point inputs, got {x.dtype}")
    if x.shape[-1] != in_features:
        raise ValueError(f"{layer_type} expects inputs with {in_features} features, got shape {tuple(x.shape)}")


def check_nm(nm: object) -> NM:
    """Validate an N:M pattern: ``0 < N < M <= 256``; accepts ``(N, M)``, ``[N, M]`` or ``"N:M"``.

    The one limit is storage: a kept weight's position inside its group of ``M`` is stored in one byte.
    """
    if isinstance(nm, str):
        match = _NM_RE.match(nm)
        if not match:
            raise ValueError(f"N:M pattern must look like '2:4', got {nm!r}")
        nm = (int(match.group(1)), int(match.group(2)))
    if not (isinstance(nm, (tuple, list)) and len(nm) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in nm)):
        raise ValueError(f"N:M pattern must be a pair of integers (N, M), got {nm!r}")
    n, m = int(nm[0]), int(nm[1])
    if not 0 < n < m:
        raise ValueError(f"N:M pattern {n}:{m} is invalid: need 0 < N < M (N kept out of every M weights)")
    if m > MAX_NM_M:
        raise ValueError(f"N:M pattern {n}:{m}: M must be <= {MAX_NM_M}")
    return n, m


# ----------------------------------------------------------------------------------------------
# Option values of method configs: one message per kind of mistake, naming the option.


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``, else ``"name must be 'a' or 'b', got ..."``."""
    if not any(value == choice and type(value) is type(choice) for choice in choices):
        if len(choices) == 2:
            allowed = f"{choices[0]!r} or {choices[1]!r}"
        else:
            allowed = f"one of {tuple(choices)}"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def check_flag(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False`` (not ``1``, ``"yes"``, ...)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` if it is an integer (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_number(name: str, value: Any, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> float:
    """``value`` if it is a real number (not a bool, not NaN) in the interval ``[low, high]``, each end
    excluded with ``low_open`` / ``high_open``; the message shows the interval, e.g. ``(0, 1)``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return value


def check_fields(cls: type, names: Iterable[str], what: str, noun: str = "option(s)") -> None:
    """``ValueError`` naming the ``names`` dataclass ``cls`` has no field for (``"<what> has no option(s)
    [...]; known: [...]"``): a misspelt key in a stored dict must not be dropped silently."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(names) - known))
    if unknown:
        raise ValueError(f"{what} has no {noun} {unknown}; known: {sorted(known)}")
