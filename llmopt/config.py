"""Method configurations: frozen dataclasses that validate themselves and round-trip through JSON."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Dict, List

__all__ = ["MethodConfig"]


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method config.

    Subclasses are frozen dataclasses that set ``name`` (the registry key) and
    ``needs_calibration``, and validate their fields in ``__post_init__``.
    """

    name: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False

    def to_dict(self) -> Dict[str, Any]:
        """``{"method": name, **fields}``, JSON-serialisable."""
        return {"method": self.name, **dataclasses.asdict(self)}

    @classmethod
    def examples(cls) -> List["MethodConfig"]:
        """A few representative configs; the contract test suite runs every registered method on them."""
        return [cls()]

    @classmethod
    def benchmark_configs(cls) -> List["MethodConfig"]:
        """Configs the model benchmark suite runs for this method (``benchmarks/bench_models.py``).

        A new method adds itself to the suite by returning its representative settings here.
        """
        return []

    def label(self) -> str:
        """Short human-readable name for reports, e.g. ``"rtn int4 g64"``."""
        fields = ", ".join(f"{k}={v}" for k, v in self.to_dict().items() if k != "method")
        return f"{self.name}({fields})"

    @staticmethod
    def from_dict(data: Dict[str, Any]) -> "MethodConfig":
        """Rebuild a config from :meth:`to_dict` output (looks the method up in the registry)."""
        from .registry import get_method

        data = dict(data)
        method = data.pop("method", None)
        config_cls = get_method(method).config_cls
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"method {method!r} has no option(s) {unknown}; known: {sorted(known)}")
        return config_cls(**data)
