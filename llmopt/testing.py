"""Helpers for testing compression methods: toy models and checks every method must pass."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .core.formats import WeightFormat, get_format, list_formats
from .core.measure import sqnr
from .core.packing import pack_codes, unpack_codes
from .core.primitives import (
    dequantize_weight,
    fake_quantize_activations,
    quantize_activations,
    quantize_weight,
    resolve_group_size,
)
from .kernels import Kernel, KernelSpec, get_kernel

__all__ = ["sqnr", "ToyMLP", "ToyAttentionBlock", "ToyTransformer", "CustomLinear", "word_tokenizer",
           "check_kernel", "KernelCheck", "format_variants", "check_format", "bit_equal"]


class CustomLinear(nn.Linear):
    """A user's own ``nn.Linear`` subclass (extra attribute, same maths): wrappers must accept it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tag = "custom"


class ToyMLP(nn.Module):
    """Two-layer MLP with widths that group sizes 32/64/128 do not all divide (96, 200)."""

    def __init__(self, d_in: int = 96, d_hidden: int = 208, d_out: int = 64, bias: bool = True):
        super().__init__()
        self.up = nn.Linear(d_in, d_hidden, bias=bias)
        self.down = CustomLinear(d_hidden, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class ToyAttentionBlock(nn.Module):
    """Pre-norm transformer block with grouped-query attention and a gated MLP (Llama-like)."""

    def __init__(self, dim: int = 64, n_heads: int = 4, n_kv_heads: int = 2, hidden: int = 176):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.attn_norm = nn.RMSNorm(dim) if hasattr(nn, "RMSNorm") else nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)
        self.mlp_norm = nn.RMSNorm(dim) if hasattr(nn, "RMSNorm") else nn.LayerNorm(dim)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(h).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(h).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=attention_mask is None)
        x = x + self.o_proj(att.transpose(1, 2).reshape(b, t, -1))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class ToyTransformer(nn.Module):
    """Tiny causal LM: embedding, a ``ModuleList`` of blocks, norm, tied head. No library knows it."""

    def __init__(self, vocab: int = 128, dim: int = 64, n_layers: int = 2, tie: bool = True, **block_kwargs):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(ToyAttentionBlock(dim, **block_kwargs) for _ in range(n_layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=1 / math.sqrt(dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def word_tokenizer(words: Iterable[str]):
    """A Hugging Face fast tokenizer built offline (no hub): one id per word (split on whitespace),
    ``[UNK]``/``[BOS]``/``[EOS]`` first. Needs ``transformers`` (and its ``tokenizers``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(words))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]")


# ------------------------------------------------------------------------------------------ formats
def check_format(name: str, *, rows: int = 6, columns: Sequence[int] = (64, 100), group_sizes:
                 Sequence[Optional[int]] = (32, None), seed: int = 0) -> None:
    """Check a registered format's contract; raise ``AssertionError`` naming the first violation.

    What every method, kernel and save relies on, for each variant (``symmetric`` on and off where the
    format has it), width (a ragged one included) and group size: the declaration (``bits``,
    ``has_zero_point``, a sorted ``grid`` of at most ``2**bits`` values), ``to_dict`` round trip,
    codes below ``2**bits``, dequantized values on the grid, ``quantize(dequantize(.))`` a fixed
    point, finite results for all-zero and constant groups, and a ragged last group quantized as if
    it stood alone.
    """
    for fmt in format_variants(name):
        where = f"format {fmt!r}"
        assert isinstance(fmt.bits, int) and 1 <= fmt.bits <= 8, f"{where}: bits must be 1..8, got {fmt.bits!r}"
        assert isinstance(fmt.has_zero_point, bool), f"{where}: has_zero_point must be a bool"
        assert get_format(fmt.to_dict()) == fmt, f"{where}: to_dict() does not round-trip"
        grid = fmt.grid()
        if grid is not None:
            assert grid.dim() == 1 and 1 < grid.numel() <= 2 ** fmt.bits, f"{where}: grid size {grid.numel()}"
            assert bool(torch.all(grid[1:] >= grid[:-1])), f"{where}: grid values must be sorted"
        gen = torch.Generator().manual_seed(seed)
        for k, group_size in itertools.product(columns, group_sizes):
            weight = torch.randn(rows, k, generator=gen)
            _check_format_on(fmt, weight, group_size, grid, f"{where}, [{rows}, {k}], group_size={group_size}")
        for constant in (0.0, 2.5):
            weight = torch.full((2, 64), constant)
            q = quantize_weight(weight, fmt, 32, torch.float32)
            deq = dequantize_weight(q.codes, q.scale, q.zero_point, fmt, q.group_size, torch.float32)
            assert torch.allclose(deq, weight, atol=1e-6), f"{where}: a constant group {constant} is not exact"


def _check_format_on(fmt: WeightFormat, weight: Tensor, group_size: Optional[int], grid: Optional[Tensor],
                     where: str) -> None:
    q = quantize_weight(weight, fmt, group_size, torch.float32)
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) < 2 ** fmt.bits, f"{where}: codes out of range"
    assert (q.zero_point is not None) == fmt.has_zero_point, f"{where}: zero point does not match has_zero_point"
    deq = dequantize_weight(q.codes, q.scale, q.zero_point, fmt, q.group_size, torch.float64)
    assert bool(torch.isfinite(deq).all()), f"{where}: non-finite dequantized values"
    gs = q.group_size
    k = weight.shape[1]
    scale = q.scale.to(torch.float64).repeat_interleave(gs, dim=1)[:, :k]
    offset = 0.0 if q.zero_point is None else q.zero_point.to(torch.float64).repeat_interleave(gs, dim=1)[:, :k]
    if grid is not None:
        normalized = (deq - offset) / scale
        distance = (normalized.unsqueeze(-1) - grid.to(torch.float64)).abs().min(dim=-1).values
        tolerance = 1e-4 + deq.abs() * 2.4e-7 / scale  # dequantization runs in float32
        assert bool(torch.all(distance < tolerance)), f"{where}: dequantized values off the grid"
    again = quantize_weight(deq.float(), fmt, group_size, torch.float32)
    redeq = dequantize_weight(again.codes, again.scale, again.zero_point, fmt, again.group_size, torch.float64)
    assert torch.allclose(redeq, deq, rtol=1e-5, atol=1e-6), f"{where}: quantize(dequantize(w)) moved"
    full = (k // gs) * gs
    if 0 < full < k:  # a ragged last group is quantized as if it stood alone
        tail = quantize_weight(weight[:, full:], fmt, None, torch.float32)
        assert torch.equal(q.codes[:, full:], tail.codes), f"{where}: the ragged last group depends on padding"


# ------------------------------------------------------------------------------------------ kernels
def format_variants(name: str) -> List[WeightFormat]:
    """The registered format ``name``, plus its other ``symmetric`` setting and its "int"/"min" zero-point
    modes when it has those options (``int4`` -> asymmetric, symmetric, zero_point="int" and "min"):
    the variants a kernel contract is checked on."""
    fmt = get_format(name)
    variants = [fmt]
    try:
        variants.append(get_format(name, symmetric=not getattr(fmt, "symmetric", False)))
    except ValueError:  # no symmetric option (codebook and float formats), or not for these bits
        pass
    for mode in ("int", "min"):  # the affine formats' other zero-point modes (exact float32 zero points)
        try:
            variants.append(get_format(name, zero_point=mode))
        except ValueError:
            pass
    return variants


@dataclass
class KernelCheck:
    """What :func:`check_kernel` covered: the specs the kernel served (and passed) and those it refused."""

    kernel: str
    served: List[str] = field(default_factory=list)
    refused: List[Tuple[str, str]] = field(default_factory=list)  # (spec, reason)


def bit_equal(a: Tensor, b: Tensor) -> bool:
    """Same dtype, shape, device and bytes (so -0.0 != 0.0 and NaN payloads count)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8),
                       b.contiguous().reshape(-1).view(torch.uint8))


def _relative_error(got: Tensor, expected: Tensor) -> float:
    return float((got.double() - expected).norm() / expected.norm().clamp_min(1e-30))


def _canonical_tensors(spec: KernelSpec, weight: Tensor) -> Dict[str, Tensor]:
    """The stored form of ``weight`` quantized by round to nearest for ``spec``."""
    q = quantize_weight(weight, spec.format, spec.group_size, spec.scale_dtype)
    canonical = {"qdata": pack_codes(q.codes, spec.format.bits), "scale": q.scale}
    if q.zero_point is not None:
        canonical["zero_point"] = q.zero_point
    return canonical


def _check_one_spec(kernel: Kernel, spec: KernelSpec, device: torch.device, gen: torch.Generator,
                    leads: Sequence[Tuple[int, ...]], act_dtypes: Sequence[torch.dtype],
                    rtol: Mapping[torch.dtype, float], where: str) -> None:
    n, k = spec.out_features, spec.in_features
    weight = (torch.randn(n, k, generator=gen) * (0.5 + torch.rand(n, 1, generator=gen))).to(device)
    canonical = _canonical_tensors(spec, weight)
    originals = {name: t.clone() for name, t in canonical.items()}

    # canonical -> runtime -> canonical, bit for bit (to_runtime gets copies: it may reuse its inputs).
    runtime = kernel.to_runtime(spec, {name: t.clone() for name, t in canonical.items()})

    def assert_round_trip(when: str) -> None:
        back = kernel.to_canonical(spec, runtime)
        assert set(back) == set(originals), (
            f"{where}: to_canonical {when} gives {sorted(back)}, expected {sorted(originals)}")
        for name, tensor in originals.items():
            assert bit_equal(back[name], tensor), (
                f"{where}: canonical -> runtime -> canonical changed {name!r} {when} "
                f"({back[name].dtype} {tuple(back[name].shape)} vs {tensor.dtype} {tuple(tensor.shape)})")

    assert_round_trip("after to_runtime")

    codes = unpack_codes(originals["qdata"], spec.format.bits, k)
    got_codes = kernel.codes(spec, runtime)
    assert got_codes.dtype == torch.uint8 and torch.equal(got_codes, codes), (
        f"{where}: codes() differ from the stored codes")

    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        expected = dequantize_weight(codes, originals["scale"], originals.get("zero_point"), spec.format,
                                     spec.group_size, dtype)
        got = kernel.dequantize(spec, runtime, dtype)
        assert got.dtype == dtype and torch.equal(got, expected), (
            f"{where}: dequantize({dtype}) differs from the reference dequantization "
            f"(max abs diff {float((got.double() - expected.double()).abs().max()):.3g})")

    weight64 = dequantize_weight(codes, originals["scale"], originals.get("zero_point"), spec.format,
                                 spec.group_size, torch.float64)
    bias = torch.randn(n, generator=gen).to(device) if spec.has_bias else None
    # The layer hands forward() its whole buffer dict: a kernel must ignore entries it does not own.
    runtime_seen = {**runtime, "input_scale": torch.ones(k, device=device)}
    for act_dtype, lead in itertools.product(act_dtypes, leads):
        x = torch.randn(*lead, k, generator=gen).to(device=device, dtype=act_dtype)
        x_in, x64 = x, x.double()
        if spec.act_bits is not None:
            act_codes, act_scale = quantize_activations(x, spec.act_bits)
            x64 = act_codes.double() * act_scale.double()
            if not kernel.quantizes_activations:  # as QuantLinear does: such kernels see fake-quantized input
                x_in = fake_quantize_activations(x, spec.act_bits)
        # Broadcast and sum rather than a float64 matmul: exact enough, and no BLAS threads to wait for.
        expected = (x64.unsqueeze(-2) * weight64).sum(-1) + (bias.double() if bias is not None else 0.0)
        y = kernel.forward(spec, runtime_seen, x_in, bias)
        case = f"{where} x={act_dtype} {tuple(x.shape)}"
        assert y.dtype == act_dtype and tuple(y.shape) == (*lead, n), (
            f"{case}: forward gave {y.dtype} {tuple(y.shape)}, expected {act_dtype} {(*lead, n)}")
        err = _relative_error(y, expected)
        assert err <= rtol[act_dtype], f"{case}: forward relative error {err:.3g} > {rtol[act_dtype]:.3g}"
    assert_round_trip("after forward")


def check_kernel(
    kernel: Union[str, Kernel],
    formats: Optional[Iterable[Union[str, WeightFormat]]] = None,
    *,
    group_sizes: Sequence[Optional[int]] = (32, 64, None),
    shapes: Sequence[Tuple[int, int]] = ((64, 128), (48, 72)),
    scale_dtypes: Sequence[torch.dtype] = (torch.bfloat16, torch.float32),
    act_bits: Sequence[Optional[int]] = (None, 8),
    biases: Sequence[bool] = (True, False),
    act_dtypes: Sequence[torch.dtype] = (torch.float32, torch.bfloat16),
    leads: Sequence[Tuple[int, ...]] = ((1,), (2, 3)),
    rtol: Union[float, Mapping[torch.dtype, float]] = 1e-2,
    device: Union[str, torch.device] = "cpu",
    seed: int = 0,
) -> KernelCheck:
    """Check a kernel's contract on every spec of a grid; raise ``AssertionError`` naming the first
    spec that breaks it. Returns what was served and what was refused.

    Grid: ``formats`` (names or instances; default every registered format, both ``symmetric``
    settings where the format has that option, see :func:`format_variants`) x ``group_sizes``
    (``None``: per channel) x ``shapes`` (``(out_features, in_features)``) x ``scale_dtypes`` x
    ``act_bits`` x ``biases``. For each spec the kernel refuses on ``device``, the reason must be a
    non-empty string. For each spec it accepts, on a random weight quantized by round to nearest:

    * canonical -> :meth:`~Kernel.to_runtime` -> :meth:`~Kernel.to_canonical` is bit-exact (again
      after the forward calls: forward must not modify the runtime tensors);
    * :meth:`~Kernel.codes` equals the stored codes (uint8);
    * :meth:`~Kernel.dequantize` equals the reference dequantization exactly, in float32, float64
      and bfloat16;
    * :meth:`~Kernel.forward` (inputs ``[*lead, in_features]`` of each of ``act_dtypes``; bias as the
      spec says) returns the input's dtype and shape, and is within relative (Frobenius-norm) error
      ``rtol`` of the float64 product with the dequantized weight. With ``act_bits``, the float64
      product uses the per-token quantized activations; a kernel that does not quantize activations
      itself is handed them fake-quantized, as ``QuantLinear`` does. ``rtol`` is one number or a
      ``{activation dtype: tolerance}`` mapping; the default 1e-2 fits kernels that compute in
      bfloat16 (measured ~3e-3).
    """
    kern = get_kernel(kernel) if isinstance(kernel, str) else kernel
    if not isinstance(kern, Kernel):
        raise TypeError(f"check_kernel needs a kernel name or a Kernel instance, got {kernel!r}")
    tolerances = dict(rtol) if isinstance(rtol, Mapping) else {dtype: float(rtol) for dtype in act_dtypes}
    missing = [dtype for dtype in act_dtypes if dtype not in tolerances]
    if missing:
        raise ValueError(f"check_kernel: rtol has no tolerance for activation dtypes {missing}")
    if formats is None:
        fmts = [variant for name in list_formats() for variant in format_variants(name)]
    else:
        fmts = [get_format(f) for f in formats]
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    report = KernelCheck(kern.name)
    for fmt, group_size, (n, k), scale_dtype, bits, bias in itertools.product(
            fmts, group_sizes, shapes, scale_dtypes, act_bits, biases):
        spec = KernelSpec(format=fmt, in_features=k, out_features=n,
                          group_size=resolve_group_size(group_size, k), scale_dtype=scale_dtype,
                          act_bits=bits, has_bias=bias)
        where = f"kernel {kern.name!r} on {spec.describe()}" + (f" {fmt.options()}" if fmt.options() else "")
        reason = kern.unsupported_reason(spec, device)
        if reason is not None:
            assert isinstance(reason, str) and reason.strip(), (
                f"{where}: refused without a reason ({reason!r})")
            report.refused.append((where, reason))
            continue
        _check_one_spec(kern, spec, device, gen, leads, act_dtypes, tolerances, where)
        report.served.append(where)
    return report
