"""Which module produced each linear layer's input, found by tensor identity during one forward.

Methods that rescale input channels (AWQ, SmoothQuant) can fold the inverse scale into the layer that
produced the input (a norm) instead of paying for it at run time, but only when that is exact: the
producer's output must be *the very tensor* every consumer reads, and every consumer must be
rescaled. No graph tracing and no per-architecture table: during one forward, hooks on every
submodule record the identity of the tensors each module returns and receives; references are held
for the duration of the pass, so an ``id`` cannot be reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["InputSource", "SourceTracer"]


@dataclass(frozen=True)
class InputSource:
    """Where one linear layer's input came from.

    ``tensor``: an index shared by all layers that read the very same tensor (q/k/v; gate/up).
    ``producer``: name of the innermost module that returned that tensor, or ``None`` when it was made
    by a functional op (``act(gate) * up``, an attention reshape). ``consumers``: every hooked module
    that received the tensor as an argument (containers such as ``self_attn`` included).
    """

    tensor: int
    producer: Optional[str]
    consumers: Tuple[str, ...]


def _tensors(obj: Any) -> List[torch.Tensor]:
    """Tensors directly in ``obj`` (a tensor, or a tuple/list/dict one level deep)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for t in obj if isinstance(t, torch.Tensor)]
    if isinstance(obj, dict):
        return [t for t in obj.values() if isinstance(t, torch.Tensor)]
    return []


class SourceTracer:
    """Hooks on every submodule of ``root`` (names prefixed with ``prefix``) for one forward pass.

    Use: ``tracer = SourceTracer(root, prefix)``, run one forward, ``tracer.remove()``, then
    ``tracer.sources(linear_names)``.
    """

    def __init__(self, root: nn.Module, prefix: str = ""):
        self._keep: List[torch.Tensor] = []  # holds every seen tensor so ids stay unique
        self._producer: Dict[int, str] = {}
        self._consumers: Dict[int, List[str]] = {}
        self._first_input: Dict[str, int] = {}
        self._handles = []
        for name, module in root.named_modules():
            full = ".".join(p for p in (prefix, name) if p)
            self._handles.append(module.register_forward_pre_hook(self._pre(full), with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post(full)))

    def _pre(self, name: str):
        def hook(module, args, kwargs):
            seen = _tensors(args) + _tensors(kwargs)
            for i, t in enumerate(seen):
                self._keep.append(t)
                users = self._consumers.setdefault(id(t), [])
                if name not in users:
                    users.append(name)
                if i == 0 and name not in self._first_input:
                    self._first_input[name] = id(t)
            return None
        return hook

    def _post(self, name: str):
        def hook(module, args, output):
            for t in _tensors(output)[:1]:
                self._keep.append(t)
                # Inner modules finish first: the innermost producer of a tensor is kept.
                self._producer.setdefault(id(t), name)
            return None
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def sources(self, names) -> Dict[str, InputSource]:
        """``{name: InputSource}`` for the given (linear) module names that ran during the pass."""
        index: Dict[int, int] = {}
        out = {}
        for name in names:
            key = self._first_input.get(name)
            if key is None:
                continue
            out[name] = InputSource(
                tensor=index.setdefault(key, len(index)),
                producer=self._producer.get(key),
                consumers=tuple(self._consumers.get(key, ())),
            )
        return out

    def clear(self) -> None:
        """Drop the held tensors (call once :meth:`sources` has been read)."""
        self._keep.clear()
        self._producer.clear()
        self._consumers.clear()
        self._first_input.clear()
