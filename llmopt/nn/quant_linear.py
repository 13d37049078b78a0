"""``QuantLinear``: a drop-in replacement for ``nn.Linear`` holding packed quantized weights."""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..core.checks import check_linear_input, check_linear_weight, dtype_name, parse_dtype
from ..core.formats import WeightFormat, get_format
from ..core.measure import tensor_bytes
from ..core.packing import pack_codes, packed_row_bytes
from ..core.primitives import (
    ACT_BITS,
    check_quantized,
    fake_quantize_activations,
    num_groups,
    quantize_weight,
    resolve_group_size,
)
from ..core.scheme import WeightQuant
from ..kernels import Kernel, KernelSpec, select_kernel
from .base import CompressedLinear

__all__ = ["QuantLinear"]

_CANONICAL_KEYS = ("qdata", "scale", "zero_point")


class _FastKernelMatmul(torch.autograd.Function):
    """Fast kernel forward with an input gradient (PyTorch's int4/int8 ops have no derivative).

    The weight is frozen, so only ``x`` gets a gradient: ``grad_x = grad_y @ W`` with the
    dequantized weight, materialised only during the backward pass.
    """

    @staticmethod
    def forward(ctx, x: Tensor, layer: "QuantLinear") -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer.kernel.forward(layer.kernel_spec, layer._buffers, x, layer.bias)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        # The raw quantized weight: the input scale (if any) was applied before this function.
        layer = ctx.layer
        weight = layer.kernel.dequantize(layer.kernel_spec, layer._runtime(), grad.dtype)
        return grad @ weight, None


class QuantLinear(CompressedLinear):
    """Linear layer with weights stored as packed codes plus per-group ``scale``/``zero_point``.

    The stored (canonical) form is ``qdata`` uint8 ``[out, ceil(in * bits / 8)]``, ``scale`` and
    ``zero_point`` ``[out, groups]``. In memory the tensors are kept in the layout of the selected
    kernel (see :mod:`llmopt.kernels`); ``state_dict()`` always returns the canonical form.
    Input of any float dtype is accepted; the output has the input's dtype.

    Two optional input transforms, applied in this order before the matmul:

    * ``input_scale=True``: a float32 buffer ``input_scale [in]`` multiplies the input per column
      (AWQ / SmoothQuant scales that could not be folded into a preceding layer). The layer then
      computes ``(x * input_scale) @ W_q.T``; :meth:`dequantize_weight` returns the equivalent weight
      ``W_q * input_scale``.
    * ``act_bits=8``: activations are quantized dynamically per token to symmetric int8 (W8A8). The
      ``int8_onednn_cpu`` / ``int8_dynamic_cpu`` kernels multiply int8 x int8 (oneDNN with a prepacked
      weight / ``torch._int_mm``); any other kernel
      sees the fake-quantized activations, so every kernel computes the same function.

    ``kernel_spec`` (a :class:`~llmopt.kernels.KernelSpec`, built once) is all a kernel learns about
    the layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        format: Union[str, WeightFormat, Dict[str, Any]] = "int4",
        group_size: Optional[int] = 128,
        scale_dtype: Union[str, torch.dtype] = torch.bfloat16,
        dtype: Union[str, torch.dtype] = torch.float32,
        device: Optional[Union[str, torch.device]] = None,
        kernel: str = "auto",
        input_scale: bool = False,
        act_bits: Optional[int] = None,
    ) -> None:
        super().__init__()
        if act_bits is not None and act_bits not in ACT_BITS:
            raise ValueError(f"act_bits must be None or one of {ACT_BITS}, got {act_bits!r}")
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        # The one record of format, group size, scale dtype and activation bits (read back through the
        # properties below): what every kernel call is handed.
        self.kernel_spec = KernelSpec(
            format=get_format(format), in_features=self.in_features, out_features=self.out_features,
            group_size=resolve_group_size(group_size, self.in_features), scale_dtype=parse_dtype(scale_dtype),
            act_bits=act_bits, has_bias=bool(bias),
        )
        self.requested_kernel = kernel
        device = torch.device(device) if device is not None else torch.device("cpu")
        param_dtype = parse_dtype(dtype)
        # dtype of the float layer this one replaces: what dequantize_weight()/to_linear() return.
        self.weight_dtype = param_dtype
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=param_dtype, device=device),
                                 requires_grad=False) if bias else None
        g = self.num_groups
        canonical = {
            "qdata": torch.zeros(out_features, packed_row_bytes(in_features, self.format.bits),
                                 dtype=torch.uint8, device=device),
            "scale": torch.ones(out_features, g, dtype=self.scale_dtype, device=device),
        }
        if self.format.has_zero_point:
            canonical["zero_point"] = torch.zeros(out_features, g, dtype=self.zero_point_dtype, device=device)
        if input_scale:
            self.register_buffer("input_scale", torch.ones(in_features, dtype=torch.float32, device=device))
        else:
            self.input_scale = None
        self._runtime_names: tuple = ()
        self.kernel: Kernel = select_kernel(self.kernel_spec, "reference", device)
        self.set_canonical(canonical)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        format: Union[str, WeightFormat, Dict[str, Any], WeightQuant] = "int4",
        group_size: Optional[int] = 128,
        *,
        symmetric: Optional[bool] = None,
        scale_dtype: Union[str, torch.dtype] = torch.bfloat16,
        kernel: str = "auto",
    ) -> "QuantLinear":
        """Quantize an ``nn.Linear`` (or any subclass with ``weight``/``bias``) by round to nearest.

        ``format`` may be a whole :class:`~llmopt.WeightQuant` (a method config's ``scheme``), which then
        gives the group size, symmetry, scale dtype and kernel too.
        """
        if isinstance(format, WeightQuant):
            format, group_size, scale_dtype, kernel = (format.weight_format(), format.group_size,
                                                       format.scale_dtype, format.kernel)
        fmt = get_format(format, **({"symmetric": symmetric} if symmetric is not None else {}))
        weight = linear.weight
        check_linear_weight(weight)
        scale_dtype = parse_dtype(scale_dtype)
        q = quantize_weight(weight.detach(), fmt, group_size, scale_dtype)
        return cls.from_codes(
            q.codes, q.scale, q.zero_point, format=fmt, group_size=q.group_size,
            bias=linear.bias.detach() if linear.bias is not None else None,
            dtype=weight.dtype, kernel=kernel,
        )

    @classmethod
    def from_codes(
        cls,
        codes: Tensor,
        scale: Tensor,
        zero_point: Optional[Tensor],
        *,
        format: Union[str, WeightFormat, Dict[str, Any]],
        group_size: Optional[int],
        bias: Optional[Tensor] = None,
        dtype: Union[str, torch.dtype] = torch.float32,
        kernel: str = "auto",
        input_scale: Optional[Tensor] = None,
        act_bits: Optional[int] = None,
    ) -> "QuantLinear":
        """Build a layer from unpacked codes ``[N, K]`` and parameters ``[N, G]`` (used by GPTQ & co).

        ``input_scale [K]`` (optional) multiplies the input per column before the matmul;
        ``act_bits=8`` quantizes activations per token (W8A8).
        """
        fmt = get_format(format)
        # Out-of-range codes would be packed modulo 2**bits (200 -> 8 for int4); NaN/Inf or overflowing
        # parameters would make the layer compute Inf/NaN: refuse both before building anything.
        check_quantized(codes, scale, zero_point, fmt, group_size, "QuantLinear.from_codes")
        n, k = codes.shape
        layer = cls(k, n, bias=bias is not None, format=fmt, group_size=group_size,
                    scale_dtype=scale.dtype, dtype=dtype, device="meta", kernel="reference",
                    input_scale=input_scale is not None, act_bits=act_bits)
        if input_scale is not None:
            layer.set_input_scale(input_scale)
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(parse_dtype(dtype)).clone(), requires_grad=False)
        canonical = {"qdata": pack_codes(codes, fmt.bits), "scale": scale}
        if zero_point is not None:
            canonical["zero_point"] = zero_point
        layer.requested_kernel = kernel
        layer.set_canonical(canonical)
        return layer

    # ------------------------------------------------------------------ the scheme (from kernel_spec)
    @property
    def format(self) -> WeightFormat:
        return self.kernel_spec.format

    @property
    def group_size(self) -> int:
        """Columns per group, resolved (per-channel layers: ``in_features``)."""
        return self.kernel_spec.group_size

    @property
    def scale_dtype(self) -> torch.dtype:
        return self.kernel_spec.scale_dtype

    @property
    def zero_point_dtype(self) -> torch.dtype:
        """dtype of the stored zero points: ``scale_dtype``, or float32 for the "int"/"min" zero-point modes."""
        return self.kernel_spec.zero_point_dtype

    @property
    def act_bits(self) -> Optional[int]:
        """Bits activations are quantized to per token (W8A8: 8), or ``None``."""
        return self.kernel_spec.act_bits

    # ------------------------------------------------------------------ storage
    @property
    def num_groups(self) -> int:
        return num_groups(self.in_features, self.group_size)

    @property
    def device(self) -> torch.device:
        return self._buffers["qdata"].device

    def set_input_scale(self, input_scale: Tensor) -> None:
        """Install the per-column input multiplier ``[in_features]`` (float32, finite, non-zero)."""
        if self.input_scale is None:
            raise ValueError("this layer was built without input_scale=True")
        if tuple(input_scale.shape) != (self.in_features,):
            raise ValueError(f"input_scale has shape {tuple(input_scale.shape)}, expected ({self.in_features},)")
        values = input_scale.detach().to(torch.float32)
        if not bool(torch.isfinite(values).all()) or bool((values == 0).any()):
            raise ValueError("input_scale must be finite and non-zero")
        self.input_scale = values.to(self.device if self.device.type != "meta" else values.device).clone()

    def _runtime(self) -> Dict[str, Tensor]:
        return {name: self._buffers[name] for name in self._runtime_names}

    def canonical_state(self) -> Dict[str, Tensor]:
        """The portable stored form: ``qdata`` (row-packed codes), ``scale`` and ``zero_point``."""
        return self.kernel.to_canonical(self.kernel_spec, self._runtime())

    def _expected_shapes(self) -> Dict[str, tuple]:
        shapes = {
            "qdata": (self.out_features, packed_row_bytes(self.in_features, self.format.bits)),
            "scale": (self.out_features, self.num_groups),
        }
        if self.format.has_zero_point:
            shapes["zero_point"] = (self.out_features, self.num_groups)
        return shapes

    def set_canonical(self, canonical: Dict[str, Tensor], kernel: Optional[str] = None) -> None:
        """Install canonical tensors, converting them into the layout of the selected kernel."""
        expected = self._expected_shapes()
        if set(canonical) != set(expected):
            raise ValueError(f"expected tensors {sorted(expected)}, got {sorted(canonical)}")
        for name, shape in expected.items():
            if tuple(canonical[name].shape) != shape:
                raise ValueError(f"{name} has shape {tuple(canonical[name].shape)}, expected {shape}")
        if canonical["qdata"].dtype != torch.uint8:
            raise TypeError(f"qdata must be uint8, got {canonical['qdata'].dtype}")
        canonical = dict(canonical)
        canonical["scale"] = canonical["scale"].to(self.scale_dtype)
        if "zero_point" in canonical:
            canonical["zero_point"] = canonical["zero_point"].to(self.zero_point_dtype)
        requested = self.requested_kernel if kernel is None else kernel
        device = canonical["qdata"].device
        # Validate the kernel before touching any state, so a refused kernel leaves the layer intact.
        chosen = select_kernel(self.kernel_spec, "reference" if device.type == "meta" else requested, device)
        self.requested_kernel = requested
        runtime = chosen.to_runtime(self.kernel_spec, canonical)
        for name in self._runtime_names:
            del self._buffers[name]
        for name, tensor in runtime.items():
            self.register_buffer(name, tensor)
        self._runtime_names = tuple(runtime)
        self.kernel = chosen

    def set_kernel(self, kernel: str) -> "QuantLinear":
        """Switch kernel (``"auto"``, ``"reference"``, ``"int4pack_cpu"``, ...); returns self."""
        self.set_canonical(self.canonical_state(), kernel=kernel)
        return self

    def _stored_weight_bytes(self) -> int:
        # From shapes alone: converting a kernel layout back just to count bytes would be wasteful.
        sizes = {"qdata": 1, "scale": torch.empty((), dtype=self.scale_dtype).element_size(),
                 "zero_point": torch.empty((), dtype=self.zero_point_dtype).element_size()}
        return sum(shape[0] * shape[1] * sizes[name] for name, shape in self._expected_shapes().items())

    def stored_bytes(self) -> int:
        """Bytes of the canonical stored form (codes, parameters, bias), as written by ``save``."""
        return self._stored_weight_bytes() + tensor_bytes(self.bias, self.input_scale)

    def runtime_bytes(self) -> int:
        """Bytes this layer actually holds in memory (kernel layout, padding and bias included)."""
        return tensor_bytes(*self._runtime().values(), self.bias, self.input_scale)

    def weight_bytes(self) -> float:
        """Stored bytes of codes and parameters: what :meth:`bits_per_weight` counts (bias and input
        scale excluded)."""
        return float(self._stored_weight_bytes())

    # ------------------------------------------------------------------ state dict: always canonical
    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: D401
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        if self.input_scale is not None:
            destination[prefix + "input_scale"] = self.input_scale
        for name, tensor in self.canonical_state().items():
            destination[prefix + name] = tensor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        expected = list(self._expected_shapes())
        canonical = {}
        for name in expected:
            key = prefix + name
            if key in state_dict:
                canonical[name] = state_dict[key]
            else:
                missing_keys.append(key)
        if self.bias is not None:
            key = prefix + "bias"
            if key in state_dict:
                value = state_dict[key]
                if tuple(value.shape) != (self.out_features,):
                    error_msgs.append(f"{key}: shape {tuple(value.shape)}, expected ({self.out_features},)")
                elif local_metadata.get("assign_to_params_buffers", False) or self.bias.device.type == "meta":
                    self.bias = nn.Parameter(value.detach().clone(), requires_grad=False)
                else:
                    with torch.no_grad():
                        self.bias.copy_(value)
            else:
                missing_keys.append(key)
        if self.input_scale is not None:
            key = prefix + "input_scale"
            if key in state_dict:
                try:
                    self.set_input_scale(state_dict[key].to(self.input_scale.device)
                                         if self.input_scale.device.type != "meta" else state_dict[key])
                except ValueError as exc:
                    error_msgs.append(f"{key}: {exc}")
            else:
                missing_keys.append(key)
        known = set(expected) | {"bias"} | ({"input_scale"} if self.input_scale is not None else set())
        for key in state_dict:
            if key.startswith(prefix) and "." not in key[len(prefix):] and key[len(prefix):] not in known:
                unexpected_keys.append(key)
        if len(canonical) == len(expected):
            try:
                self.set_canonical({k: v.detach() for k, v in canonical.items()})
            except (ValueError, TypeError) as exc:
                error_msgs.append(f"{prefix.rstrip('.') or 'QuantLinear'}: {exc}")

    # ------------------------------------------------------------------ copies
    def __deepcopy__(self, memo):
        # Opaque runtime layouts (oneDNN's prepacked int8 weight) have no storage to copy: copy
        # everything else as usual, then rebuild the kernel layout from a copy of the canonical form.
        opaque = [name for name in self._runtime_names if self._buffers[name].layout != torch.strided]
        canonical = {k: v.clone() for k, v in self.canonical_state().items()} if opaque else None
        hidden = {name: self._buffers.pop(name) for name in self._runtime_names} if opaque else {}
        names = self._runtime_names
        try:
            if opaque:
                self._runtime_names = ()
            new = self.__class__.__new__(self.__class__)
            memo[id(self)] = new
            new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        finally:
            self._buffers.update(hidden)
            self._runtime_names = names
        if canonical is not None:
            new.set_canonical(canonical, kernel=self.requested_kernel)
        return new

    # ------------------------------------------------------------------ device moves
    def _apply(self, fn, recurse=True):
        device = self.device
        probe = fn(torch.zeros((), dtype=self.weight_dtype, device=device))
        if probe.is_floating_point():
            self.weight_dtype = probe.dtype
        # The input scale stays float32 whatever the cast (it was calibrated in float32).
        kept = {}
        if self.input_scale is not None:
            kept["input_scale"] = self._buffers.pop("input_scale").to(probe.device)
        try:
            if probe.device == device:
                # A dtype cast or a no-op: quantized tensors keep their dtype and layout; bias follows.
                hidden = {name: self._buffers.pop(name) for name in self._runtime_names}
                try:
                    return super()._apply(fn, recurse)
                finally:
                    self._buffers.update(hidden)
            # Device change: go through the canonical form and pick the kernel for the new device.
            canonical = self.canonical_state()
            for name in self._runtime_names:
                del self._buffers[name]
            self._runtime_names = ()
            super()._apply(fn, recurse)
        finally:
            self._buffers.update(kept)
        moved = {name: fn(t) if t.is_floating_point() else t.to(probe.device) for name, t in canonical.items()}
        self.set_canonical(moved)
        return self

    # ------------------------------------------------------------------ maths
    def dequantize_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The float weight ``[out, in]`` this layer multiplies by (default: the bias/param dtype)."""
        dtype = dtype or self.weight_dtype
        if self.input_scale is None:
            return self.kernel.dequantize(self.kernel_spec, self._runtime(), dtype)
        weight = self.kernel.dequantize(self.kernel_spec, self._runtime(), torch.float32) * self.input_scale
        return weight.to(dtype)

    def codes(self) -> Tensor:
        """Unpacked integer codes ``[out, in]`` (uint8)."""
        return self.kernel.codes(self.kernel_spec, self._runtime())

    def forward(self, x: Tensor) -> Tensor:
        check_linear_input(x, self.in_features, "QuantLinear")
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)
        if self.act_bits is not None and not self.kernel.quantizes_activations:
            fq = fake_quantize_activations(x, self.act_bits)
            # Straight-through gradient, as the int8_dynamic kernel's backward: same function, same grad.
            x = x + (fq - x).detach() if x.requires_grad else fq
        if self.kernel.name != "reference" and x.requires_grad and torch.is_grad_enabled():
            return _FastKernelMatmul.apply(x, self)
        # _buffers holds the kernel's runtime tensors (plus input_scale): no dict to build per call.
        return self.kernel.forward(self.kernel_spec, self._buffers, x, self.bias)

    def config(self) -> Dict[str, Any]:
        """JSON-serialisable constructor arguments (used by ``llmopt.save``)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "format": self.format.to_dict(),
            "group_size": self.group_size,
            "scale_dtype": dtype_name(self.scale_dtype),
            "dtype": dtype_name(self.weight_dtype),
            "kernel": self.requested_kernel,
            "input_scale": self.input_scale is not None,
            "act_bits": self.act_bits,
        }

    @classmethod
    def from_config(cls, config: Dict[str, Any], device: Optional[Union[str, torch.device]] = None) -> "QuantLinear":
        """Empty layer from :meth:`config` output (values come later from a state dict)."""
        return cls(**config, device=device)

    def describe(self) -> str:
        """Short summary for reports: ``"int4 g64 [int4pack_cpu]"``."""
        extras = "".join([" +input-scale" if self.input_scale is not None else "",
                          f" a{self.act_bits}" if self.act_bits is not None else ""])
        return f"{self.format.name} g{self.group_size}{extras} [{self.kernel.name}]"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.format.name}, group_size={self.group_size}, "
                f"kernel={self.kernel.name}"
                + (", input_scale=True" if self.input_scale is not None else "")
                + (f", act_bits={self.act_bits}" if self.act_bits is not None else ""))
