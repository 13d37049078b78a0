"""Recipes: an ordered list of compression stages, each one method config with its own targets and
per-layer overrides, that round-trips through a dict, JSON or YAML.

```yaml
stages:
  - method: wanda
    sparsity: 0.5
    pattern: "2:4"
    exclude: [lm_head]
  - method: rtn
    format: int4
    group_size: 64
    exclude: [lm_head]
    overrides:
      "*.down_proj": {format: int8}       # field changes to this stage's config
      "model.layers.0.*": skip             # leave these layers alone (also: null)
      "*.o_proj": {method: hqq, format: int4}   # a whole config, here of another method
  - method: lora
    rank: 16
    alpha: 32
    include: ["*q_proj", "*v_proj"]
```

A stage's dict is its config's ``to_dict()`` (``method`` plus the method's options) with the
optional stage keys ``include``, ``exclude`` and ``overrides``. ``llmopt.compress_(model, recipe,
calibration=...)`` applies it (see :func:`llmopt.compress_` for how overrides are run).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

from ..core.targets import _matches
from ..methods.base import MethodConfig, get_method, list_methods
from ..methods.lowrank.lora import LoRA

__all__ = ["Stage", "Recipe", "RecipeError", "SKIP", "OverrideValue", "StageConfig"]

StageConfig = Union[MethodConfig, LoRA]
# dict of field changes | a whole config (any method) | None (skip the layer)
OverrideValue = Union[Dict[str, Any], MethodConfig, LoRA, None]

SKIP = "skip"  # how a skipping override is written in a dict / file (``None`` is accepted too)
STAGE_KEYS = ("include", "exclude", "overrides")
RECIPE_KEYS = ("stages",)


class RecipeError(ValueError):
    """A recipe (dict, file or objects) is invalid; the message names the stage and the key."""


# ---------------------------------------------------------------------------------------------- helpers
def _config_from_dict(data: Mapping[str, Any]) -> StageConfig:
    """A method config (or a :class:`LoRA`) from ``{"method": name, **options}``."""
    method = data.get("method")
    if method is None:
        raise RecipeError(f"missing 'method' (one of: {', '.join(_method_names())})")
    if not isinstance(method, str):
        raise RecipeError(f"'method' must be a string, got {type(method).__name__} {method!r}")
    if method == LoRA.name:
        config_cls: type = LoRA
    else:
        if method not in list_methods():
            raise RecipeError(f"unknown method {method!r}; registered: {', '.join(_method_names())}")
        config_cls = get_method(method).config_cls
    options = {k: v for k, v in data.items() if k != "method"}
    known = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise RecipeError(f"method {method!r} has no option(s) {unknown}; known: {known}")
    return _build(config_cls, options, method)


def _build(config_cls: type, options: Mapping[str, Any], method: str) -> StageConfig:
    try:
        return config_cls(**options)
    except RecipeError:
        raise
    except (TypeError, ValueError, KeyError) as exc:
        raise RecipeError(f"method {method!r}: {_message(exc)}") from None


def _message(exc: BaseException) -> str:
    return exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)


def _method_names() -> List[str]:
    return sorted(set(list_methods()) | {LoRA.name})


def _is_config(value: Any) -> bool:
    return isinstance(value, (MethodConfig, LoRA))


def _patterns(value: Any, key: str) -> Optional[List[str]]:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value):
        return list(value)
    raise RecipeError(f"'{key}' must be a glob string or a list of them, got {value!r}")


def _fields(config: StageConfig) -> List[str]:
    return [f.name for f in dataclasses.fields(config)]


def _overrides_mapping(value: Any) -> Dict[str, Any]:
    """``overrides`` as written: a mapping, or (the ordered form) a list of one-entry mappings."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, (list, tuple)):
        out: Dict[str, Any] = {}
        for item in value:
            if not (isinstance(item, Mapping) and len(item) == 1):
                raise RecipeError(f"'overrides' as a list must hold one-entry {{glob: value}} mappings, got {item!r}")
            glob, override = next(iter(item.items()))
            if glob in out:
                raise RecipeError(f"overrides: glob {glob!r} appears twice")
            out[glob] = override
        return out
    raise RecipeError(f"'overrides' must be a mapping {{glob: value}}, got {type(value).__name__} {value!r}")


# ---------------------------------------------------------------------------------------------- Stage
@dataclass
class Stage:
    """One step of a recipe: a method config applied to the layers matching ``include``/``exclude``.

    Args:
        config: a method config (``RTN(...)``, ``Wanda(...)``, ...) or a :class:`~llmopt.LoRA` config
            (adapters are added after the compression stages).
        include, exclude: ``fnmatch`` globs on module names, as :func:`llmopt.compress_` takes (a
            pattern matching a module covers the modules inside it).
        overrides: ordered ``{glob: value}``; the first glob matching a layer name decides its config.
            ``value`` is a dict of field changes applied to ``config`` with ``dataclasses.replace``
            (``{"format": "int8"}``), a whole config (a dict with a ``"method"`` key or a config object;
            another method is allowed), or ``None`` / ``"skip"``: leave the layer alone. Exact layer
            names are globs too. Values are normalised on construction (dicts with ``"method"``
            become config objects, ``"skip"`` becomes ``None``) and validated eagerly.
    """

    config: StageConfig
    include: Optional[List[str]] = None
    exclude: Optional[List[str]] = None
    overrides: Dict[str, OverrideValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _is_config(self.config):
            raise RecipeError(f"Stage.config must be a method config (e.g. llmopt.RTN(...)) or llmopt.LoRA(...), "
                              f"got {self.config!r}")
        if isinstance(self.config, MethodConfig):
            get_method(self.config)  # registered, and under its own class
        self.include = _patterns(self.include, "include")
        self.exclude = _patterns(self.exclude, "exclude")
        if self.overrides is None:
            self.overrides = {}
        if not isinstance(self.overrides, Mapping):
            raise RecipeError(f"'overrides' must be a mapping {{glob: value}}, got {type(self.overrides).__name__}")
        normalised: Dict[str, OverrideValue] = {}
        for glob, value in self.overrides.items():
            if not isinstance(glob, str):
                raise RecipeError(f"overrides: keys must be glob strings, got {glob!r}")
            try:
                normalised[glob] = self._normalise_override(value)
            except RecipeError as exc:
                raise RecipeError(f"override {glob!r}: {exc}") from None
        self.overrides = normalised

    @property
    def is_lora(self) -> bool:
        """True for an adapter stage (``config`` is a :class:`~llmopt.LoRA`)."""
        return isinstance(self.config, LoRA)

    def _normalise_override(self, value: Any) -> OverrideValue:
        if value is None or (isinstance(value, str) and value.lower() == SKIP):
            return None
        if _is_config(value):
            config = value
        elif isinstance(value, Mapping):
            if "method" in value:
                config = _config_from_dict(value)
            else:
                changes = dict(value)
                known = _fields(self.config)
                unknown = sorted(set(changes) - set(known))
                if unknown:
                    raise RecipeError(f"method {self.config.name!r} has no field(s) {unknown}; known: {known}")
                bad_keys = [k for k in changes if not isinstance(k, str)]
                if bad_keys:
                    raise RecipeError(f"field names must be strings, got {bad_keys}")
                try:
                    dataclasses.replace(self.config, **changes)  # validate the resulting config now
                except (TypeError, ValueError, KeyError) as exc:
                    raise RecipeError(f"method {self.config.name!r}: {_message(exc)}") from None
                return changes
        else:
            raise RecipeError(f"value must be a dict of field changes, a config (dict with 'method'), or "
                              f"'skip'/null; got {value!r}")
        if isinstance(config, LoRA) != self.is_lora:
            kind = "a LoRA stage" if self.is_lora else "a compression stage"
            raise RecipeError(f"{kind} cannot be overridden by a {config.name!r} config (LoRA adapters and "
                              "compression methods are separate stages)")
        if isinstance(config, MethodConfig):
            get_method(config)
        return config

    def match(self, name: str) -> Optional[Tuple[str, OverrideValue]]:
        """``(glob, value)`` of the first override matching layer ``name``, or ``None``."""
        for glob, value in self.overrides.items():
            if _matches(name, [glob]):
                return glob, value
        return None

    def selects(self, name: str) -> bool:
        """True if ``name`` passes this stage's ``include``/``exclude`` globs."""
        if self.include and not _matches(name, self.include):
            return False
        return not (self.exclude and _matches(name, self.exclude))

    def resolve(self, value: OverrideValue) -> Optional[StageConfig]:
        """The config an override value stands for (``None``: skip)."""
        if value is None:
            return None
        if isinstance(value, dict):
            return dataclasses.replace(self.config, **value)
        return value

    def config_for(self, name: str) -> Optional[StageConfig]:
        """The resolved config for layer ``name``: ``None`` if the stage skips it (not included,
        excluded, or a skipping override), else the first matching override's config, else ``config``."""
        if not self.selects(name):
            return None
        hit = self.match(name)
        return self.config if hit is None else self.resolve(hit[1])

    def to_dict(self, ordered_overrides: bool = False) -> Dict[str, Any]:
        """``{**config.to_dict(), [include], [exclude], [overrides]}``; JSON/YAML-serialisable.

        ``ordered_overrides``: write ``overrides`` as a list of one-entry ``{glob: value}`` mappings,
        which keeps their order (first match wins) through serialisers that sort keys."""
        data = dict(self.config.to_dict())
        clash = sorted(set(data) & set(STAGE_KEYS))
        if clash:  # a method option named like a stage key would be ambiguous in the flat form
            raise RecipeError(f"method {self.config.name!r} has option(s) {clash} that clash with stage keys")
        if self.include is not None:
            data["include"] = list(self.include)
        if self.exclude is not None:
            data["exclude"] = list(self.exclude)
        if self.overrides:
            items = [(glob, SKIP if value is None else dict(value) if isinstance(value, dict) else value.to_dict())
                     for glob, value in self.overrides.items()]
            data["overrides"] = [{glob: value} for glob, value in items] if ordered_overrides else dict(items)
        return data

    @staticmethod
    def from_dict(data: Mapping[str, Any]) -> "Stage":
        """Rebuild a stage from :meth:`to_dict` output (or a hand-written dict / YAML mapping)."""
        if isinstance(data, Stage):
            return data
        if not isinstance(data, Mapping):
            raise RecipeError(f"a stage must be a mapping with a 'method' key, got {type(data).__name__} {data!r}")
        method = data.get("method")
        if method is None:
            raise RecipeError(f"missing 'method' (one of: {', '.join(_method_names())}); keys given: "
                              f"{sorted(map(str, data))}")
        if not isinstance(method, str):
            raise RecipeError(f"'method' must be a string, got {type(method).__name__} {method!r}")
        if method != LoRA.name and method not in list_methods():
            raise RecipeError(f"unknown method {method!r}; registered: {', '.join(_method_names())}")
        config_cls = LoRA if method == LoRA.name else get_method(method).config_cls
        known = [f.name for f in dataclasses.fields(config_cls)]
        options = {k: v for k, v in data.items() if k != "method" and k not in STAGE_KEYS}
        unknown = sorted(map(str, set(options) - set(known)))
        if unknown:
            raise RecipeError(f"unknown key(s) {unknown} for method {method!r}; its options: {known}; "
                              f"stage keys: {list(STAGE_KEYS)}")
        config = _build(config_cls, options, method)
        include = _patterns(data.get("include"), "include")
        exclude = _patterns(data.get("exclude"), "exclude")
        return Stage(config, include=include, exclude=exclude, overrides=_overrides_mapping(data.get("overrides")))

    def label(self) -> str:
        """Short description for reports."""
        text = self.config.label()
        if self.include:
            text += f" include={self.include}"
        if self.exclude:
            text += f" exclude={self.exclude}"
        if self.overrides:
            text += f" ({len(self.overrides)} override(s))"
        return text


# ---------------------------------------------------------------------------------------------- Recipe
@dataclass
class Recipe:
    """An ordered list of :class:`Stage` s; LoRA stages (if any) come last.

    ``Recipe.from_dict(r.to_dict()) == r``; :meth:`load` / :meth:`save` read and write ``.json``,
    ``.yaml`` and ``.yml`` files. Apply it with ``llmopt.compress_(model, recipe, calibration=...)``.
    """

    stages: List[Stage]

    def __post_init__(self) -> None:
        if isinstance(self.stages, (Stage, MethodConfig, LoRA)) or not isinstance(self.stages, (list, tuple)):
            raise RecipeError(f"Recipe.stages must be a list of stages, got {type(self.stages).__name__}")
        stages = []
        for i, stage in enumerate(self.stages):
            if _is_config(stage):
                stage = Stage(stage)
            if not isinstance(stage, Stage):
                raise RecipeError(f"stage {i}: expected a Stage or a method config, got {stage!r}")
            stages.append(stage)
        self.stages = stages
        if not stages:
            raise RecipeError("a recipe needs at least one stage")
        seen_lora = None
        for i, stage in enumerate(stages):
            if stage.is_lora:
                seen_lora = i if seen_lora is None else seen_lora
            elif seen_lora is not None:
                raise RecipeError(f"stage {i} ({stage.config.name}): compression stages must come before the LoRA "
                                  f"stage (stage {seen_lora}): adapters are added last")

    def to_dict(self, ordered_overrides: bool = False) -> Dict[str, Any]:
        """``{"stages": [stage.to_dict(), ...]}``. ``ordered_overrides``: overrides as lists of one-entry
        mappings, for storage by serialisers that sort keys (``llmopt.json`` manifests do)."""
        return {"stages": [stage.to_dict(ordered_overrides) for stage in self.stages]}

    @staticmethod
    def from_dict(data: Union[Mapping[str, Any], List[Any]]) -> "Recipe":
        """Rebuild a recipe from :meth:`to_dict` output (a bare list of stages is accepted too).
        Errors are :class:`RecipeError` s naming the stage index and the key."""
        if isinstance(data, Recipe):
            return data
        if isinstance(data, (list, tuple)):
            data = {"stages": list(data)}
        if not isinstance(data, Mapping):
            raise RecipeError(f"a recipe must be a mapping with a 'stages' list, got {type(data).__name__}")
        unknown = sorted(map(str, set(data) - set(RECIPE_KEYS)))
        if unknown:
            raise RecipeError(f"unknown recipe key(s) {unknown}; a recipe has: {list(RECIPE_KEYS)}")
        if "stages" not in data:
            raise RecipeError("a recipe needs a 'stages' list")
        stages = data["stages"]
        if not isinstance(stages, (list, tuple)):
            raise RecipeError(f"'stages' must be a list, got {type(stages).__name__} {stages!r}")
        built = []
        for i, stage in enumerate(stages):
            try:
                built.append(Stage.from_dict(stage))
            except RecipeError as exc:
                method = stage.get("method") if isinstance(stage, Mapping) else None
                where = f"stage {i}" + (f" ({method})" if isinstance(method, str) else "")
                raise RecipeError(f"{where}: {exc}") from None
        return Recipe(built)

    @staticmethod
    def load(path: Union[str, os.PathLike]) -> "Recipe":
        """Read a recipe from a ``.json``, ``.yaml`` or ``.yml`` file."""
        path = os.fspath(path)
        kind = _file_kind(path)
        if not os.path.isfile(path):
            raise RecipeError(f"recipe file {path!r} not found")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            data = json.loads(text) if kind == "json" else _yaml_load(text)
        except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError
            detail = " ".join(str(exc).split())
            raise RecipeError(f"recipe file {path!r} is not valid {kind.upper()}: {detail}") from None
        if data is None:
            raise RecipeError(f"recipe file {path!r} is empty")
        try:
            return Recipe.from_dict(data)
        except RecipeError as exc:
            raise RecipeError(f"recipe file {path!r}: {exc}") from None

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the recipe to ``path`` (``.json``, ``.yaml`` or ``.yml``)."""
        path = os.fspath(path)
        kind = _file_kind(path)
        data = self.to_dict()
        with open(path, "w", encoding="utf-8") as f:
            if kind == "json":
                json.dump(data, f, indent=2)
                f.write("\n")
            else:
                f.write(_yaml_dump(data))

    def label(self) -> str:
        """One line: the stages' labels joined by ``->``."""
        return " -> ".join(stage.label() for stage in self.stages)


def _file_kind(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json":
        return "json"
    if ext in (".yaml", ".yml"):
        return "yaml"
    raise RecipeError(f"recipe file {path!r}: unknown extension {ext!r}; use .json, .yaml or .yml")


# ---------------------------------------------------------------------------------------------- YAML
# PyYAML implements YAML 1.1, where ``2:4`` is the base-60 integer 124 and ``1e-5`` is a string. A
# recipe's N:M patterns and small floats must read as written, so the loader resolves numbers as
# YAML 1.2 does (no base-60, exponent without a dot); the dumper quotes anything either would misread.
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
                    r"|\.(?:nan|NaN|NAN))$")
_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")


def _yaml_classes():
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag not in _NUMBER_TAGS]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    Loader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))

    def construct_int(loader, node):
        text = loader.construct_scalar(node)
        return int(text, 0) if text[:2] in ("0o", "0x") else int(text)

    def construct_float(loader, node):
        text = loader.construct_scalar(node).lower()
        if text.endswith("inf"):
            return -math.inf if text.startswith("-") else math.inf
        return math.nan if text.endswith("nan") else float(text)

    Loader.add_constructor("tag:yaml.org,2002:int", construct_int)
    Loader.add_constructor("tag:yaml.org,2002:float", construct_float)

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeDumper.yaml_implicit_resolvers.items()}
    Dumper.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
    Dumper.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
    return Loader, Dumper


def _yaml_load(text: str) -> Any:
    import yaml

    loader, _ = _yaml_classes()
    return yaml.load(text, Loader=loader)  # noqa: S506 (a SafeLoader subclass)


def _yaml_dump(data: Any) -> str:
    import yaml

    _, dumper = _yaml_classes()
    return yaml.dump(data, Dumper=dumper, sort_keys=False, default_flow_style=None, allow_unicode=True)
