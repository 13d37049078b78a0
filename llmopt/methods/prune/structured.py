"""Structured pruning: remove whole MLP channels or attention heads, leaving smaller plain ``nn.Linear``s.

Two model-scope methods: ``llmopt.compress_(model, PruneChannels(0.25))`` removes a fraction of each
block's MLP intermediate channels, ``llmopt.compress_(model, PruneHeads(0.5))`` a fraction of its
attention kv groups. Their handlers only plan: they return the smaller layers and the attribute and
config changes as a :class:`~llmopt.methods.base.ModelEdit`, which ``compress_`` applies (all or
nothing, undone if a later stage fails) and records so ``llmopt.save``/``load`` rebuild the shapes.
``include``/``exclude`` restrict what may be pruned: a group is pruned only if all its layers are
targeted.

Unlike masks (unstructured, N:M), removing a channel shrinks the matrices themselves, so every
kernel runs faster and every byte is saved without a special format. The price is coupling: an MLP
channel ``c`` is row ``c`` of every producer (gate/up) *and* column ``c`` of the consumer (down); an
attention head is rows of q/k/v and columns of o. Remove all of them together and the block computes
exactly what it computed with those channels zeroed.

Coupling is found generically, from shapes inside each repeated block (the model's largest
``nn.ModuleList`` of one class, :func:`llmopt.calibration.find_blocks`); no per-architecture table:

* **MLP group**: producers = the Linears with ``in == hidden`` and ``out == I`` (gate/up; one for a
  plain MLP), consumer = the one Linear with ``in == I`` and ``out == hidden`` (down), ``I != hidden``.
  Matched per parent module first (each MoE expert is its own group), then over the whole block.
* **Attention group**: head counts and ``head_dim`` from the attention module's attributes
  (``num_heads``/``n_heads``/``num_attention_heads``, ``num_key_value_heads``/``n_kv_heads``/...,
  ``head_dim``), else the model config. q: ``hidden -> H*d``; k, v: ``hidden -> KV*d``; o:
  ``H*d -> hidden``. When several Linears fit the o slot (multi-head attention, all square), the one
  named like ``o``/``o_proj``/``out_proj``/``dense`` wins, else the last registered (HF convention);
  q/k/v are interchangeable for pruning when they have equal shapes, so their order does not matter.
* Anything else (fused qkv, GPT-2's ``Conv1D``, ``I == hidden``) is not guessed: pass ``groups=`` with
  :class:`MLPGroup` / :class:`AttentionGroup` naming the layers (relative to the block; stored in the
  config in their dict form, so a recipe can carry them).

Under grouped-query attention a kv head is removed together with its ``H/KV`` query heads (a "kv
group"), so ``num_key_value_groups`` stays what it was and HF's ``repeat_kv`` keeps working.

Importance (higher = keep): ``"magnitude"`` (L2 norm of the unit's weights across the coupled
matrices), ``"wanda"`` (Wanda-sp: ``sum_i |W_out[i, j]| * ||X_j||`` over the unit's consumer columns,
``X`` = the consumer's calibration input), ``"fluctuation"`` (FLAP: ``Var(X_j) * ||W_out[:, j]||^2``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ...calibration import StatsSpec, collect_stats, find_blocks
from ...core.checks import check_fields
from ...core.measure import total_parameters
from ...core.targets import is_compressed
from ..base import MethodConfig, ModelEdit, register_method

__all__ = [
    "PruneChannels", "PruneHeads", "MLPGroup", "AttentionGroup", "BlockGroups", "StructuredReport", "find_groups",
    "group_from_dict", "channel_importance", "head_importance", "IMPORTANCES",
]

IMPORTANCES = ("magnitude", "wanda", "fluctuation")
_HEADS_ATTRS = ("num_heads", "n_heads", "num_attention_heads", "n_head")
_KV_ATTRS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "n_kv_head")
_HEAD_DIM_ATTRS = ("head_dim", "head_size")
_O_NAME = re.compile(r"(^|[._])(o|o_proj|out_proj|out|dense|wo|c_proj)$")


# --------------------------------------------------------------------------------------------------
# Groups
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MLPGroup:
    """Coupled MLP layers: ``inputs`` (gate/up, rows = channels) feed ``output`` (down, columns = channels).

    Names are relative to the block (``"mlp.gate_proj"``). An ``intermediate_size`` attribute of the
    consumer's parent module (HF's ``LlamaMLP``) follows the new width.
    """

    inputs: Tuple[str, ...]
    output: str

    def __post_init__(self):
        inputs = [self.inputs] if isinstance(self.inputs, str) else self.inputs
        object.__setattr__(self, "inputs", tuple(inputs))
        if not self.inputs:
            raise ValueError("MLPGroup needs at least one input layer (gate/up)")

    def to_dict(self) -> Dict[str, Any]:
        """``{"kind": "mlp", "inputs": [...], "output": ...}`` (JSON), the form a config stores."""
        return {"kind": "mlp", "inputs": list(self.inputs), "output": self.output}


@dataclass(frozen=True)
class AttentionGroup:
    """Coupled attention layers (names relative to the block) and the head layout.

    ``num_kv_heads`` defaults to ``num_heads`` (multi-head attention). ``module``: the (relative) name
    of the module whose head-count attributes must be updated (``None``: found automatically).
    """

    q: str
    k: str
    v: str
    o: str
    num_heads: int
    head_dim: int
    num_kv_heads: Optional[int] = None
    module: Optional[str] = None

    def __post_init__(self):
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        for what in ("num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, what)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"AttentionGroup.{what} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"AttentionGroup: num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")

    def to_dict(self) -> Dict[str, Any]:
        """``{"kind": "attention", "q": ..., ...}`` (JSON), the form a config stores."""
        return {"kind": "attention", **dataclasses.asdict(self)}


_GROUP_KINDS = {"mlp": MLPGroup, "attention": AttentionGroup}


def group_from_dict(data: Union[MLPGroup, AttentionGroup, Mapping[str, Any]]) -> Union[MLPGroup, AttentionGroup]:
    """A group from its :meth:`~MLPGroup.to_dict` form (a group object passes through)."""
    if isinstance(data, (MLPGroup, AttentionGroup)):
        return data
    if not isinstance(data, Mapping):
        raise TypeError(f"groups: expected MLPGroup or AttentionGroup (or its dict form), got {type(data).__name__}")
    if data.get("kind") not in _GROUP_KINDS:
        raise ValueError(f"groups: a group dict needs 'kind' in {sorted(_GROUP_KINDS)}, got {dict(data)!r}")
    cls = _GROUP_KINDS[data["kind"]]
    options = {k: v for k, v in data.items() if k != "kind"}
    check_fields(cls, options, f"groups: {cls.__name__}", noun="field(s)")
    return cls(**options)


@dataclass
class BlockGroups:
    """The groups found in one block."""

    index: int
    name: str
    mlp: List[MLPGroup] = field(default_factory=list)
    attention: List[AttentionGroup] = field(default_factory=list)


def _linears(block: nn.Module) -> Dict[str, nn.Linear]:
    return {n: m for n, m in block.named_modules() if n and isinstance(m, nn.Linear)
            and not is_compressed(m)}


def _conv1d_names(block: nn.Module) -> List[str]:
    return [n for n, m in block.named_modules() if type(m).__name__ == "Conv1D"]


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _int_attr(module: nn.Module, names: Sequence[str]) -> Optional[Tuple[str, int]]:
    for a in names:
        v = getattr(module, a, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return a, v
    return None


def _hidden_size(model: nn.Module, lin: Dict[str, nn.Linear]) -> int:
    cfg = getattr(model, "config", None)
    h = getattr(cfg, "hidden_size", None)
    if isinstance(h, int) and any(m.in_features == h for m in lin.values()):
        return h
    counts: Dict[int, int] = {}
    for m in lin.values():
        counts[m.in_features] = counts.get(m.in_features, 0) + 1
    return max(counts, key=lambda k: (counts[k], -k))


def _head_layout(model: nn.Module, block: nn.Module, hidden: int) -> Optional[Tuple[str, int, int, int]]:
    """``(module_name, heads, kv_heads, head_dim)`` from a module inside the block, else the config."""
    for name, module in block.named_modules():  # the block itself first ("" = a flat block)
        heads = _int_attr(module, _HEADS_ATTRS)
        if heads is None:
            continue
        kv = _int_attr(module, _KV_ATTRS)
        hd = _int_attr(module, _HEAD_DIM_ATTRS)
        cfg = getattr(module, "config", None) or getattr(model, "config", None)
        nkv = kv[1] if kv else getattr(cfg, "num_key_value_heads", None) or heads[1]
        d = hd[1] if hd else getattr(cfg, "head_dim", None) or hidden // heads[1]
        return name, heads[1], int(nkv), int(d)
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if isinstance(heads, int) and heads > 0:
        nkv = getattr(cfg, "num_key_value_heads", None) or heads
        d = getattr(cfg, "head_dim", None) or hidden // heads
        # The module holding the head_dim attribute (HF attention) is the one whose attributes follow.
        owner = next((n for n, m in block.named_modules() if _int_attr(m, _HEAD_DIM_ATTRS)), None)
        return owner, heads, int(nkv), int(d)
    return None


def _find_attention(lin: Dict[str, nn.Linear], hidden: int, layout) -> Optional[AttentionGroup]:
    owner, heads, nkv, d = layout
    if heads % nkv:
        return None
    names = list(lin)
    q_c = [n for n in names if lin[n].in_features == hidden and lin[n].out_features == heads * d]
    kv_c = [n for n in names if lin[n].in_features == hidden and lin[n].out_features == nkv * d]
    o_c = [n for n in names if lin[n].in_features == heads * d and lin[n].out_features == hidden]
    if not o_c:
        return None
    hinted = [n for n in o_c if _O_NAME.search(n)]
    o = hinted[0] if len(hinted) == 1 else o_c[-1]
    q_c = [n for n in q_c if n != o]
    kv_c = [n for n in kv_c if n != o]
    if heads == nkv:  # q, k, v have one shape: the first three in registration order
        if len(q_c) != 3:
            return None
        q, k, v = q_c
    else:
        if len(q_c) != 1 or len(kv_c) != 2:
            return None
        q, (k, v) = q_c[0], kv_c
    if owner is None:
        owner = _parent(o)
    return AttentionGroup(q=q, k=k, v=v, o=o, num_heads=heads, num_kv_heads=nkv, head_dim=d, module=owner)


def _match_mlp(names: List[str], lin: Dict[str, nn.Linear], hidden: int) -> List[MLPGroup]:
    groups = []
    consumers = [n for n in names if lin[n].out_features == hidden and lin[n].in_features != hidden]
    by_size: Dict[int, List[str]] = {}
    for n in consumers:
        by_size.setdefault(lin[n].in_features, []).append(n)
    for size, outs in by_size.items():
        if len(outs) != 1:
            continue  # two consumers of one width in one scope: ambiguous here
        ins = [n for n in names if lin[n].in_features == hidden and lin[n].out_features == size]
        if ins:
            groups.append(MLPGroup(inputs=tuple(ins), output=outs[0]))
    return groups


def _find_mlp(lin: Dict[str, nn.Linear], hidden: int, taken: set) -> List[MLPGroup]:
    free = [n for n in lin if n not in taken]
    groups: List[MLPGroup] = []
    by_parent: Dict[str, List[str]] = {}
    for n in free:
        by_parent.setdefault(_parent(n), []).append(n)
    for names in by_parent.values():
        groups += _match_mlp(names, lin, hidden)
    used = {n for g in groups for n in (*g.inputs, g.output)}
    groups += _match_mlp([n for n in free if n not in used], lin, hidden)
    return groups


def find_groups(model: nn.Module, groups: Union[None, Sequence, Mapping[int, Sequence]] = None,
                blocks_path: Optional[str] = None) -> List[BlockGroups]:
    """The coupled layer groups of every block (see the module docstring for the rules).

    ``groups`` overrides discovery: a list of :class:`MLPGroup`/:class:`AttentionGroup` (or their dict
    forms; names relative to each block) used for every block, or ``{block_index: [...]}`` (an int or
    its string, as JSON writes it). ``blocks_path`` names the
    ``ModuleList`` of blocks when the automatic search picks the wrong one.
    """
    path, blocks = find_blocks(model, blocks_path, argument="blocks_path")
    out = []
    for i, block in enumerate(blocks):
        name = f"{path}.{i}" if path else str(i)
        lin = _linears(block)
        override = groups.get(i, groups.get(str(i))) if isinstance(groups, Mapping) else groups
        if override is not None:
            bg = BlockGroups(i, name)
            for g in map(group_from_dict, override):
                if isinstance(g, MLPGroup):
                    bg.mlp.append(g)
                else:
                    bg.attention.append(g)
                for n in ((*g.inputs, g.output) if isinstance(g, MLPGroup) else (g.q, g.k, g.v, g.o)):
                    if n not in lin:
                        raise ValueError(f"block {name}: override names {n!r}, which is not an nn.Linear "
                                         f"in the block (Linears: {sorted(lin)[:12]})")
            out.append(bg)
            continue
        bg = BlockGroups(i, name)
        if not lin:
            conv = _conv1d_names(block)
            hint = (f"; it has GPT-2-style Conv1D layers {conv[:4]}, which structured pruning does not "
                    "support (convert them to nn.Linear first)") if conv else ""
            raise ValueError(f"block {name} has no nn.Linear layers{hint}")
        hidden = _hidden_size(model, lin)
        layout = _head_layout(model, block, hidden)
        if layout is not None:
            att = _find_attention(lin, hidden, layout)
            if att is not None:
                bg.attention.append(att)
        taken = {n for a in bg.attention for n in (a.q, a.k, a.v, a.o)}
        bg.mlp = _find_mlp(lin, hidden, taken)
        out.append(bg)
    return out


# --------------------------------------------------------------------------------------------------
# Importance
# --------------------------------------------------------------------------------------------------
@dataclass
class _InputStats:
    """Per-column input statistics of one consumer layer (float64)."""

    count: int
    sq_sum: torch.Tensor
    sum: Optional[torch.Tensor] = None

    def norm(self) -> torch.Tensor:
        return self.sq_sum.sqrt()

    def variance(self) -> torch.Tensor:
        mean = self.sum / self.count
        return (self.sq_sum / self.count - mean * mean).clamp_min(0)


def _check_weights(name: str, m: nn.Linear) -> None:
    if m.weight.device.type == "meta":
        raise ValueError(f"layer {name!r}: weight is on the meta device")
    if not torch.isfinite(m.weight).all():
        raise ValueError(f"layer {name!r}: weight has NaN or Inf values")
    if m.bias is not None and not torch.isfinite(m.bias).all():
        raise ValueError(f"layer {name!r}: bias has NaN or Inf values")


def _finite(scores: torch.Tensor, name: str) -> torch.Tensor:
    if not torch.isfinite(scores).all():
        raise ValueError(f"layer {name!r}: importance scores are NaN or Inf (non-finite calibration "
                         "activations?)")
    return scores


def _collect(model: nn.Module, calibration, names: List[str], need_sum: bool) -> Dict[str, _InputStats]:
    """Column statistics of the inputs of ``names`` (full names) from plain forwards of the model."""
    batches = list(calibration) if calibration is not None else []
    if not batches:
        raise ValueError("activation-aware importance needs calibration batches (calibration=[...]); "
                         "got none")
    sums: Dict[str, torch.Tensor] = {}
    handles = []
    if need_sum:  # LayerStats keeps sums of squares and of |x|, not of x: add that one here
        def hook(name):
            def fn(module, args):
                x = args[0].detach().reshape(-1, module.in_features).to(torch.float64)
                s = x.sum(dim=0)
                sums[name] = sums[name] + s if name in sums else s
            return fn
        for n in names:
            handles.append(model.get_submodule(n).register_forward_pre_hook(hook(n)))
    try:
        stats = collect_stats(model, batches, StatsSpec(hessian=False), include=names)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n in names:
        st = stats.get(n)
        if st is None or st.count == 0:
            raise ValueError(f"layer {n!r} received no inputs during calibration")
        out[n] = _InputStats(st.count, st.col_sq_sum.to(torch.float64).cpu(),
                             sums[n].cpu() if need_sum else None)
    return out


def channel_importance(producers: Sequence[nn.Linear], consumer: nn.Linear, importance: str = "magnitude",
                       stats: Optional[_InputStats] = None) -> torch.Tensor:
    """Score per MLP channel (float64, length ``consumer.in_features``); higher = more important."""
    w_out = consumer.weight.detach().to(torch.float64).cpu()
    if importance == "magnitude":
        sq = w_out.pow(2).sum(dim=0)
        for p in producers:
            sq = sq + p.weight.detach().to(torch.float64).cpu().pow(2).sum(dim=1)
        return sq.sqrt()
    if stats is None:
        raise ValueError(f"importance={importance!r} needs calibration statistics")
    if importance == "wanda":
        return w_out.abs().sum(dim=0) * stats.norm()
    if importance == "fluctuation":
        return stats.variance() * w_out.pow(2).sum(dim=0)
    raise ValueError(f"unknown importance {importance!r}; choose from {IMPORTANCES}")


def head_importance(q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, group: AttentionGroup,
                    importance: str = "magnitude", stats: Optional[_InputStats] = None) -> torch.Tensor:
    """Score per kv group (float64, length ``num_kv_heads``): a kv head with its query heads."""
    kv = group.num_kv_heads
    w_o = o.weight.detach().to(torch.float64).cpu()  # [hidden, H*d]: columns grouped by kv group
    if importance == "magnitude":
        def rows(lin):  # [KV, ...] sums of squares of each group's rows
            w = lin.weight.detach().to(torch.float64).cpu()
            return w.pow(2).reshape(kv, -1).sum(dim=1)
        cols = w_o.pow(2).sum(dim=0).reshape(kv, -1).sum(dim=1)
        return (rows(q) + rows(k) + rows(v) + cols).sqrt()
    if stats is None:
        raise ValueError(f"importance={importance!r} needs calibration statistics")
    if importance == "wanda":
        per_col = w_o.abs().sum(dim=0) * stats.norm()
    elif importance == "fluctuation":
        per_col = stats.variance() * w_o.pow(2).sum(dim=0)
    else:
        raise ValueError(f"unknown importance {importance!r}; choose from {IMPORTANCES}")
    return per_col.reshape(kv, -1).sum(dim=1)


# --------------------------------------------------------------------------------------------------
# Ratios -> kept counts
# --------------------------------------------------------------------------------------------------
def _check_ratio(r: Any, where: str) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
        raise ValueError(f"{where}: ratio must be a finite number in [0, 1), got {r!r}")
    if not 0 <= r < 1:
        raise ValueError(f"{where}: ratio must be in [0, 1) (the fraction removed), got {r!r}")
    return float(r)


def _block_ratios(blocks: List[BlockGroups], ratio, ratios) -> Dict[int, float]:
    if (ratio is None) == (ratios is None):
        raise ValueError("give exactly one of ratio=... (every block) or ratios={block: ratio}")
    if ratios is None:
        r = _check_ratio(ratio, "ratio")
        return {b.index: r for b in blocks}
    if not isinstance(ratios, Mapping):
        raise TypeError(f"ratios must be a dict {{block index or name: ratio}}, got {type(ratios).__name__}")
    by_name = {b.name: b.index for b in blocks}
    out = {b.index: 0.0 for b in blocks}
    for key, r in ratios.items():
        if isinstance(key, int) and not isinstance(key, bool) and 0 <= key < len(blocks):
            idx = key
        elif isinstance(key, str) and key in by_name:
            idx = by_name[key]
        elif isinstance(key, str) and key.isdigit() and int(key) < len(blocks):
            idx = int(key)
        else:
            raise ValueError(f"ratios: unknown block {key!r}; blocks are 0..{len(blocks) - 1} "
                             f"({blocks[0].name} ...)")
        out[idx] = _check_ratio(r, f"ratios[{key!r}]")
    return out


def _round_keep(keep: int, n: int, round_to: int, where: str) -> int:
    if round_to > 1:
        if round_to > n:
            raise ValueError(f"{where}: round_to={round_to} exceeds the {n} channels there")
        keep = max(round_to, int(round(keep / round_to)) * round_to)
        if keep > n:
            keep = n if n % round_to == 0 else (n // round_to) * round_to
    return max(1, min(n, keep))


def _uniform_keep(n: int, r: float, round_to: int, where: str) -> int:
    if r == 0:
        return n
    return _round_keep(n - int(round(r * n)), n, round_to, where)


def _adaptive_keep(scores: Dict[Any, torch.Tensor], ratio: float, min_keep: float,
                   round_to: int) -> Dict[Any, int]:
    """Global ranking of per-group normalized scores; ``ratio`` of all units removed, floors kept."""
    keys = list(scores)
    sizes = {k: scores[k].numel() for k in keys}
    total = sum(sizes.values())
    to_remove = int(round(ratio * total))
    floors = {k: max(1, int(math.ceil(min_keep * sizes[k]))) for k in keys}
    # Normalize per group (mean 1) so layers of different scale compete fairly (FLAP-style).
    entries = []
    for k in keys:
        s = scores[k]
        mean = s.mean()
        norm = s / mean if mean > 0 else torch.zeros_like(s)
        entries += [(float(v), k) for v in torch.sort(norm).values.tolist()]
    entries.sort(key=lambda e: e[0])
    removed = {k: 0 for k in keys}
    for _, k in entries:
        if to_remove == 0:
            break
        if sizes[k] - removed[k] > floors[k]:
            removed[k] += 1
            to_remove -= 1
    return {k: _round_keep(sizes[k] - removed[k], sizes[k], round_to, str(k)) for k in keys}


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
@dataclass
class StructuredReport:
    """What a structured prune removed: per block ``{params_before, params_after, kept, total}``."""

    target: str
    importance: str
    blocks: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    linear_params_before: int = 0
    linear_params_after: int = 0

    @property
    def removed_fraction(self) -> float:
        """Fraction of the model's ``nn.Linear`` parameters (weights + biases) removed."""
        if not self.linear_params_before:
            return 0.0
        return 1 - self.linear_params_after / self.linear_params_before

    def to_dict(self) -> Dict[str, Any]:
        return {"target": self.target, "importance": self.importance, "blocks": self.blocks,
                "linear_params_before": self.linear_params_before,
                "linear_params_after": self.linear_params_after, "removed_fraction": self.removed_fraction}

    def __str__(self) -> str:
        lines = [f"structured pruning ({self.target}, {self.importance}): Linear params "
                 f"{self.linear_params_before:,} -> {self.linear_params_after:,} "
                 f"({self.removed_fraction:.1%} removed)"]
        for name, b in self.blocks.items():
            lines.append(f"  {name}: kept {b['kept']}/{b['total']}, params {b['params_before']:,} -> "
                         f"{b['params_after']:,}")
        return "\n".join(lines)


def _linear_params(model: nn.Module) -> int:
    return sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear)
               for p in m.parameters(recurse=False))


# --------------------------------------------------------------------------------------------------
# Slicing
# --------------------------------------------------------------------------------------------------
def _sliced(lin: nn.Linear, rows: Optional[torch.Tensor] = None,
            cols: Optional[torch.Tensor] = None) -> nn.Linear:
    """A new plain ``nn.Linear`` with the kept ``rows`` (outputs) / ``cols`` (inputs); same dtype/device."""
    w = lin.weight.detach()
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    bias = lin.bias
    new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
    new.weight = nn.Parameter(w.clone(), requires_grad=lin.weight.requires_grad)
    if bias is not None:
        b = bias.detach()
        if rows is not None:  # a consumer's bias (cols sliced only) is kept whole
            b = b.index_select(0, rows.to(b.device))
        new.bias = nn.Parameter(b.clone(), requires_grad=bias.requires_grad)
    new.train(lin.training)
    return new


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------
GroupsSpec = Union[None, Sequence[Any], Mapping[Union[int, str], Sequence[Any]]]


def _normalise_groups(groups: GroupsSpec) -> Union[None, List[Dict[str, Any]], Dict[str, List[Dict[str, Any]]]]:
    """``groups=`` in its JSON form: group objects become dicts, block keys become strings."""
    if groups is None:
        return None
    if isinstance(groups, Mapping):
        out: Dict[str, List[Dict[str, Any]]] = {}
        for key, items in groups.items():
            if isinstance(key, bool) or not (isinstance(key, int) or (isinstance(key, str) and key.isdigit())):
                raise ValueError(f"groups: keys are block indices, got {key!r}")
            out[str(int(key))] = _normalise_groups(items)  # type: ignore[assignment]
        return out
    if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence):
        raise TypeError(f"groups must be a list of MLPGroup/AttentionGroup or {{block index: [...]}}, "
                        f"got {type(groups).__name__}")
    return [group_from_dict(g).to_dict() for g in groups]


def _group_objects(groups) -> GroupsSpec:
    """The config's stored groups as :class:`MLPGroup`/:class:`AttentionGroup` objects, for :func:`find_groups`."""
    if groups is None:
        return None
    if isinstance(groups, Mapping):
        return {int(key): [group_from_dict(g) for g in items] for key, items in groups.items()}
    return [group_from_dict(g) for g in groups]


def _check_structured(config: "MethodConfig", round_to: int = 1) -> None:
    """Validate (and normalise) the options shared by :class:`PruneChannels` and :class:`PruneHeads`."""
    if config.importance not in IMPORTANCES:
        raise ValueError(f"unknown importance {config.importance!r}; choose from {IMPORTANCES}")
    if (config.ratio is None) == (config.ratios is None):
        raise ValueError("give exactly one of ratio=... (every block) or ratios={block: ratio}")
    if config.ratio is not None:
        _check_ratio(config.ratio, "ratio")
    else:
        if not isinstance(config.ratios, Mapping):
            raise TypeError(f"ratios must be a dict {{block index or name: ratio}}, got {type(config.ratios).__name__}")
        for key, r in config.ratios.items():
            if isinstance(key, bool) or not isinstance(key, (int, str)):
                raise ValueError(f"ratios: keys are block indices or names, got {key!r}")
            _check_ratio(r, f"ratios[{key!r}]")
        # JSON keys are strings: store them so, so a config equals itself read back from a recipe file.
        object.__setattr__(config, "ratios", {str(key): float(r) for key, r in config.ratios.items()})
    if not isinstance(config.adaptive, bool):
        raise ValueError(f"adaptive must be True or False, got {config.adaptive!r}")
    if config.adaptive and config.ratios is not None:
        raise ValueError("adaptive=True takes one overall ratio=..., not ratios={...}")
    if isinstance(config.min_keep, bool) or not (isinstance(config.min_keep, (int, float)) and 0 < config.min_keep <= 1):
        raise ValueError(f"min_keep must be in (0, 1], got {config.min_keep!r}")
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise ValueError(f"round_to must be a positive int, got {round_to!r}")
    if config.blocks_path is not None and not isinstance(config.blocks_path, str):
        raise ValueError(f"blocks_path must be a module name or None, got {config.blocks_path!r}")
    object.__setattr__(config, "groups", _normalise_groups(config.groups))


@dataclass(frozen=True, eq=True)
class _Structured(MethodConfig):
    """What the two structured methods declare alike, options included (not registered itself); see
    :class:`PruneChannels` for the options."""

    SCOPE = "model"  # the handler sees the whole model: coupled layers, head counts, the HF config
    changes_shapes = True  # smaller plain nn.Linear layers, not wrappers

    ratio: Optional[float] = None
    ratios: Optional[Dict[str, float]] = None
    importance: str = "magnitude"
    adaptive: bool = False
    min_keep: float = 0.1
    groups: Optional[Any] = None
    blocks_path: Optional[str] = None

    def __post_init__(self) -> None:
        _check_structured(self, getattr(self, "round_to", 1))

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        """``"wanda"`` and ``"fluctuation"`` read activation statistics; ``"magnitude"`` reads weights only."""
        return self.importance != "magnitude"

    def __hash__(self) -> int:  # ratios / groups are dicts and lists
        return hash(repr(sorted(self.to_dict().items())))

    def _label(self, what: str) -> str:
        amount = f"{self.ratio:.0%}" if self.ratio is not None else f"per block {self.ratios}"
        return f"{self.name} {amount} {self.importance}" + (" adaptive" if self.adaptive else "") + f" ({what})"


@dataclass(frozen=True, eq=True)
class PruneChannels(_Structured):
    """Remove a fraction of each block's MLP intermediate channels: ``compress_(model, PruneChannels(0.25))``.

    Args:
        ratio: fraction removed in every block; or ``ratios={block index or name: r}`` (blocks not
            named are left alone).
        importance: ``"magnitude"``, ``"wanda"`` or ``"fluctuation"`` (the last two need ``calibration=``).
        adaptive: one global ranking of per-group normalized importances removes ``ratio`` of all
            channels, each group keeping at least ``min_keep`` of its own.
        round_to: kept counts are multiples of it (kernel-friendly widths).
        groups: override the coupling discovery (:class:`MLPGroup` objects or their dicts, names
            relative to the block; a list for every block or ``{block index: [...]}``).
        blocks_path: the ``ModuleList`` of blocks, when the automatic search picks the wrong one.

    ``report.replaced`` lists the resized Linears, ``report.details`` holds a :class:`StructuredReport`
    (kept channels and parameters per block). The MLP modules' ``intermediate_size`` attributes and,
    when every block ends with one width, ``config.intermediate_size`` follow.
    """

    name = "prune_channels"

    round_to: int = 1

    __hash__ = _Structured.__hash__

    @classmethod
    def examples(cls) -> List["PruneChannels"]:
        return [cls(0.25), cls(0.25, importance="wanda", round_to=8)]

    def label(self) -> str:
        return self._label("MLP channels")


@dataclass(frozen=True, eq=True)
class PruneHeads(_Structured):
    """Remove a fraction of each block's attention kv groups (a kv head + its query heads):
    ``compress_(model, PruneHeads(0.5))``.

    ``ratio`` is a fraction of kv groups (of heads, under multi-head attention); at least one stays.
    Other options as :class:`PruneChannels` (``groups`` with :class:`AttentionGroup`). The head-count
    attributes of the attention module (``num_heads``, ``num_key_value_heads`` & co) and, when every
    block agrees, the model config (``num_attention_heads``, ``num_key_value_heads``; ``head_dim``
    made explicit) follow. After a per-block prune (head counts differ), a second one needs
    ``groups=`` with the current counts.
    """

    name = "prune_heads"

    __hash__ = _Structured.__hash__

    @classmethod
    def examples(cls) -> List["PruneHeads"]:
        # The toy transformer has 2 kv groups per block: half of them is the smallest step there.
        return [cls(ratios={1: 0.5}), cls(0.5, importance="fluctuation")]

    def label(self) -> str:
        return self._label("attention heads")


# --------------------------------------------------------------------------------------------------
# Handlers: plan the edit, change nothing
# --------------------------------------------------------------------------------------------------
def _edit(model: nn.Module, report: "StructuredReport", new_layers: Dict[str, nn.Linear],
          attrs: Dict[str, Dict[str, int]], config: Dict[str, Any]) -> ModelEdit:
    """The :class:`ModelEdit`, with the report's after-count computed from the planned layers."""
    removed = sum(total_parameters(model.get_submodule(name)) - total_parameters(layer)
                  for name, layer in new_layers.items())
    report.linear_params_after = report.linear_params_before - removed
    note = (f"Linear params {report.linear_params_before:,} -> {report.linear_params_after:,} "
            f"({report.removed_fraction:.1%} removed)")
    return ModelEdit(modules=new_layers, attributes=attrs, config=config, details=report, notes=[note])


def _targeted(units: List[Tuple["BlockGroups", Any]], names, targets: Mapping[str, nn.Module], what: str) -> List:
    """The units whose layers are all targets; an error if include/exclude left none of several."""
    kept = [(b, g) for b, g in units if all(f"{b.name}.{n}" in targets for n in names(g))]
    if units and not kept:
        raise ValueError(f"no {what} group left to prune: every one has a layer that is excluded (include/exclude) "
                         "or already compressed")
    return kept


# What each structured method prunes: the block attribute holding its groups, the layers of a group, the
# name used in messages, and how to name the groups by hand.
_UNIT_KINDS = {
    "mlp": ("mlp", lambda g: (*g.inputs, g.output), "MLP",
            "groups=[MLPGroup(inputs=[...], output=...)] naming the layers"),
    "attention": ("attention", lambda g: (g.q, g.k, g.v, g.o), "attention",
                  "groups=[AttentionGroup(q=, k=, v=, o=, num_heads=, num_kv_heads=, head_dim=)]"),
}


def _pruning_units(model: nn.Module, config: Any, targets: Mapping[str, nn.Module], kind: str):
    """``(blocks, {block index: ratio}, [(block, group)])``: the groups of ``kind`` a structured config
    prunes, every layer of each targeted; clear errors when the blocks have none to prune."""
    attr, layers_of, label, hint = _UNIT_KINDS[kind]
    found = find_groups(model, _group_objects(config.groups), config.blocks_path)
    block_ratio = _block_ratios(found, config.ratio, config.ratios)
    if not any(getattr(b, attr) for b in found):
        raise ValueError(f"no {label} group found in the blocks ({found[0].name} ...): pass {hint}")
    missing = [b.name for b in found if not getattr(b, attr) and block_ratio[b.index] > 0]
    if missing:
        raise ValueError(f"block(s) {missing[:4]} have no {label} group to prune; pass groups=... to name "
                         "them")
    units = _targeted([(b, g) for b in found for g in getattr(b, attr) if block_ratio[b.index] > 0],
                      layers_of, targets, label)
    return found, block_ratio, units


@register_method(PruneChannels)
def _plan_channels(model: nn.Module, config: PruneChannels, *, targets: Mapping[str, nn.Module],
                   calibration: Optional[Iterable[Any]] = None, **_: Any) -> ModelEdit:
    found, block_ratio, units = _pruning_units(model, config, targets, "mlp")
    full = lambda b, n: f"{b.name}.{n}"  # noqa: E731
    for b, g in units:
        for n in (*g.inputs, g.output):
            _check_weights(full(b, n), model.get_submodule(full(b, n)))
    stats = {}
    if config.importance != "magnitude" and units:
        stats = _collect(model, calibration, [full(b, g.output) for b, g in units],
                         config.importance == "fluctuation")
    scores = {}
    for b, g in units:
        ins = [model.get_submodule(full(b, n)) for n in g.inputs]
        out = model.get_submodule(full(b, g.output))
        sizes = {m.out_features for m in ins}
        if sizes != {out.in_features}:
            raise ValueError(f"block {b.name}: MLP group {g} has inconsistent widths (inputs out_features "
                             f"{sorted(sizes)}, {g.output} in_features {out.in_features})")
        scores[(b.name, g.output)] = _finite(
            channel_importance(ins, out, config.importance, stats.get(full(b, g.output))), full(b, g.output))
    if config.adaptive:
        keep_counts = _adaptive_keep(scores, block_ratio[found[0].index], config.min_keep, config.round_to)
    else:
        index = {b.name: b.index for b in found}
        keep_counts = {key: _uniform_keep(s.numel(), block_ratio[index[key[0]]], config.round_to,
                                          f"block {key[0]} ({key[1]})") for key, s in scores.items()}
    report = StructuredReport("mlp", config.importance, linear_params_before=_linear_params(model))
    new_layers: Dict[str, nn.Linear] = {}
    attrs: Dict[str, Dict[str, int]] = {}
    widths: Dict[int, List[int]] = {}
    for b, g in units:
        key = (b.name, g.output)
        s = scores[key]
        n, keep = s.numel(), keep_counts[key]
        idx = torch.sort(torch.topk(s, keep, largest=True, sorted=False).indices).values
        before = after = 0
        for name in g.inputs:
            old = model.get_submodule(full(b, name))
            new_layers[full(b, name)] = _sliced(old, rows=idx)
            before += total_parameters(old)
            after += total_parameters(new_layers[full(b, name)])
        old = model.get_submodule(full(b, g.output))
        new_layers[full(b, g.output)] = _sliced(old, cols=idx)
        before += total_parameters(old)
        after += total_parameters(new_layers[full(b, g.output)])
        entry = report.blocks.setdefault(b.name, dict(params_before=0, params_after=0, kept=0, total=0))
        entry["params_before"] += before
        entry["params_after"] += after
        entry["kept"] += keep
        entry["total"] += n
        widths.setdefault(b.index, []).append(keep)
        owner = _parent(g.output)
        mod = model.get_submodule(full(b, owner) if owner else b.name)
        if getattr(mod, "intermediate_size", None) == n:
            attrs[full(b, owner) if owner else b.name] = {"intermediate_size": keep}
    return _edit(model, report, new_layers, attrs, _config_mlp(model, found, widths))


def _config_mlp(model: nn.Module, found: List[BlockGroups], widths: Dict[int, List[int]]) -> Dict[str, Any]:
    """``{"intermediate_size": w}`` when every block will have one width; else nothing (see docs)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not isinstance(getattr(cfg, "intermediate_size", None), int):
        return {}
    all_widths = set()
    for b in found:
        if b.index in widths:
            all_widths.update(widths[b.index])
        else:
            all_widths.add(cfg.intermediate_size)  # untouched block keeps the config's width
    return {"intermediate_size": all_widths.pop()} if len(all_widths) == 1 else {}


@register_method(PruneHeads)
def _plan_heads(model: nn.Module, config: PruneHeads, *, targets: Mapping[str, nn.Module],
                calibration: Optional[Iterable[Any]] = None, **_: Any) -> ModelEdit:
    found, block_ratio, units = _pruning_units(model, config, targets, "attention")
    full = lambda b, n: f"{b.name}.{n}"  # noqa: E731
    for b, g in units:
        mods = {n: model.get_submodule(full(b, n)) for n in (g.q, g.k, g.v, g.o)}
        for n, m in mods.items():
            _check_weights(full(b, n), m)
        h, kv, d = g.num_heads, g.num_kv_heads, g.head_dim
        expect = {g.q: ("out_features", h * d), g.k: ("out_features", kv * d), g.v: ("out_features", kv * d),
                  g.o: ("in_features", h * d)}
        for n, (what, size) in expect.items():
            if getattr(mods[n], what) != size:
                raise ValueError(f"layer {full(b, n)!r}: {what}={getattr(mods[n], what)} but the head layout "
                                 f"(heads={h}, kv_heads={kv}, head_dim={d}) needs {size}")
    stats = {}
    if config.importance != "magnitude" and units:
        stats = _collect(model, calibration, [full(b, g.o) for b, g in units], config.importance == "fluctuation")
    scores = {}
    for b, g in units:
        q, k, v, o = (model.get_submodule(full(b, n)) for n in (g.q, g.k, g.v, g.o))
        scores[(b.name, g.o)] = _finite(head_importance(q, k, v, o, g, config.importance, stats.get(full(b, g.o))),
                                        full(b, g.o))
    if config.adaptive:
        keep_counts = _adaptive_keep(scores, block_ratio[found[0].index], config.min_keep, 1)
    else:
        index = {b.name: b.index for b in found}
        keep_counts = {key: _uniform_keep(s.numel(), block_ratio[index[key[0]]], 1, f"block {key[0]}")
                       for key, s in scores.items()}
    report = StructuredReport("heads", config.importance, linear_params_before=_linear_params(model))
    new_layers: Dict[str, nn.Linear] = {}
    attrs: Dict[str, Dict[str, int]] = {}
    heads_per_block: Dict[int, Tuple[int, int]] = {}
    for b, g in units:
        key = (b.name, g.o)
        kv, rep, d = g.num_kv_heads, g.num_heads // g.num_kv_heads, g.head_dim
        keep = keep_counts[key]
        kept_groups = torch.sort(torch.topk(scores[key], keep).indices).values
        kv_rows = (kept_groups[:, None] * d + torch.arange(d)[None, :]).reshape(-1)
        q_heads = (kept_groups[:, None] * rep + torch.arange(rep)[None, :]).reshape(-1)
        q_rows = (q_heads[:, None] * d + torch.arange(d)[None, :]).reshape(-1)
        before = after = 0
        slices = ((g.q, q_rows, None), (g.k, kv_rows, None), (g.v, kv_rows, None), (g.o, None, q_rows))
        for n, rows, cols in slices:
            old = model.get_submodule(full(b, n))
            new_layers[full(b, n)] = _sliced(old, rows=rows, cols=cols)
            before += total_parameters(old)
            after += total_parameters(new_layers[full(b, n)])
        report.blocks[b.name] = {"params_before": before, "params_after": after, "kept": keep, "total": kv}
        heads_per_block[b.index] = (keep * rep, keep)
        owner = g.module if g.module is not None else _parent(g.o)
        mod = model.get_submodule(full(b, owner) if owner else b.name)
        a = {}
        for names, old_v, new_v in ((_HEADS_ATTRS, g.num_heads, keep * rep), (_KV_ATTRS, kv, keep)):
            for attr in names:
                if getattr(mod, attr, None) == old_v and not isinstance(getattr(mod, attr), bool):
                    a[attr] = new_v
        if a:
            attrs[full(b, owner) if owner else b.name] = a
    return _edit(model, report, new_layers, attrs, _config_heads(model, found, heads_per_block))


def _config_heads(model: nn.Module, found: List[BlockGroups], heads: Dict[int, Tuple[int, int]]) -> Dict[str, Any]:
    """The head layout for ``model.config`` when every block will agree; else nothing."""
    cfg = getattr(model, "config", None)
    if cfg is None or not isinstance(getattr(cfg, "num_attention_heads", None), int):
        return {}
    nh = cfg.num_attention_heads
    nkv = getattr(cfg, "num_key_value_heads", None) or nh
    layouts = {heads.get(b.index, (nh, nkv)) for b in found}
    if len(layouts) != 1:
        return {}  # per-block head counts: the config keeps the original, llmopt.load rebuilds the layers
    new_h, new_kv = layouts.pop()
    updates: Dict[str, Any] = {}
    if getattr(cfg, "head_dim", None) is None:
        # head_dim is otherwise derived as hidden_size // num_attention_heads, which would now be wrong.
        updates["head_dim"] = cfg.hidden_size // nh
    updates["num_attention_heads"] = new_h
    if hasattr(cfg, "num_key_value_heads"):
        updates["num_key_value_heads"] = new_kv
    return updates
