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

A stage's dict is its config's ``to_dict()`` (``method`` plus the method's options, and
``version`` for a config class past version 1) with the optional stage keys ``include``,
``exclude`` and ``overrides``. ``llmopt.compress_(model, recipe, calibration=...)`` applies it (see
:func:`llmopt.compress_` for how overrides are run).

Rules, all read from what each config declares (no method is special here): stages of methods that
add adapters (``adds_adapters``, e.g. LoRA) come after every compression stage, and neither kind
overrides the other's layers; a model-scope method (structured pruning) takes no per-layer
overrides. A stored dict written at a newer config ``VERSION`` is refused (upgrade llmopt); an older
one is upgraded by its config class.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import yaml

from ..core.files import new_save_id, write_bytes_atomic
from ..core.scheme import WeightQuant
from ..core.targets import _matches
from ..methods.base import VERSION_KEY, MethodConfig, get_method, list_methods

__all__ = ["Stage", "Recipe", "RecipeError", "list_presets", "SKIP", "OverrideValue", "StageConfig", "check_versions"]

StageConfig = MethodConfig
# dict of field changes | a whole config (any method) | None (skip the layer)
OverrideValue = Union[Dict[str, Any], MethodConfig, None]

SKIP = "skip"  # how a skipping override is written in a dict / file (``None`` is accepted too)
STAGE_KEYS = ("include", "exclude", "overrides")
RECIPE_KEYS = ("stages", "embeddings")


class RecipeError(ValueError):
    """A recipe (dict, file or objects) is invalid; the message names the stage and the key."""


# ---------------------------------------------------------------------------------------------- helpers
def _config_from_dict(data: Mapping[str, Any], stage_keys: Tuple[str, ...] = ()) -> StageConfig:
    """A method config from ``{"method": name, [version], **options}`` (``stage_keys`` are left out: a
    stage's own keys). The options are brought to the config's ``VERSION`` first."""
    method = data.get("method")
    if method is None:
        raise RecipeError(f"missing 'method' (one of: {', '.join(list_methods())}); keys given: "
                          f"{sorted(map(str, data))}")
    if not isinstance(method, str):
        raise RecipeError(f"'method' must be a string, got {type(method).__name__} {method!r}")
    if method not in list_methods():
        raise RecipeError(f"unknown method {method!r}; registered: {', '.join(list_methods())}")
    config_cls = get_method(method).config_cls
    try:
        options = config_cls.read_options({k: v for k, v in data.items() if k not in stage_keys})
    except ValueError as exc:
        raise RecipeError(str(exc)) from None
    known = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(map(str, set(options) - set(known)))
    if unknown:
        if stage_keys:
            raise RecipeError(f"unknown key(s) {unknown} for method {method!r}; its options: {known}; "
                              f"stage keys: {list(stage_keys)}")
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


def _stage_kind(config: MethodConfig) -> str:
    """How errors name a stage of ``config``'s kind: ``"a LoRA stage"`` / ``"a compression stage"``."""
    return f"a {type(config).__name__} stage" if config.adds_adapters else "a compression stage"


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
        config: a method config (``RTN(...)``, ``Wanda(...)``, ``LoRA(...)``, ...; a method that adds
            adapters runs after the compression stages).
        include, exclude: ``fnmatch`` globs on module names, as :func:`llmopt.compress_` takes (a
            pattern matching a module covers the modules inside it).
        overrides: ordered ``{glob: value}``; the first glob matching a layer name decides its config.
            ``value`` is a dict of field changes applied to ``config`` with ``dataclasses.replace``
            (``{"format": "int8"}``), a whole config (a dict with a ``"method"`` key or a config object;
            another method is allowed), or ``None`` / ``"skip"``: leave the layer alone. Exact layer
            names are globs too. Values are normalised on construction (dicts with ``"method"``
            become config objects, ``"skip"`` becomes ``None``) and validated eagerly. A model-scope
            method (structured pruning) takes no overrides: use ``include``/``exclude``.
    """

    config: StageConfig
    include: Optional[List[str]] = None
    exclude: Optional[List[str]] = None
    overrides: Dict[str, OverrideValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.config, MethodConfig):
            raise RecipeError(f"Stage.config must be a method config (e.g. llmopt.RTN(...)), got {self.config!r}")
        get_method(self.config)  # registered, and under its own class
        self.include = _patterns(self.include, "include")
        self.exclude = _patterns(self.exclude, "exclude")
        if self.overrides is None:
            self.overrides = {}
        if not isinstance(self.overrides, Mapping):
            raise RecipeError(f"'overrides' must be a mapping {{glob: value}}, got {type(self.overrides).__name__}")
        if self.overrides and self.config.SCOPE == "model":
            raise RecipeError(f"method {self.config.name!r} works on the whole model (scope 'model'): it takes no "
                              "per-layer overrides; narrow it with include/exclude")
        normalised: Dict[str, OverrideValue] = {}
        for glob, value in self.overrides.items():
            if not isinstance(glob, str):
                raise RecipeError(f"overrides: keys must be glob strings, got {glob!r}")
            try:
                normalised[glob] = self._normalise_override(value)
            except RecipeError as exc:
                raise RecipeError(f"override {glob!r}: {exc}") from None
        self.overrides = normalised

    def configs(self) -> List[StageConfig]:
        """The stage's config and every whole config its overrides can resolve to."""
        out = [self.config]
        for value in self.overrides.values():
            resolved = self.resolve(value)
            if resolved is not None:
                out.append(resolved)
        return out

    def _normalise_override(self, value: Any) -> OverrideValue:
        if value is None or (isinstance(value, str) and value.lower() == SKIP):
            return None
        if isinstance(value, MethodConfig):
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
        if config.adds_adapters != self.config.adds_adapters:
            raise RecipeError(f"{_stage_kind(self.config)} cannot be overridden by a {config.name!r} config "
                              "(adapters and compression methods are separate stages)")
        if config.SCOPE == "model":
            raise RecipeError(f"method {config.name!r} works on the whole model (scope 'model'): it cannot "
                              "override single layers; give it its own stage")
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
        config = _config_from_dict(data, STAGE_KEYS)
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


# --------------------------------------------------------------------------------------------- presets
_PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "presets")


def _preset_files() -> Dict[str, str]:
    """``{name: path}`` of the recipes shipped in ``llmopt/presets/`` (package data)."""
    if not os.path.isdir(_PRESET_DIR):
        return {}
    return {entry[: -len(".yaml")]: os.path.join(_PRESET_DIR, entry)
            for entry in sorted(os.listdir(_PRESET_DIR)) if entry.endswith(".yaml")}


def list_presets() -> List[str]:
    """Names of the recipes shipped with llmopt, for :meth:`Recipe.preset` and ``llmopt compress --recipe``."""
    return sorted(_preset_files())


# ---------------------------------------------------------------------------------------------- Recipe
@dataclass
class Recipe:
    """An ordered list of :class:`Stage` s; stages of methods that add adapters (LoRA) come last.

    ``Recipe.from_dict(r.to_dict()) == r``; :meth:`load` / :meth:`save` read and write ``.json``,
    ``.yaml`` and ``.yml`` files. Apply it with ``llmopt.compress_(model, recipe, calibration=...)``.

    ``embeddings`` (optional): the :class:`~llmopt.WeightQuant` that ``compress_`` quantizes the
    model's ``nn.Embedding`` tables with before the stages run (see ``compress_(embeddings=...)``);
    written as ``embeddings: {format: int4, group_size: 64}``. A recipe that only does that may
    have no stages.
    """

    stages: List[Stage]
    embeddings: Optional[WeightQuant] = None

    def __post_init__(self) -> None:
        if self.embeddings is not None and not isinstance(self.embeddings, WeightQuant):
            raise RecipeError(f"Recipe.embeddings must be a WeightQuant or None, got {self.embeddings!r}")
        if isinstance(self.stages, (Stage, MethodConfig)) or not isinstance(self.stages, (list, tuple)):
            raise RecipeError(f"Recipe.stages must be a list of stages, got {type(self.stages).__name__}")
        stages = []
        for i, stage in enumerate(self.stages):
            if isinstance(stage, MethodConfig):
                stage = Stage(stage)
            if not isinstance(stage, Stage):
                raise RecipeError(f"stage {i}: expected a Stage or a method config, got {stage!r}")
            stages.append(stage)
        self.stages = stages
        if not stages and self.embeddings is None:
            raise RecipeError("a recipe needs at least one stage")
        # Adapters train on top of the final compressed model: once one stage adds them, only such stages follow.
        first_adapter = None
        for i, stage in enumerate(stages):
            if stage.config.adds_adapters:
                first_adapter = i if first_adapter is None else first_adapter
            elif first_adapter is not None:
                kind = type(stages[first_adapter].config).__name__
                raise RecipeError(f"stage {i} ({stage.config.name}): compression stages must come before the {kind} "
                                  f"stage (stage {first_adapter}): adapters are added last")

    def to_dict(self, ordered_overrides: bool = False) -> Dict[str, Any]:
        """``{"stages": [stage.to_dict(), ...]}``. ``ordered_overrides``: overrides as lists of one-entry
        mappings, for storage by serialisers that sort keys (``llmopt.json`` manifests do)."""
        data: Dict[str, Any] = {"stages": [stage.to_dict(ordered_overrides) for stage in self.stages]}
        if self.embeddings is not None:  # only when set: recipes without it keep their dicts
            data["embeddings"] = self.embeddings.to_dict()
        return data

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
        embeddings = data.get("embeddings")
        if embeddings is not None:
            try:
                embeddings = WeightQuant.from_dict(embeddings)
            except ValueError as exc:
                raise RecipeError(f"embeddings: {exc}") from None
        return Recipe(built, embeddings=embeddings)

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

    @staticmethod
    def preset(name: str) -> "Recipe":
        """A named recipe shipped with llmopt (``w4-fast``, ``w4-best``, ``w3-best``, ``w2-best``, ...;
        :func:`list_presets` lists them, ``docs/presets.md`` says what each does and what it measured)."""
        presets = _preset_files()
        if not isinstance(name, str) or name not in presets:
            raise RecipeError(f"unknown preset {name!r}; presets: {', '.join(sorted(presets))}")
        try:
            return Recipe.load(presets[name])
        except RecipeError as exc:
            raise RecipeError(f"preset {name!r}: {exc}") from None

    @staticmethod
    def resolve(source: Union[str, os.PathLike, "Recipe"]) -> "Recipe":
        """A recipe from a file path (``.json``/``.yaml``/``.yml``) or, for a name that is no file, a preset."""
        if isinstance(source, Recipe):
            return source
        path = os.fspath(source)
        if os.path.exists(path) or path.endswith((".json", ".yaml", ".yml")):
            return Recipe.load(path)
        return Recipe.preset(path)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write the recipe to ``path`` (``.json``, ``.yaml`` or ``.yml``)."""
        path = os.fspath(path)
        kind = _file_kind(path)
        data = self.to_dict()
        # Serialised first, then written atomically: a failure leaves the old file whole.
        text = json.dumps(data, indent=2) + "\n" if kind == "json" else _yaml_dump(data)
        write_bytes_atomic(path, text.encode("utf-8"), save_id=new_save_id())

    def label(self) -> str:
        """One line: the stages' labels joined by ``->`` (quantized embeddings first, when set)."""
        labels = [f"embeddings {self.embeddings.label()}"] if self.embeddings is not None else []
        return " -> ".join(labels + [stage.label() for stage in self.stages])


def check_versions(data: Any) -> None:
    """Refuse a stored recipe (e.g. a saved manifest's) with a config dict written at a newer ``VERSION``
    than this llmopt's class for that method: what its options mean is unknown here, so the message
    says to upgrade llmopt. Older versions pass (reading the recipe upgrades them); methods not
    registered here and malformed entries are left to :meth:`Recipe.from_dict`."""
    stages = data.get("stages") if isinstance(data, Mapping) else data
    if not isinstance(stages, (list, tuple)):
        return
    for i, stage in enumerate(stages):
        if not isinstance(stage, Mapping):
            continue
        overrides = stage.get("overrides")
        if isinstance(overrides, (list, tuple)):  # the ordered form: one-entry mappings
            values = [v for item in overrides if isinstance(item, Mapping) for v in item.values()]
        else:
            values = list(overrides.values()) if isinstance(overrides, Mapping) else []
        for item in [stage] + [v for v in values if isinstance(v, Mapping)]:
            method = item.get("method")
            if not (isinstance(method, str) and method in list_methods()):
                continue
            version, known = item.get(VERSION_KEY, 1), get_method(method).config_cls.VERSION
            if isinstance(version, int) and not isinstance(version, bool) and version > known:
                raise RecipeError(f"stage {i} ({method}): the config was written at version {version}, and this "
                                  f"llmopt reads up to version {known}: upgrade llmopt")


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
    loader, _ = _yaml_classes()
    return yaml.load(text, Loader=loader)  # noqa: S506 (a SafeLoader subclass)


def _yaml_dump(data: Any) -> str:
    _, dumper = _yaml_classes()
    return yaml.dump(data, Dumper=dumper, sort_keys=False, default_flow_style=None, allow_unicode=True)
