"""Registry of compression methods: a config class paired with the handler that applies it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Type

import torch.nn as nn

from .config import MethodConfig

__all__ = ["register_method", "get_method", "list_methods", "MethodEntry", "Handler"]

# handler(module, config, *, name) -> replacement module
Handler = Callable[..., nn.Module]


@dataclass(frozen=True)
class MethodEntry:
    name: str
    config_cls: Type[MethodConfig]
    handler: Handler


_METHODS: Dict[str, MethodEntry] = {}


def register_method(config_cls: Type[MethodConfig]) -> Callable[[Handler], Handler]:
    """Decorator registering ``handler`` as the way to apply ``config_cls``.

    The handler is called as ``handler(linear, config, name=module_name)`` and returns the module
    that replaces ``linear``; it must not modify ``linear``. Duplicate names are rejected.
    """
    if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig)):
        raise TypeError(f"register_method expects a MethodConfig subclass, got {config_cls!r}")
    name = config_cls.name
    if not name:
        raise ValueError(f"{config_cls.__name__} has no `name`")

    def decorator(handler: Handler) -> Handler:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        _METHODS[name] = MethodEntry(name, config_cls, handler)
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
