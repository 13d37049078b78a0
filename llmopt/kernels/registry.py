"""The kernel registry and the one place ``kernel="auto"`` is decided.

Kernels register themselves when their module is imported (``register_kernel``). ``"auto"`` tries
every kernel that has a priority, highest first (equal priorities: the earlier registered first),
takes the first that can serve the layer on its device and passes :func:`_fast_enough`, and
otherwise falls back to ``reference``, logging why once. Passing :func:`_fast_enough` means the CPU
has the flags the kernel declares and a one-time probe found it not slower than dense here
(:mod:`.speed`). The built-in order (priorities in their
files) is ``int8_onednn_cpu`` (40) > ``int8_dynamic_cpu`` (30) > ``lowbit_cpu`` (25) >
``int8pack_cpu`` (20) > ``int4pack_cpu`` (10); a kernel registered without a priority gets 0, after them.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Type, TypeVar, Union, overload

import torch

from .speed import KernelDecision, cached_decision, decide
from .base import Kernel, KernelSpec, is_cpu, log_once

__all__ = ["register_kernel", "unregister_kernel", "get_kernel", "list_kernels", "auto_order",
           "select_kernel", "REFERENCE", "AUTO"]

# The kernel every layer can fall back on: pure torch, any device, any format.
REFERENCE = "reference"
# The request that lets the registry choose.
AUTO = "auto"

_KERNELS: Dict[str, Kernel] = {}
_PRIORITIES: Dict[str, Optional[int]] = {}

K = TypeVar("K", bound=Union[Kernel, Type[Kernel]])


@overload
def register_kernel(kernel: K, *, priority: Optional[int] = 0, replace: bool = False) -> K: ...


@overload
def register_kernel(kernel: None = None, *, priority: Optional[int] = 0,
                    replace: bool = False) -> Callable[[K], K]: ...


def register_kernel(kernel=None, *, priority: Optional[int] = 0, replace: bool = False):
    """Make a kernel available by its ``name`` to ``QuantLinear(kernel=...)`` and to ``"auto"``.

    ``kernel`` is a :class:`Kernel` instance or a subclass (instantiated without arguments); the
    function returns it unchanged, so it also works as a class decorator, bare or called:
    ``@register_kernel`` or ``@register_kernel(priority=50)``.

    ``priority``: ``"auto"`` tries higher priorities first (built-ins use 10-40, see the module
    docstring); ``None`` means the kernel is only used when asked for by name. A name that is
    already registered is an error unless ``replace=True``.
    """
    def add(obj: K) -> K:
        instance = obj() if isinstance(obj, type) and issubclass(obj, Kernel) else obj
        if not isinstance(instance, Kernel):
            raise TypeError(f"register_kernel needs a Kernel subclass or instance, got {obj!r}")
        name = instance.name
        if not isinstance(name, str) or not name or name == AUTO:
            raise ValueError(f"{type(instance).__name__}.name must be a non-empty string other than "
                             f"{AUTO!r}, got {name!r}")
        if priority is not None and (not isinstance(priority, int) or isinstance(priority, bool)):
            raise TypeError(f"register_kernel: priority must be an integer or None, got {priority!r}")
        if name == REFERENCE and priority is not None:
            raise ValueError(f"{REFERENCE!r} is the fallback of {AUTO!r}, tried after every other kernel: "
                             "register it with priority=None")
        if name in _KERNELS and not replace:
            raise ValueError(f"a kernel named {name!r} is already registered ({_KERNELS[name]!r}); "
                             "pass replace=True to replace it, or choose another name")
        _KERNELS[name] = instance
        _PRIORITIES[name] = priority
        return obj

    if kernel is None:
        return add
    return add(kernel)


def unregister_kernel(name: str) -> None:
    """Remove a registered kernel (for tests and plug-in reloads). Layers already using it keep it."""
    if name == REFERENCE:
        raise ValueError(f"the {REFERENCE!r} kernel is every layer's fallback and cannot be unregistered")
    if name not in _KERNELS:
        raise ValueError(f"no kernel named {name!r} is registered; registered: {', '.join(_KERNELS)}")
    del _KERNELS[name]
    del _PRIORITIES[name]


def list_kernels() -> List[str]:
    """Names of the registered kernels, in registration order."""
    return list(_KERNELS)


def get_kernel(name: str) -> Kernel:
    """The registered kernel called ``name``."""
    if not isinstance(name, str) or name not in _KERNELS:
        raise ValueError(f"unknown kernel {name!r}; available: {', '.join(_KERNELS)} (or {AUTO!r})")
    return _KERNELS[name]


def auto_order() -> List[str]:
    """Names ``"auto"`` tries, in order (``reference``, the fallback, is not listed)."""
    ranked = [(name, p) for name, p in _PRIORITIES.items() if p is not None]
    # sorted() is stable: equal priorities keep registration order.
    return [name for name, _ in sorted(ranked, key=lambda item: -item[1])]


def _fast_enough(kernel: Kernel, spec: KernelSpec, device: torch.device) -> bool:
    """Whether ``"auto"`` may pick ``kernel`` for ``spec`` on ``device`` once it is known to serve it.

    The single place every ``"auto"`` choice goes through (issue 13): ``"auto"`` must never pick a
    kernel that is slower than a dense matmul on the running CPU. The decision comes from the CPU's
    flags (:attr:`Kernel.cpu_flags`) plus a one-time, time-bounded micro-probe of the kernel against
    dense at the spec's shape class, cached per process (see :mod:`llmopt.kernels.speed`;
    :func:`llmopt.kernels.kernel_decisions` lists the decisions). A kernel named explicitly is never
    subject to this rule.
    """
    return _speed_decision(kernel, spec, device).fast


def _speed_decision(kernel: Kernel, spec: KernelSpec, device: torch.device) -> KernelDecision:
    return decide(kernel, spec, device, _KERNELS[REFERENCE])


def select_kernel(spec: KernelSpec, requested: str, device: Union[str, torch.device]) -> Kernel:
    """Resolve ``requested`` (``"auto"`` or a kernel name) for ``spec`` on ``device``.

    An explicitly requested kernel that cannot serve the spec is an error that says why; ``"auto"``
    falls back to the reference kernel and logs why once (on CPU and CUDA, where a fast path could
    have existed).
    """
    device = torch.device(device)
    if requested != AUTO:
        kernel = get_kernel(requested)
        reason = kernel.unsupported_reason(spec, device)
        if reason is not None:
            raise ValueError(f"kernel {requested!r} cannot serve this layer: {reason}")
        return kernel
    reasons = []
    for name in auto_order():
        kernel = _KERNELS[name]
        if kernel.auto_device_types is not None and device.type not in kernel.auto_device_types:
            continue  # not a candidate here at all (e.g. a GPU kernel that tests run on CPU tensors)
        reason = kernel.unsupported_reason(spec, device)
        if reason is None and not _fast_enough(kernel, spec, device):
            known = cached_decision(kernel, spec, device)
            reason = known.reason if known is not None and not known.fast else "slower than a dense matmul here"
        if reason is None:
            return kernel
        reasons.append(f"{name}: {reason}")
    if is_cpu(device) or device.type == "cuda":
        log_once(
            f"llmopt: no fast kernel for format={spec.format.name!r} group_size={spec.group_size} on "
            f"{device.type}; using the reference kernel (dequantize + matmul). "
            f"Reasons: {'; '.join(reasons)}"
        )
    return _KERNELS[REFERENCE]
