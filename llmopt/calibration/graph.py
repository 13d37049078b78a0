"""Which module produced each linear layer's input, found by tensor identity during one forward.

Methods that rescale input channels (AWQ, SmoothQuant) can fold the inverse scale into the layer that
produced the input (a norm) instead of paying for it at run time, but only when that is exact: the
producer's output must be *the very tensor* every consumer reads, and every consumer must be
rescaled. No graph tracing and no per-architecture table: during one forward, hooks on every
submodule record the identity of the tensors each module returns and receives; references are held
for the duration of the pass, so an ``id`` cannot be reused.

Tensors can also be read by plain torch operations outside any module (a residual ``x + h`` on a
norm's output); a :class:`~torch.overrides.TorchFunctionMode` active during the traced pass records,
for every module output, which module's own code ran a (non-metadata) operation on it. A norm that
runs more than once in the pass (two outputs) is reported too. Folding needs both to be clean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

__all__ = ["InputSource", "SourceTracer"]


@dataclass(frozen=True)
class InputSource:
    """Where one linear layer's input came from.

    ``tensor``: an index shared by all layers that read the very same tensor (q/k/v; gate/up).
    ``producer``: name of the innermost module that returned that tensor, or ``None`` when it was made
    by a functional op (``act(gate) * up``, an attention reshape). ``consumers``: every hooked module
    that received the tensor as an argument (containers such as ``self_attn`` included).
    ``op_users``: modules whose own code (not a submodule's) ran a torch operation on the tensor
    (``""`` for code outside every hooked module); metadata reads (``.shape``, ``.dtype``) do not count.
    ``producer_calls``: how many times the producer ran during the pass.
    """

    tensor: int
    producer: Optional[str]
    consumers: Tuple[str, ...]
    op_users: Tuple[str, ...] = ()
    producer_calls: int = 1


# Tensor methods and properties that only read metadata: they do not use the values.
_METADATA = {"size", "dim", "numel", "is_floating_point", "is_contiguous", "stride", "data_ptr",
             "element_size", "nelement", "ndimension", "get_device", "is_complex", "storage_offset"}
_VALUE_PROPERTIES = {"T", "mT", "H", "mH", "data", "real", "imag"}


def _is_metadata(func: Any) -> bool:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a Tensor property: .shape, .dtype, .device ... (but .T is a view)
        owner = getattr(func, "__self__", None)
        return getattr(owner, "__name__", "") not in _VALUE_PROPERTIES
    return name in _METADATA


class _OpRecorder(TorchFunctionMode):
    """Records, for watched tensors, which module's own code ran an operation on them."""

    def __init__(self, tracer: "SourceTracer"):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tracer = self.tracer
        if tracer._producer and not _is_metadata(func):
            user = tracer._stack[-1] if tracer._stack else ""
            for t in _tensors(args) + _tensors(kwargs) + [x for a in args if isinstance(a, (list, tuple))
                                                          for x in _tensors(a)]:
                key = id(t)
                if key in tracer._producer:
                    tracer._op_users.setdefault(key, set()).add(user)
        return func(*args, **kwargs)


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

    Use: ``with SourceTracer(root, prefix) as tracer:`` run one forward, then
    ``tracer.sources(linear_names)`` and ``tracer.clear()``. (Without ``with``, only module-level
    information is recorded and ``op_users`` stays empty; call ``remove()`` afterwards.)
    """

    def __init__(self, root: nn.Module, prefix: str = ""):
        self._keep: List[torch.Tensor] = []  # holds every seen tensor so ids stay unique
        self._producer: Dict[int, str] = {}
        self._consumers: Dict[int, List[str]] = {}
        self._first_input: Dict[str, int] = {}
        self._op_users: Dict[int, Set[str]] = {}
        self._calls: Dict[str, int] = {}
        self._stack: List[str] = []
        self._mode: Optional[_OpRecorder] = None
        self._handles = []
        for name, module in root.named_modules():
            full = ".".join(p for p in (prefix, name) if p)
            # prepend: the module is on the stack before other pre-hooks (statistics) read its input.
            self._handles.append(module.register_forward_pre_hook(self._pre(full), with_kwargs=True,
                                                                  prepend=True))
            self._handles.append(module.register_forward_hook(self._post(full)))

    def __enter__(self) -> "SourceTracer":
        """Also record plain torch operations on module outputs while inside the ``with``."""
        self._mode = _OpRecorder(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        self.remove()

    def _pre(self, name: str):
        def hook(module, args, kwargs):
            self._stack.append(name)
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
            if self._stack and self._stack[-1] == name:
                self._stack.pop()
            self._calls[name] = self._calls.get(name, 0) + 1
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
            producer = self._producer.get(key)
            out[name] = InputSource(
                tensor=index.setdefault(key, len(index)),
                producer=producer,
                consumers=tuple(self._consumers.get(key, ())),
                op_users=tuple(sorted(self._op_users.get(key, ()))),
                producer_calls=self._calls.get(producer, 0) if producer is not None else 0,
            )
        return out

    def clear(self) -> None:
        """Drop the held tensors (call once :meth:`sources` has been read)."""
        self._keep.clear()
        self._producer.clear()
        self._consumers.clear()
        self._first_input.clear()
        self._op_users.clear()
        self._calls.clear()
