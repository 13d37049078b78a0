"""The method protocol: :class:`MethodConfig` (frozen dataclasses that validate themselves and round-trip
through JSON) and the registry pairing each config class with the handler that applies it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Type

import torch.nn as nn

__all__ = ["MethodConfig", "register_method", "get_method", "list_methods", "MethodEntry", "Handler"]


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
        data = dict(data)
        method = data.pop("method", None)
        config_cls = get_method(method).config_cls
        known = {f.name for f in dataclasses.fields(config_cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"method {method!r} has no option(s) {unknown}; known: {sorted(known)}")
        return config_cls(**data)

# scope "layer": handler(module, config, *, name, stats=None) -> replacement module
# scope "block": handler(layers, config, *, stats, sources, root, prefix) -> {full_name: replacement}
Handler = Callable[..., nn.Module]
SCOPES = ("layer", "block")


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config_cls: Type[MethodConfig]
    handler: Handler
    scope: str = "layer"


_METHODS: Dict[str, MethodEntry] = {}


def register_method(config_cls: Type[MethodConfig], *, scope: str = "layer") -> Callable[[Handler], Handler]:
    """Decorator registering ``handler`` as the way to apply ``config_cls``.

    ``scope="layer"`` (most methods): the handler is called as ``handler(linear, config, name=module_name)``
    (plus ``stats=LayerStats`` for methods with ``needs_calibration``) and returns the module that
    replaces ``linear``; it must not modify ``linear``.

    ``scope="block"`` (methods that look at several layers at once, e.g. AWQ folding scales into the
    norm that feeds q/k/v): the config must have ``needs_calibration = True``; the handler is called
    once per block as ``handler(layers, config, stats=..., sources=..., root=block, prefix=path)`` with
    ``layers = {full_name: linear}`` (the targeted linears of the block), their ``LayerStats`` and
    :class:`~llmopt.calibration.graph.InputSource` (empty when unknown), and returns
    ``{full_name: replacement}``; it may also replace other modules of the block (a norm with rescaled
    weights), never modify them in place. Duplicate names are rejected.
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "block" and not getattr(config_cls, "needs_calibration", False):
        raise ValueError("block-scope methods run inside the calibration runner: set needs_calibration = True")
    if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig)):
        raise TypeError(f"register_method expects a MethodConfig subclass, got {config_cls!r}")
    name = config_cls.name
    if not name:
        raise ValueError(f"{config_cls.__name__} has no `name`")

    def decorator(handler: Handler) -> Handler:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        _METHODS[name] = MethodEntry(name, config_cls, handler, scope)
        return handler

    return decorator


def unregister_method(name: str) -> None:
    """Remove a method (for tests and plug-in reloads)."""
    _METHODS.pop(name, None)


def get_method(name_or_config) -> MethodEntry:
    """Registry entry for a method name or a config instance."""
    name = name_or_config.name if isinstance(name_or_config, MethodConfig) else name_or_config
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(list_methods())}")
    entry = _METHODS[name]
    if isinstance(name_or_config, MethodConfig) and not isinstance(name_or_config, entry.config_cls):
        raise TypeError(f"config {type(name_or_config).__name__} is not registered under {name!r}")
    return entry


def list_methods() -> List[str]:
    """Names of all registered methods."""
    return sorted(_METHODS)
