"""``QuantEmbedding``: a drop-in replacement for ``nn.Embedding`` whose table is quantized by rows.

The table ``[num_embeddings, embedding_dim]`` is held by a :class:`~llmopt.nn.QuantLinear` with
``out_features=num_embeddings`` and ``in_features=embedding_dim`` (groups run along the embedding
dimension). Reusing that layer gives the embedding the packed tensors, the kernels, the canonical
state dict, device moves and save/load of every other quantized layer, and it lets a tied output
head (``lm_head.weight is embed_tokens.weight``) *be* that very ``QuantLinear``: one packed copy
serves both the lookup (:meth:`~llmopt.kernels.Kernel.dequantize_rows`, a row gather) and the
head's matmul (the kernel's ``forward``).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from ..core.checks import check_linear_weight, dtype_name
from ..core.formats import WeightFormat
from ..core.scheme import WeightQuant
from ..kernels import Kernel
from ..kernels.base import log_once
from .base import register_module_type
from .quant_linear import QuantLinear

__all__ = ["QuantEmbedding", "has_row_gather"]

# Index dtypes nn.Embedding accepts.
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def has_row_gather(kernel: Kernel) -> bool:
    """True if ``kernel`` overrides :meth:`Kernel.dequantize_rows` (the default dequantizes the whole
    table on every lookup)."""
    return type(kernel).dequantize_rows is not Kernel.dequantize_rows


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` with a quantized table: ``forward(ids)`` gathers and dequantizes only the rows asked for.

    The table lives in ``self.linear``, a bias-free :class:`~llmopt.nn.QuantLinear`
    ``[num_embeddings, embedding_dim]``; its state dict (``linear.qdata``, ``linear.scale``,
    ``linear.zero_point``) is the canonical form of every quantized layer. The output has the
    dtype of the embedding this one replaced (``weight_dtype``, which follows ``model.to(dtype)``),
    like ``nn.Embedding``. ``padding_idx`` is kept for reference: its row is looked up like any
    other (a frozen table has no gradient to mask).

    Kernel: a table that is only looked up defaults to ``"reference"``, whose row-major canonical
    layout gathers rows directly; ``kernel="auto"`` (or a name) picks a matmul kernel, as a tied head
    wants. A kernel without its own row gather dequantizes the whole table per lookup (logged once).
    """

    is_llmopt_compressed = True  # methods never compress it again; memory_report lists it as a layer

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: Optional[int] = None,
        *,
        format: Union[str, WeightFormat, Dict[str, Any]] = "int4",
        group_size: Optional[int] = 128,
        scale_dtype: Union[str, torch.dtype] = torch.bfloat16,
        dtype: Union[str, torch.dtype] = torch.float32,
        device: Optional[Union[str, torch.device]] = None,
        kernel: str = "reference",
        linear: Optional[QuantLinear] = None,
    ) -> None:
        super().__init__()
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (num_embeddings, embedding_dim)):
            raise ValueError(f"num_embeddings and embedding_dim must be positive integers, got "
                             f"{num_embeddings!r}, {embedding_dim!r}")
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"padding_idx {padding_idx} is out of range for {num_embeddings} embeddings")
            padding_idx = padding_idx % num_embeddings  # as nn.Embedding stores a negative index
        self.padding_idx = padding_idx
        if linear is None:
            linear = QuantLinear(embedding_dim, num_embeddings, bias=False, format=format, group_size=group_size,
                                 scale_dtype=scale_dtype, dtype=dtype, device=device, kernel=kernel)
        else:
            _check_table(linear, num_embeddings, embedding_dim)
        self.linear = linear

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_embedding(
        cls,
        embedding: nn.Embedding,
        format: Union[str, WeightFormat, Dict[str, Any], WeightQuant] = "int4",
        group_size: Optional[int] = 128,
        *,
        symmetric: Optional[bool] = None,
        scale_dtype: Union[str, torch.dtype] = torch.bfloat16,
        kernel: str = "reference",
    ) -> "QuantEmbedding":
        """Quantize an ``nn.Embedding`` by round to nearest, row by row (groups along ``embedding_dim``).

        ``format`` may be a whole :class:`~llmopt.WeightQuant`, which then gives the group size,
        symmetry and scale dtype too (its kernel is for matmuls; ``kernel`` here picks the lookup's).
        """
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"QuantEmbedding.from_embedding expects an nn.Embedding, got {type(embedding).__name__}")
        if embedding.max_norm is not None:
            raise ValueError(f"nn.Embedding({embedding.num_embeddings}, {embedding.embedding_dim}) has max_norm="
                             f"{embedding.max_norm}: it renormalizes rows in place on lookup, which a quantized "
                             "table cannot do")
        try:
            check_linear_weight(embedding.weight)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"nn.Embedding({embedding.num_embeddings}, {embedding.embedding_dim}): {exc}") from None
        if isinstance(format, WeightQuant):
            format, group_size, scale_dtype = format.weight_format(), format.group_size, format.scale_dtype
        table = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False, device="meta")
        table.weight = embedding.weight  # shares the tensor: from_linear only reads it
        linear = QuantLinear.from_linear(table, format, group_size, symmetric=symmetric, scale_dtype=scale_dtype,
                                         kernel=kernel)
        return cls.from_linear(linear, padding_idx=embedding.padding_idx)

    @classmethod
    def from_linear(cls, linear: QuantLinear, padding_idx: Optional[int] = None) -> "QuantEmbedding":
        """An embedding looking up the rows of ``linear`` (not copied: a tied head and its embedding share it)."""
        return cls(linear.out_features, linear.in_features, padding_idx, linear=linear)

    # ------------------------------------------------------------------ what it is
    @property
    def num_embeddings(self) -> int:
        return self.linear.out_features

    @property
    def embedding_dim(self) -> int:
        return self.linear.in_features

    # The table's shape as a Linear would name it: what memory reports count weights by.
    @property
    def out_features(self) -> int:
        return self.linear.out_features

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def format(self) -> WeightFormat:
        return self.linear.format

    @property
    def group_size(self) -> int:
        return self.linear.group_size

    @property
    def scale_dtype(self) -> torch.dtype:
        return self.linear.scale_dtype

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of the embedding this one replaced: what lookups return (follows ``.to(dtype)``)."""
        return self.linear.weight_dtype

    @property
    def kernel(self) -> Kernel:
        return self.linear.kernel

    @property
    def device(self) -> torch.device:
        return self.linear.device

    # ------------------------------------------------------------------ maths
    def forward(self, ids: Tensor) -> Tensor:
        """Rows ``ids`` of the table, shape ``ids.shape + (embedding_dim,)``, dtype ``weight_dtype``."""
        if not isinstance(ids, Tensor):
            raise TypeError(f"{self._name()} expects a tensor of token ids, got {type(ids).__name__}")
        if ids.dtype not in _INDEX_DTYPES:
            raise TypeError(f"{self._name()} expects integer token ids (torch.long or torch.int), got {ids.dtype}")
        flat = ids.reshape(-1)
        if flat.numel():
            low, high = int(flat.min()), int(flat.max())
            if low < 0 or high >= self.num_embeddings:
                bad = low if low < 0 else high
                raise IndexError(f"{self._name()}: token id {bad} is out of range: the table has "
                                 f"{self.num_embeddings} rows (ids 0..{self.num_embeddings - 1})")
        linear = self.linear
        if not has_row_gather(linear.kernel):
            log_once(f"QuantEmbedding: kernel {linear.kernel.name!r} has no row gather, so each lookup dequantizes "
                     "the whole table; a table that is only looked up is best on kernel='reference'")
        rows = linear.kernel.dequantize_rows(linear.kernel_spec, linear._runtime(), flat.to(torch.int64),
                                             linear.weight_dtype)
        return rows.view(*ids.shape, self.embedding_dim)

    def dequantize_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The float table ``[num_embeddings, embedding_dim]`` (default dtype: ``weight_dtype``)."""
        return self.linear.dequantize_weight(dtype)

    def to_embedding(self, dtype: Optional[torch.dtype] = None) -> nn.Embedding:
        """A plain ``nn.Embedding`` holding the dequantized table."""
        weight = self.dequantize_weight(dtype)
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            emb.weight.copy_(weight)
        return emb

    # ------------------------------------------------------------------ bytes
    def stored_bytes(self) -> int:
        """Bytes ``llmopt.save`` writes for the table (codes and parameters; a tied head's bias too)."""
        return int(self.linear.stored_bytes())

    def runtime_bytes(self) -> int:
        """Bytes the table holds in memory, in its kernel's layout."""
        return int(self.linear.runtime_bytes())

    def weight_bytes(self) -> float:
        """Stored bytes of codes and parameters (no bias)."""
        return float(self.linear.weight_bytes())

    def bits_per_weight(self) -> float:
        """Stored bits per table entry, parameters included."""
        return 8.0 * self.weight_bytes() / (self.num_embeddings * self.embedding_dim)

    # ------------------------------------------------------------------ save / load
    def config(self) -> Dict[str, Any]:
        """JSON-serialisable constructor arguments (used by ``llmopt.save``)."""
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "padding_idx": self.padding_idx,
            "format": self.format.to_dict(),
            "group_size": self.group_size,
            "scale_dtype": dtype_name(self.scale_dtype),
            "dtype": dtype_name(self.weight_dtype),
            "kernel": self.linear.requested_kernel,
        }

    @classmethod
    def from_config(cls, config: Dict[str, Any],
                    device: Optional[Union[str, torch.device]] = None) -> "QuantEmbedding":
        """An empty embedding from :meth:`config` output (values come later from a state dict)."""
        return cls(**config, device=device)

    # ------------------------------------------------------------------ text
    def describe(self) -> str:
        """Short summary for reports: ``"int4 g64 [reference]"``."""
        return self.linear.describe()

    def _name(self) -> str:
        return f"QuantEmbedding({self.num_embeddings}, {self.embedding_dim})"

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}"
                + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else "")
                + f", format={self.format.name}, group_size={self.group_size}, kernel={self.kernel.name}")


def _check_table(linear: Any, num_embeddings: int, embedding_dim: int) -> None:
    """A ``QuantLinear`` that can serve as a table: the right shape, and no input transform (a lookup has
    no input to scale or quantize)."""
    if not isinstance(linear, QuantLinear):
        raise TypeError(f"QuantEmbedding needs a QuantLinear table, got {type(linear).__name__}")
    if (linear.out_features, linear.in_features) != (num_embeddings, embedding_dim):
        raise ValueError(f"QuantLinear table is [{linear.out_features}, {linear.in_features}], expected "
                         f"[{num_embeddings}, {embedding_dim}]")
    if linear.input_scale is not None or linear.act_bits is not None:
        raise ValueError("a QuantLinear with an input scale or quantized activations cannot be an embedding table")


register_module_type(QuantEmbedding)
