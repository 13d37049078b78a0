"""Incoherence processing: orthogonal rotations folded into the weights of a Llama-style causal LM.

``compress_(model, [Rotate(), GPTQ("int3", 64)], calibration=...)`` first rewrites the model into an
exactly equivalent one whose weights have no outlier channels, then quantizes it (the QuaRot /
SpinQuant / QuIP# idea, implemented here from the maths; only rotations that fold into existing
weights, so no module computes anything new at run time).

The maths, in the row-vector convention of ``nn.Linear`` (``y = x W^T + b``):

1. **Fold the RMSNorm gains.** ``RMSNorm(x) = g * x / rms(x)``: ``g`` moves into the columns of every
   Linear that reads the norm's output (``W <- W diag(g)``) and the norm's weight becomes ones. A unit
   RMSNorm commutes with any orthogonal ``Q`` (``rms(x Q) = rms(x)``), which a gain would break.
2. **Rotate the residual stream** by an orthogonal ``Q`` (hidden x hidden): every residual vector
   ``x`` becomes ``x Q``. A Linear reading it computes ``x W^T = (x Q) (W Q)^T``, so ``W <- W Q``; one
   writing it must produce ``y Q = z (Q^T W)^T + b Q``, so ``W <- Q^T W`` and ``b <- b Q``; the
   embedding writes rows of the stream, ``E <- E Q``. The head reads ``norm(x Q) = norm(x) Q``, so
   the logits are unchanged. A tied head is untied: it gets ``E diag(g_final) Q``, the table ``E Q``.
3. **Rotate the value heads** by an orthogonal ``R_j`` (head_dim x head_dim) per kv head ``j``:
   ``v_j <- v_j R_j`` means ``W_v[j] <- R_j^T W_v[j]`` (the rows of kv head ``j``, bias ``b_j R_j``).
   Attention mixes value vectors linearly across positions, so each query head ``h`` using kv head
   ``j = h // (H / KV)`` outputs ``o_h R_j``; ``o_proj``'s columns of head ``h`` get ``W_o[:, h] <- W_o[:, h] R_j``
   and the product is unchanged. (Queries and keys are left alone: RoPE does not commute with R.)

``Q`` and ``R`` are randomised Hadamard matrices (random ±1 diagonal times a normalised Sylvester
Hadamard) when the size is a power of two, else (or with ``kind="orthogonal"``) Haar-random
orthogonal matrices (QR of a seeded Gaussian, sign-fixed). All maths runs in float64 (a power-of-two
residual rotation by the fast Walsh-Hadamard transform), the results are cast back to each weight's dtype. The handler only plans: it returns new modules in a
:class:`~llmopt.methods.base.ModelEdit` and never touches the model.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from ...core.targets import Patterns, _as_list, _matches, is_compressed
from ..base import MethodConfig, ModelEdit, register_method

__all__ = ["Rotate", "RotateReport", "rotation_matrix", "hadamard_matrix", "random_orthogonal", "KINDS"]

KINDS = ("hadamard", "orthogonal")
# Rows (or columns) of a weight multiplied at a time, so a large head or embedding never needs a
# full float64 copy at once.
_CHUNK = 8192
# Submodules of an attention module that may hold parameters without touching the residual stream:
# Qwen3-style per-head norms of the queries and keys (the rotation leaves q and k alone).
_HEAD_NORMS = ("q_norm", "k_norm")


# --------------------------------------------------------------------------------------------------
# Rotation matrices
# --------------------------------------------------------------------------------------------------
def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def hadamard_matrix(n: int) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix of size ``n`` (a power of two), float64: ``H H^T = I``."""
    if not _is_power_of_two(n):
        raise ValueError(f"a Sylvester Hadamard matrix needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h / math.sqrt(n)


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random ``n x n`` orthogonal matrix (float64): QR of a Gaussian, columns sign-fixed so the
    distribution does not depend on the QR implementation's sign convention."""
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs


def rotation_matrix(n: int, kind: str = "hadamard", generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """An ``n x n`` orthogonal matrix (float64).

    ``kind="hadamard"``: a randomised Hadamard ``diag(s) H / sqrt(n)`` (``s`` random signs) when ``n`` is
    a power of two, else a random orthogonal matrix; ``kind="orthogonal"``: always a random orthogonal
    matrix. ``generator`` (CPU) makes it reproducible.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown rotation kind {kind!r}; choose from {KINDS}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"rotation size must be a positive int, got {n!r}")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    if kind == "hadamard" and _is_power_of_two(n):
        return _RandomHadamard(_random_signs(n, generator)).dense()
    return random_orthogonal(n, generator)


def _random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` random +-1 (float64): the diagonal of a randomised Hadamard."""
    return torch.randint(0, 2, (n,), generator=generator).to(torch.float64) * 2 - 1


def _kind_of(n: int, kind: str) -> str:
    """What :func:`rotation_matrix` builds for size ``n``, for reports."""
    return "randomised hadamard" if kind == "hadamard" and _is_power_of_two(n) else "random orthogonal"


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """``x @ H`` for the unnormalised Sylvester Hadamard ``H`` of size ``n = x.shape[-1]`` (a power of two).

    ``H_n`` is a Kronecker power of one 2x2 block, so ``H_n = H_a (x) H_m`` with ``a * m = n``, both about
    ``sqrt(n)``: two matrix products of widths ``m`` and ``a`` (``n (a + m)`` multiply-adds per row instead
    of ``n^2``: 23x fewer at 2048, 45x at 8192), each one large GEMM, which BLAS runs at full speed
    (a butterfly per bit moves the whole tensor ``log n`` times and is slower on CPUs)."""
    n = x.shape[-1]
    m = 1 << ((n.bit_length() - 1) // 2)
    a = n // m
    h_m = hadamard_matrix(m).to(device=x.device, dtype=x.dtype) * math.sqrt(m)
    h_a = hadamard_matrix(a).to(device=x.device, dtype=x.dtype) * math.sqrt(a)
    # Contiguous first: a transposed input (Q^T W goes through W^T) would give BLAS strided rows, 10x slower.
    rows = x.reshape(-1, n).contiguous().view(-1, a, m) @ h_m  # index i = i_a * m + i_m: H_m acts on i_m
    rows = (rows.transpose(1, 2).reshape(-1, a) @ h_a).reshape(-1, m, a).transpose(1, 2)  # H_a on i_a
    return rows.reshape(x.shape)


@dataclass
class _RandomHadamard:
    """``Q = diag(signs) H / sqrt(n)``, kept as its signs and applied with :func:`_fwht`: at width 4096 it
    costs 32x fewer operations than the dense float64 product."""

    signs: torch.Tensor  # float64 [n], +-1

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Q`` (float64 ``x``)."""
        n = self.signs.numel()
        return _fwht(x * self.signs.to(x.device)) / math.sqrt(n)

    def dense(self) -> torch.Tensor:
        return self.signs[:, None] * hadamard_matrix(self.signs.numel())


Rotation = Any  # a dense float64 matrix or a _RandomHadamard


def _residual_rotation(n: int, kind: str, generator: torch.Generator) -> Rotation:
    """The residual rotation, drawing exactly what :func:`rotation_matrix` draws (so it is the same ``Q``),
    kept in the fast form when it is a randomised Hadamard."""
    if kind == "hadamard" and _is_power_of_two(n):
        return _RandomHadamard(_random_signs(n, generator))
    return rotation_matrix(n, kind, generator)


def _right(x: torch.Tensor, q: Rotation) -> torch.Tensor:
    """``x @ Q`` (float64)."""
    return q.right(x) if isinstance(q, _RandomHadamard) else x @ q.to(x.device)


def _left_t(q: Rotation, x: torch.Tensor) -> torch.Tensor:
    """``Q^T @ x`` (float64)."""
    return q.right(x.T).T if isinstance(q, _RandomHadamard) else q.to(x.device).T @ x


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Rotate(MethodConfig):
    """Fold orthogonal rotations into a Llama-style causal LM, exactly, before a quantizer:
    ``compress_(model, [Rotate(), RTN("int4", 64)])``.

    Args:
        seed: seeds every random sign and matrix (the same seed gives the same model).
        kind: ``"hadamard"`` (randomised Hadamard where the size is a power of two, else random
            orthogonal) or ``"orthogonal"`` (always random orthogonal).
        rotate_heads: also rotate each kv head's value vectors (``v_proj`` rows, ``o_proj`` columns).

    The model must have the Llama layout (``model.embed_tokens``, ``model.layers[i]`` with
    ``input_layernorm``, ``self_attn.{q,k,v,o}_proj``, ``post_attention_layernorm``,
    ``mlp.{gate,up,down}_proj``, ``model.norm``, ``lm_head``) with RMSNorms; anything else is refused
    with the module named, and the model is left as it was. Every module on the residual stream is
    rewritten, so ``include``/``exclude`` may not leave any of them out (put an exclude on the
    quantization stage instead). A tied ``lm_head`` is untied (``config.tie_word_embeddings = False``),
    which costs one more embedding-sized matrix; ``report.details`` (a :class:`RotateReport`) says how
    much. Hidden states *inside* the model (``output_hidden_states``) come out rotated; the logits
    do not.
    """

    name = "rotate"
    SCOPE = "model"  # the handler sees the whole model: every residual reader and writer at once
    reduces_stored_bytes = False  # a rewrite; untying a head even adds an embedding-sized matrix
    lossless = True  # the rotated model computes the same function (up to float rounding)

    seed: int = 0
    kind: str = "hadamard"
    rotate_heads: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown rotation kind {self.kind!r}; choose from {KINDS}")
        if not isinstance(self.rotate_heads, bool):
            raise ValueError(f"rotate_heads must be True or False, got {self.rotate_heads!r}")

    @classmethod
    def examples(cls) -> List["Rotate"]:
        # Not part of the generic contract matrix: its toy transformer uses LayerNorm with a bias, which
        # no rotation passes through exactly (Rotate refuses it), and a rewrite leaves plain Linears, not
        # compressed wrappers. tests/methods/test_rotate.py checks the same contract on Llama models
        # (all or nothing, save/load bit-exact, recipes, reports, the function preserved).
        return []

    def describe_targets(self) -> str:
        return "Llama-style decoder (embed_tokens, RMSNorms, attention and MLP Linears, lm_head)"

    def label(self) -> str:
        heads = "" if self.rotate_heads else ", no head rotation"
        return f"rotate {self.kind} (seed {self.seed}{heads})"

    def select_targets(self, model: nn.Module, include: Patterns, exclude: Patterns,
                       accept: Optional[Callable[[nn.Module], bool]] = None
                       ) -> Tuple[Dict[str, nn.Module], Dict[str, str]]:
        """Every module the rotation rewrites (all of them, or a clear error): the embedding, the norms,
        the attention and MLP Linears of every block and the head."""
        layout = find_layout(model)
        names = layout.all_names()
        include_list, exclude_list = _as_list(include), _as_list(exclude)
        left_out = [n for n in names if (include_list and not _matches(n, include_list))
                    or _matches(n, exclude_list)]
        if left_out:
            raise ValueError(f"rotate: include/exclude leave out {left_out[:4]}{' ...' if len(left_out) > 4 else ''}, "
                             "but the rotation must rewrite every module on the residual stream to keep the model's "
                             "function; give the exclude to the quantization stage instead "
                             "(llmopt.Stage(RTN(...), exclude=[...]))")
        return {n: model.get_submodule(n) for n in names}, {}


# --------------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------------
@dataclass
class _Block:
    """Full module names of one decoder block's residual readers and writers."""

    name: str
    input_norm: str
    post_norm: str
    q: str
    k: str
    v: str
    o: str
    gate: str
    up: str
    down: str

    def names(self) -> List[str]:
        return [self.input_norm, self.q, self.k, self.v, self.o, self.post_norm, self.gate, self.up, self.down]


@dataclass
class LlamaLayout:
    """Where a Llama-style causal LM keeps what the rotation rewrites, and its head layout."""

    embed: str
    blocks: List[_Block]
    final_norm: str
    head: str
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tied: bool

    def all_names(self) -> List[str]:
        return [self.embed] + [n for b in self.blocks for n in b.names()] + [self.final_norm, self.head]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _not_llama(why: str) -> ValueError:
    return ValueError(f"rotate: {why}. Rotate supports Llama-style causal LMs (model.embed_tokens, model.layers[i] "
                      "with input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, "
                      "mlp.{gate,up,down}_proj, then model.norm and lm_head; RMSNorm without bias)")


def _find_decoder(model: nn.Module) -> str:
    """Name of the module holding ``embed_tokens``, ``layers`` and ``norm`` (``"model"`` in HF)."""
    for name, module in model.named_modules():
        if all(hasattr(module, a) for a in ("embed_tokens", "layers", "norm")):
            return name
    found = type(model).__name__
    raise _not_llama(f"{found} has no module with embed_tokens, layers and norm")


def _check_linear(name: str, module: Any, in_features: Optional[int] = None,
                  out_features: Optional[int] = None) -> nn.Linear:
    if module is None:
        raise _not_llama(f"{name} is missing")
    if is_compressed(module):
        raise ValueError(f"rotate: {name} is already compressed ({type(module).__name__}); Rotate rewrites float "
                         "weights, so it must come before quantization in a recipe (e.g. [Rotate(), GPTQ(...)])")
    if not isinstance(module, nn.Linear):
        raise _not_llama(f"{name} is a {type(module).__name__}, not an nn.Linear")
    if module.weight.device.type == "meta":
        raise ValueError(f"rotate: {name}.weight is on the meta device")
    if not module.weight.is_floating_point():
        raise ValueError(f"rotate: {name}.weight has dtype {module.weight.dtype}, not a float dtype")
    for what, size in (("in_features", in_features), ("out_features", out_features)):
        if size is not None and getattr(module, what) != size:
            raise _not_llama(f"{name} has {what}={getattr(module, what)}, expected {size}")
    return module


def _check_norm(name: str, module: Any, hidden: int) -> None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (hidden,):
        raise _not_llama(f"{name} ({type(module).__name__}) has no weight of shape [{hidden}]")
    if getattr(module, "bias", None) is not None:
        raise ValueError(f"rotate: {name} ({type(module).__name__}) has a bias: a norm that adds a bias (LayerNorm) "
                         "does not commute with a rotation; Rotate supports RMSNorm-style models only")
    extra = [n for n, _ in module.named_parameters() if n != "weight"]
    if extra:
        raise _not_llama(f"{name} ({type(module).__name__}) has parameters {extra} besides weight")


def _child(parent: nn.Module, parent_name: str, attr: str) -> Any:
    module = getattr(parent, attr, None)
    if module is None:
        raise _not_llama(f"{parent_name} has no {attr}")
    return module


def _int(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def find_layout(model: nn.Module) -> LlamaLayout:
    """The :class:`LlamaLayout` of ``model``, or a ``ValueError`` naming the module that does not fit."""
    dec_name = _find_decoder(model)
    decoder = model.get_submodule(dec_name) if dec_name else model
    embed_name = _join(dec_name, "embed_tokens")
    embed = decoder.embed_tokens
    if is_compressed(embed):
        raise ValueError(f"rotate: {embed_name} is already compressed ({type(embed).__name__}); run Rotate before "
                         "quantizing embeddings (embeddings=... quantizes them before the first stage: rotate in "
                         "an earlier compress_ call)")
    if not isinstance(embed, nn.Embedding):
        raise _not_llama(f"{embed_name} is a {type(embed).__name__}, not an nn.Embedding")
    if embed.weight.device.type == "meta":
        raise ValueError(f"rotate: {embed_name}.weight is on the meta device")
    if embed.max_norm is not None:
        raise ValueError(f"rotate: {embed_name} renormalises rows on lookup (max_norm), which a rotation of its "
                         "rows would not reproduce")
    hidden = embed.embedding_dim
    layers = decoder.layers
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise _not_llama(f"{_join(dec_name, 'layers')} is not a non-empty nn.ModuleList")
    head_name = "lm_head"
    head = getattr(model, "lm_head", None)
    if head is None:
        raise _not_llama(f"{type(model).__name__} has no lm_head (a base model's hidden states would come out rotated)")
    _check_linear(head_name, head, in_features=hidden)
    expected_top = {embed_name, _join(dec_name, "norm"), head_name}
    for name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)) and name not in expected_top \
                and not name.startswith(_join(dec_name, "layers") + "."):
            raise _not_llama(f"{name or type(model).__name__} ({type(module).__name__}) holds parameters outside "
                             "the decoder blocks that Rotate does not know how to rotate")
    final_norm = _join(dec_name, "norm")
    _check_norm(final_norm, decoder.norm, hidden)

    config = getattr(model, "config", None)
    blocks = []
    layout_heads: Optional[Tuple[int, int, int]] = None
    for i, block in enumerate(layers):
        bname = _join(dec_name, f"layers.{i}")
        attn, mlp = _child(block, bname, "self_attn"), _child(block, bname, "mlp")
        b = _Block(bname, _join(bname, "input_layernorm"), _join(bname, "post_attention_layernorm"),
                   *(_join(bname, f"self_attn.{p}_proj") for p in "qkvo"),
                   *(_join(bname, f"mlp.{p}_proj") for p in ("gate", "up", "down")))
        for norm_attr, norm_name in (("input_layernorm", b.input_norm), ("post_attention_layernorm", b.post_norm)):
            _check_norm(norm_name, _child(block, bname, norm_attr), hidden)
        q, k, v = (_check_linear(n, getattr(attn, f"{p}_proj", None), in_features=hidden)
                   for n, p in ((b.q, "q"), (b.k, "k"), (b.v, "v")))
        o = _check_linear(b.o, getattr(attn, "o_proj", None), out_features=hidden)
        gate = _check_linear(b.gate, getattr(mlp, "gate_proj", None), in_features=hidden)
        up = _check_linear(b.up, getattr(mlp, "up_proj", None), in_features=hidden, out_features=gate.out_features)
        _check_linear(b.down, getattr(mlp, "down_proj", None), in_features=up.out_features, out_features=hidden)
        known = set(b.names()) | {_join(_join(bname, "self_attn"), n) for n in _HEAD_NORMS}
        for name, module in block.named_modules():
            full = _join(bname, name)
            if any(True for _ in module.parameters(recurse=False)) and full not in known:
                raise _not_llama(f"{full} ({type(module).__name__}) holds parameters Rotate does not know how to "
                                 "rotate")
        # Head layout: the attention module's head_dim (HF), else the config's, else hidden / heads.
        d = _int(getattr(attn, "head_dim", None)) or _int(getattr(config, "head_dim", None))
        heads_cfg = _int(getattr(config, "num_attention_heads", None))
        if d is None and heads_cfg:
            d = hidden // heads_cfg
        if d is None:
            raise _not_llama(f"{bname}.self_attn: head_dim unknown (no head_dim attribute, no config)")
        if q.out_features % d or k.out_features % d or v.out_features != k.out_features or o.in_features != q.out_features:
            raise _not_llama(f"{bname}.self_attn: q/k/v/o shapes {q.out_features}/{k.out_features}/{v.out_features}/"
                             f"{o.in_features} do not fit head_dim={d}")
        heads, kv = q.out_features // d, v.out_features // d
        if heads % kv:
            raise _not_llama(f"{bname}.self_attn: {heads} query heads are not a multiple of {kv} kv heads")
        if layout_heads is not None and layout_heads != (heads, kv, d):
            raise _not_llama(f"{bname}.self_attn: head layout {(heads, kv, d)} differs from the first block's "
                             f"{layout_heads}")
        layout_heads = (heads, kv, d)
        blocks.append(b)
    assert layout_heads is not None
    tied = head.weight is embed.weight
    return LlamaLayout(embed_name, blocks, final_norm, head_name, hidden, *layout_heads, tied=tied)


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
@dataclass
class RotateReport:
    """What :class:`Rotate` did: the rotations, the folded norms, the untied head and its cost."""

    hidden_size: int
    residual_rotation: str
    head_dim: int
    head_rotation: Optional[str]
    blocks: int
    norms_folded: List[str] = field(default_factory=list)
    untied_head: bool = False
    extra_bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        heads = (f"value heads rotated ({self.head_rotation}, {self.head_dim}x{self.head_dim})"
                 if self.head_rotation else "value heads left alone")
        text = (f"residual stream rotated ({self.residual_rotation}, {self.hidden_size}x{self.hidden_size}) "
                f"in {self.blocks} blocks, {len(self.norms_folded)} norm gains folded, {heads}")
        if self.untied_head:
            text += f"; lm_head untied from the embedding (+{self.extra_bytes / 2**20:.2f} MiB)"
        return text + f" in {self.seconds:.2f} s"


# --------------------------------------------------------------------------------------------------
# Weight arithmetic (float64, chunked, cast back)
# --------------------------------------------------------------------------------------------------
def _times_right(weight: torch.Tensor, q: Rotation, column_scale: Optional[torch.Tensor] = None,
                 dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``(weight * column_scale) @ Q`` in float64, row chunk by row chunk, returned in ``dtype``
    (default: ``weight``'s)."""
    out = torch.empty(weight.shape, dtype=dtype or weight.dtype, device=weight.device)
    scale = None if column_scale is None else column_scale.to(device=weight.device, dtype=torch.float64)
    for start in range(0, weight.shape[0], _CHUNK):
        rows = weight[start:start + _CHUNK].to(torch.float64)
        if scale is not None:
            rows = rows * scale
        out[start:start + _CHUNK] = _right(rows, q).to(out.dtype)
    return out


def _times_left_t(q: Rotation, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``Q^T @ weight`` in float64, column chunk by column chunk, returned in ``dtype``."""
    out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    for start in range(0, weight.shape[1], _CHUNK):
        out[:, start:start + _CHUNK] = _left_t(q, weight[:, start:start + _CHUNK].to(torch.float64)).to(dtype)
    return out


def _block_diag_right(weight: torch.Tensor, rotations: List[torch.Tensor], block_of: List[int]) -> torch.Tensor:
    """``weight`` with its column block ``h`` (width d) multiplied by ``rotations[block_of[h]]`` (float64)."""
    d = rotations[0].shape[0]
    w = weight.to(torch.float64)
    return torch.cat([w[:, h * d:(h + 1) * d] @ rotations[j].to(w.device) for h, j in enumerate(block_of)], dim=1)


def _block_diag_left(weight: torch.Tensor, rotations: List[torch.Tensor]) -> torch.Tensor:
    """``weight`` (float64) with its row block ``j`` multiplied on the left by ``rotations[j]^T``."""
    d = rotations[0].shape[0]
    return torch.cat([rotations[j].to(weight.device).T @ weight[j * d:(j + 1) * d] for j in range(len(rotations))],
                     dim=0)


def _with_params(module: nn.Module, **tensors: Optional[torch.Tensor]) -> nn.Module:
    """A shallow copy of ``module`` (same class, attributes and submodules) holding new parameters:
    the original is never modified, so ``compress_`` can swap it back if the call fails."""
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    for name, tensor in tensors.items():
        old = module._parameters[name]
        new._parameters[name] = None if tensor is None else nn.Parameter(
            tensor, requires_grad=old.requires_grad if old is not None else False)
    return new


def _unit_norm(name: str, norm: nn.Module) -> nn.Module:
    """The norm with its weight set to ones, after checking it then computes ``x / rms(x)``: a norm that
    centres (LayerNorm) or adds to its weight (Gemma's ``1 + w``) would make the folding wrong."""
    weight = norm.weight
    new = _with_params(norm, weight=torch.ones_like(weight))
    gen = torch.Generator().manual_seed(0)
    # An offset makes a centring norm differ by O(1); the scale keeps eps negligible.
    x = (torch.randn(4, weight.numel(), generator=gen, dtype=torch.float64) + 1.0).to(weight.device, weight.dtype)
    with torch.no_grad():
        got = new(x).to(torch.float64)
    x64 = x.to(torch.float64)
    want = x64 / x64.pow(2).mean(dim=-1, keepdim=True).sqrt()
    rel = ((got - want).norm() / want.norm()).item()
    tol = 1e-3 if weight.dtype in (torch.float32, torch.float64) else 3e-2
    if not rel <= tol:
        raise ValueError(f"rotate: {name} ({type(norm).__name__}) with unit weight does not compute x / rms(x) "
                         f"(relative difference {rel:.2g}): it centres its input (LayerNorm) or scales by something "
                         "other than its weight, so its gain cannot be folded; Rotate supports RMSNorm only")
    return new


# --------------------------------------------------------------------------------------------------
# Handler: plan the edit, change nothing
# --------------------------------------------------------------------------------------------------
@register_method(Rotate)
def _plan_rotation(model: nn.Module, config: Rotate, *, targets: Mapping[str, nn.Module], **_: Any) -> ModelEdit:
    start = time.perf_counter()
    layout = find_layout(model)
    missing = [n for n in layout.all_names() if n not in targets]
    if missing:  # select_targets returns them all; another caller might not
        raise ValueError(f"rotate: the rotation must rewrite {missing[:4]}, which are not among the targets")
    get = model.get_submodule
    generator = torch.Generator().manual_seed(config.seed)
    q = _residual_rotation(layout.hidden, config.kind, generator)
    rep = layout.num_heads // layout.num_kv_heads
    head_of = [h // rep for h in range(layout.num_heads)]  # query head -> its kv head (HF repeat_kv order)
    new: Dict[str, nn.Module] = {}
    folded: List[str] = []

    def reader(name: str, gain: Optional[torch.Tensor], rows: Optional[List[torch.Tensor]] = None) -> None:
        """A Linear reading the (normed) residual: W <- W diag(g) Q; value heads: then R_j^T on row blocks."""
        lin = get(name)
        dtype = lin.weight.dtype
        with torch.no_grad():
            bias = lin.bias.detach().clone() if lin.bias is not None else None
            if rows is None:
                w = _times_right(lin.weight.detach(), q, gain)
            else:  # one rounding: the residual and head rotations both in float64
                w = _block_diag_left(_times_right(lin.weight.detach(), q, gain, torch.float64), rows).to(dtype)
                if bias is not None:  # b_j <- b_j R_j
                    d, b64 = layout.head_dim, bias.to(torch.float64)
                    bias = torch.cat([b64[j * d:(j + 1) * d] @ rows[j].to(b64.device) for j in range(len(rows))]
                                     ).to(bias.dtype)
            new[name] = _with_params(lin, weight=w, bias=bias)

    def writer(name: str, cols: Optional[List[torch.Tensor]] = None) -> None:
        """A Linear writing the residual: W <- Q^T W, b <- b Q; o_proj: first its head columns times R_j."""
        lin = get(name)
        dtype = lin.weight.dtype
        with torch.no_grad():
            w = lin.weight.detach()
            if cols is not None:
                w = _block_diag_right(w, cols, head_of)  # float64
            w = _times_left_t(q, w, dtype)
            bias = None
            if lin.bias is not None:
                bias = _times_right(lin.bias.detach()[None, :], q)[0]
            new[name] = _with_params(lin, weight=w, bias=bias)

    embed = get(layout.embed)
    with torch.no_grad():
        new[layout.embed] = _with_params(embed, weight=_times_right(embed.weight.detach(), q))
    for b in layout.blocks:
        heads = ([rotation_matrix(layout.head_dim, config.kind, generator) for _ in range(layout.num_kv_heads)]
                 if config.rotate_heads else None)
        g_in = get(b.input_norm).weight.detach()
        g_post = get(b.post_norm).weight.detach()
        for n in (b.q, b.k):
            reader(n, g_in)
        reader(b.v, g_in, heads)
        writer(b.o, heads)
        reader(b.gate, g_post)
        reader(b.up, g_post)
        writer(b.down)
        for norm_name in (b.input_norm, b.post_norm):
            new[norm_name] = _unit_norm(norm_name, get(norm_name))
            folded.append(norm_name)
    reader(layout.head, get(layout.final_norm).weight.detach())  # from E itself when tied: the head is untied
    new[layout.final_norm] = _unit_norm(layout.final_norm, get(layout.final_norm))
    folded.append(layout.final_norm)

    config_changes: Dict[str, Any] = {}
    hf_config = getattr(model, "config", None)
    if getattr(hf_config, "tie_word_embeddings", False):
        # Else transformers (save_pretrained / from_pretrained / tie_weights) would tie them again.
        config_changes["tie_word_embeddings"] = False
    extra = embed.weight.numel() * embed.weight.element_size() if layout.tied else 0
    report = RotateReport(
        hidden_size=layout.hidden, residual_rotation=_kind_of(layout.hidden, config.kind), head_dim=layout.head_dim,
        head_rotation=_kind_of(layout.head_dim, config.kind) if config.rotate_heads else None,
        blocks=len(layout.blocks), norms_folded=folded, untied_head=layout.tied, extra_bytes=extra,
        seconds=time.perf_counter() - start)
    notes = [str(report)]
    if layout.tied:
        notes.append(f"{layout.head} was tied to {layout.embed}; it now holds its own rotated copy "
                     f"(+{extra:,} bytes) and config.tie_word_embeddings is False")
    return ModelEdit(modules=new, config=config_changes, details=report, notes=notes)
