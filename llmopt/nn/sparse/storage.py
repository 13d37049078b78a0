"""Module plumbing for a layer whose stored form is a dict of validated tensors of data-dependent shape.

A :class:`~llmopt.nn.sparse_linear.SparseLinear`'s stored tensors are not fixed-shape parameters: the
length of a bitmask layer's values depends on its mask, so the empty layer ``from_config`` builds cannot
know it. :class:`StoredTensorsLinear` does the ``nn.Module`` side once, whatever the tensors mean:

* the tensors are buffers under their stored names (``buffer_names`` renames one where an attribute of
  that name is taken), and every set of them goes through the subclass's ``_validate``;
* ``state_dict`` / ``load_state_dict`` see exactly the stored tensors and the bias; a load takes the
  file's shapes, checked, and copies into a materialised layer (or assigns into a meta skeleton);
* ``.to()`` moves every tensor, and a float dtype cast converts only those the subclass says follow it
  (float values, like a dense Linear's weight; codes, masks and quantization scales keep their dtype);
* ``deepcopy`` skips derived objects that cannot be copied (``opaque_attrs``) and rebuilds them.

The subclass says what the tensors are (``_spec_names``, ``_validate``) and derives its runtime form from
them (``_rebuild_runtime``, ``_drop_runtime``).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ...core.measure import tensor_bytes
from ..base import CompressedLinear

__all__ = ["StoredTensorsLinear", "check_bias"]


def check_bias(bias: Optional[Tensor], out_features: int, where: str) -> None:
    """``bias`` is ``None`` or a finite float tensor ``[out_features]`` (raises ValueError)."""
    if bias is None:
        return
    if not isinstance(bias, Tensor) or tuple(bias.shape) != (out_features,):
        shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"{where}: bias has shape {shape}, expected ({out_features},)")
    if not bias.is_floating_point() or not bool(torch.isfinite(bias).all()):
        raise ValueError(f"{where}: bias must be a finite float tensor")


class StoredTensorsLinear(CompressedLinear, register=False):
    """Base of a layer holding ``bias`` plus a validated dict of stored tensors (see module docs)."""

    # Stored name -> buffer name, where the stored name is taken by an attribute (e.g. a method).
    buffer_names: ClassVar[Dict[str, str]] = {}
    # Derived objects in __dict__ that deepcopy cannot copy; rebuilt on the copy.
    opaque_attrs: ClassVar[Tuple[str, ...]] = ()

    weight_dtype: torch.dtype
    bias: Optional[nn.Parameter]
    _canonical_names: Tuple[str, ...] = ()

    # ------------------------------------------------------------------ what the subclass provides
    def _spec_names(self) -> List[str]:
        """Names of the stored tensors, in state-dict order."""
        raise NotImplementedError

    def _validate(self, canonical: Dict[str, Tensor]) -> Optional[int]:
        """Check a full set of stored tensors (raises ValueError); returns the count cached as ``_nnz``
        (``None`` for meta tensors)."""
        raise NotImplementedError

    def _normalize(self, canonical: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """``canonical`` converted to the stored dtypes where a conversion is lossless by design."""
        return canonical

    def _rebuild_runtime(self) -> None:
        """Derive the runtime form from the stored tensors (called after every install and move)."""

    def _drop_runtime(self) -> None:
        """Forget the runtime form."""

    def _follows_cast(self, name: str) -> bool:
        """Whether stored tensor ``name`` takes a float dtype cast of the layer."""
        return False

    def _after_cast(self, dtype: torch.dtype, canonical: Dict[str, Tensor]) -> None:
        """The layer was cast to float ``dtype`` (``canonical``: the stored tensors after it)."""
        self.weight_dtype = dtype

    # ------------------------------------------------------------------ stored tensors
    def _buffer_name(self, name: str) -> str:
        return self.buffer_names.get(name, name)

    def canonical_state(self) -> Dict[str, Tensor]:
        """The stored tensors, by stored name."""
        return {name: self._buffers[self._buffer_name(name)] for name in self._canonical_names}

    @property
    def device(self) -> torch.device:
        return self._buffers[self._buffer_name(self._canonical_names[0])].device

    def _install(self, canonical: Dict[str, Tensor], build: bool = True) -> None:
        """Validate and take ``canonical`` as this layer's stored tensors, then rebuild the runtime form."""
        canonical = self._normalize(canonical)
        # A Python int, so that a compiled forward (which unpacks exactly this many codes) has no
        # data-dependent shape.
        self.__dict__["_nnz"] = self._validate(canonical)
        for name in self._canonical_names:
            del self._buffers[self._buffer_name(name)]
        for name, tensor in canonical.items():
            self.register_buffer(self._buffer_name(name), tensor)
        self._canonical_names = tuple(canonical)
        if build:
            self._rebuild_runtime()

    def _set_bias(self, bias: Optional[Tensor]) -> None:
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().to(self.weight_dtype).clone(), requires_grad=False)

    def stored_bytes(self) -> int:
        """Bytes ``llmopt.save`` writes: the stored tensors plus the bias."""
        return tensor_bytes(*self.canonical_state().values(), self.bias)

    # ------------------------------------------------------------------ state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for name, tensor in self.canonical_state().items():
            destination[prefix + name] = tensor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        names = self._spec_names()
        canonical = {name: state_dict[prefix + name].detach()
                     for name in names if prefix + name in state_dict}
        missing_keys.extend(prefix + name for name in names if name not in canonical)
        known = set(names) | {"bias"}
        unexpected_keys.extend(key for key in state_dict if key.startswith(prefix)
                               and "." not in key[len(prefix):] and key[len(prefix):] not in known)
        new_bias = self._bias_from(state_dict, prefix, missing_keys, error_msgs)
        assign = local_metadata.get("assign_to_params_buffers", False)
        if len(canonical) == len(names):
            if not assign and self.device.type != "meta":
                # Plain load_state_dict copies to the layer's device, never aliasing the caller's tensors.
                canonical = {k: v.to(self.device, copy=True) for k, v in canonical.items()}
            try:
                self._install(canonical)
            except (ValueError, TypeError) as exc:
                error_msgs.append(f"{prefix.rstrip('.') or type(self).__name__}: {exc}")
                return
        if new_bias is None:
            return
        if assign or self.bias.device.type == "meta":
            self.bias = nn.Parameter(new_bias.detach().clone().to(self.weight_dtype), requires_grad=False)
        else:
            with torch.no_grad():
                self.bias.copy_(new_bias)

    def _bias_from(self, state_dict: Dict[str, Tensor], prefix: str, missing_keys: List[str],
                   error_msgs: List[str]) -> Optional[Tensor]:
        """The bias in ``state_dict`` if this layer has one and its shape is right (else noted)."""
        if self.bias is None:
            return None
        key = prefix + "bias"
        if key not in state_dict:
            missing_keys.append(key)
            return None
        value = state_dict[key]
        if tuple(value.shape) != (self.out_features,):
            error_msgs.append(f"{key}: shape {tuple(value.shape)}, expected ({self.out_features},)")
            return None
        return value

    # ------------------------------------------------------------------ copies, moves, casts
    def __deepcopy__(self, memo: Dict[int, Any]) -> "StoredTensorsLinear":
        opaque = {name: self.__dict__.pop(name) for name in self.opaque_attrs if name in self.__dict__}
        try:
            new = self.__class__.__new__(self.__class__)
            memo[id(self)] = new
            for key, value in self.__dict__.items():
                new.__dict__[key] = copy.deepcopy(value, memo)
        finally:
            self.__dict__.update(opaque)
        if opaque:
            new._rebuild_runtime()
        return new

    def _apply(self, fn, recurse=True):
        probe = fn(torch.zeros((), dtype=self.weight_dtype, device=self.device))
        cast = probe.is_floating_point() and probe.dtype != self.weight_dtype
        canonical = {name: self._buffers.pop(self._buffer_name(name)) for name in self._canonical_names}
        self._drop_runtime()
        try:
            super()._apply(fn, recurse)  # the bias
        finally:
            canonical = {name: fn(t) if cast and self._follows_cast(name) else t.to(probe.device)
                         for name, t in canonical.items()}
            self._buffers.update({self._buffer_name(name): t for name, t in canonical.items()})
        if cast:
            self._after_cast(probe.dtype, canonical)
        self._rebuild_runtime()
        return self
