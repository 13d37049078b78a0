"""The method protocol: :class:`MethodConfig` (frozen dataclasses that validate themselves, round-trip
through JSON and declare how :func:`llmopt.compress_` applies them) and the registry pairing each
config class with the handler that applies it.

``compress_`` knows no method by name: everything it does differently for a method is read from the
declarations below, each with a default, so a simple layer-by-layer method declares nothing.

==========================  =========================================================================
``name``                    the registry key (``"rtn"``), written as ``"method"`` in dicts
``VERSION``                 version of the config's dict form; stored dicts from another version are
                            upgraded (:meth:`~MethodConfig.upgrade`) or refused
``SCOPE``                   ``"layer"`` | ``"block"`` | ``"model"``: what the handler sees (see
                            :func:`register_method`)
``needs_calibration``       ``compress_`` refuses to run it without ``calibration=``
``stats_spec()``            the calibration statistics a layer/block handler needs
``propagate``               ``"quantized"`` | ``"float"``: what feeds the next block during calibration
``block_io``                ``None`` | ``"local"`` | ``"float"``: a block handler also gets ``io=``, the
                            block's inputs and float targets (:class:`~llmopt.calibration.runner.BlockIO`)
``select_targets()``        which modules a stage of this method applies to (default: uncompressed
                            ``nn.Linear``), ``accepts_compressed()`` which llmopt wrappers it composes with
``after_stage()``           a model-level step once a stage is applied (LoRA freezes the base)
``adds_adapters``           trainable adapters: such stages come after every compression stage
``examples()``, ...         what the contract tests may run and expect (``reduces_stored_bytes``,
                            ``changes_shapes``, ``lossless``, ``example_setup()``)
==========================  =========================================================================
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Mapping, Optional, Tuple, Type

import torch.nn as nn

from ..calibration import StatsSpec
from ..core.checks import check_fields
from ..core.targets import Patterns, select_linears

__all__ = [
    "MethodConfig", "ModelEdit", "register_method", "get_method", "list_methods", "unregister_method",
    "MethodEntry", "Handler", "SCOPES", "VERSION_KEY",
]

SCOPES = ("layer", "block", "model")
VERSION_KEY = "version"  # written next to "method" by configs at VERSION >= 2


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method config.

    Subclasses are frozen dataclasses that set ``name`` (the registry key), validate their fields in
    ``__post_init__`` and override only the declarations that differ from the defaults below.
    A declaration that depends on the options (``needs_calibration`` of an activation-aware SVD) may
    be a property instead of a class attribute.
    """

    name: ClassVar[str] = ""
    # Version of the dict form. Version 1 dicts are {"method": name, **fields}; from version 2 on the
    # dict also carries "version", and dicts written by an older version go through upgrade().
    VERSION: ClassVar[int] = 1
    # Named in capitals: several configs (Wanda, Magnitude, SparseGPT) have a `scope` option of their own.
    SCOPE: ClassVar[str] = "layer"
    needs_calibration: ClassVar[bool] = False
    # Calibrated methods: statistics of which activations feed the next block. Methods offering the
    # choice declare a `propagate` field, which overrides this default. Deliberately not annotated:
    # an annotated base attribute keeps its place in the field order, so a subclass's `propagate`
    # field would become its first positional argument.
    propagate = "quantized"
    # Block-scope methods that train the compressed block (learned rounding): the runner hands the
    # handler the block's calibration inputs and targets as ``io=`` (see run_blocks' block_io).
    block_io = None
    # Trainable adapters on top of the (compressed) layers: every compression stage of a recipe comes
    # before such a stage, and the two kinds never override each other's layers.
    adds_adapters: ClassVar[bool] = False
    # What the contract tests may expect of the result (tests/pipeline/test_contract.py):
    reduces_stored_bytes: ClassVar[bool] = True  # the replaced layers store fewer bytes
    changes_shapes: ClassVar[bool] = False  # plain, smaller layers (structured pruning) instead of wrappers
    lossless: ClassVar[bool] = False  # the model computes the same function right after the stage

    # ------------------------------------------------------------------------------------ calibration
    def stats_spec(self) -> StatsSpec:
        """The statistics a calibrated handler reads (default: per-column norms and ``X^T X`` in float32)."""
        return StatsSpec()

    # ------------------------------------------------------------------------------------ targets
    def accepts_compressed(self, module: nn.Module) -> bool:
        """True for an llmopt wrapper this method may replace (RTN quantizes a float ``SparseLinear``).
        Every other compressed module is skipped as ``"already compressed"``."""
        return False

    def select_targets(self, model: nn.Module, include: Patterns, exclude: Patterns,
                       accept: Optional[Callable[[nn.Module], bool]] = None
                       ) -> Tuple[Dict[str, nn.Module], Dict[str, str]]:
        """``(targets, skipped)``: the modules a stage of this method applies to, and the matched ones it
        leaves alone with the reason. ``include``/``exclude`` are the stage's globs; ``accept`` (default
        :meth:`accepts_compressed`) lets a stage whose overrides name other methods take their wrappers.

        Default: every ``nn.Linear`` (subclasses included) matching the globs; llmopt wrappers and LoRA
        adapters are skipped (:func:`~llmopt.core.targets.select_linears`).
        """
        return select_linears(model, include, exclude, accept=accept or self.accepts_compressed)

    def describe_targets(self) -> str:
        """What :meth:`select_targets` looks for, in error messages (``"no <this> matches include=..."``)."""
        return "uncompressed nn.Linear"

    # ------------------------------------------------------------------------------------ model-level step
    def after_stage(self, model: nn.Module, replaced: Dict[str, nn.Module]) -> List[str]:
        """Run once after a stage of this method replaced ``replaced`` (``{name: new module}``, possibly
        empty); returns notes for the report. ``compress_`` undoes module swaps and ``requires_grad``
        changes made here if a later stage fails; any other change must be idempotent. Default: nothing."""
        return []

    # ------------------------------------------------------------------------------------ tests and benchmarks
    @classmethod
    def examples(cls) -> List["MethodConfig"]:
        """A few representative configs; the contract test suite runs every registered method on them."""
        return [cls()]

    def example_setup(self) -> List["MethodConfig"]:
        """Configs a test applies first to build a model this one applies to (``QAT(step="convert")``
        needs the layers its prepare step made). Empty for methods that start from a float model."""
        return []

    @classmethod
    def benchmark_configs(cls) -> List["MethodConfig"]:
        """Configs the model benchmark suite runs for this method (``benchmarks/bench_models.py``).

        A new method adds itself to the suite by returning its representative settings here.
        """
        return []

    def label(self) -> str:
        """Short human-readable name for reports, e.g. ``"rtn int4 g64"``."""
        fields = ", ".join(f"{k}={v}" for k, v in self.to_dict().items() if k not in ("method", VERSION_KEY))
        return f"{self.name}({fields})"

    # ------------------------------------------------------------------------------------ dict form
    def to_dict(self) -> Dict[str, Any]:
        """``{"method": name, **fields}`` (plus ``"version"`` from VERSION 2 on), JSON-serialisable."""
        head: Dict[str, Any] = {"method": self.name}
        if self.VERSION != 1:
            head[VERSION_KEY] = self.VERSION
        fields = dataclasses.asdict(self)
        # A field added later whose default means "as before" (metadata omit_if_default) is written
        # only when set, so the dicts of configs that do not use it stay exactly as they were.
        for declared in dataclasses.fields(self):
            if declared.metadata.get("omit_if_default") and fields.get(declared.name) == declared.default:
                del fields[declared.name]
        return {**head, **fields}

    @classmethod
    def read_options(cls, data: Mapping[str, Any]) -> Dict[str, Any]:
        """The options of a stored dict (without ``"method"``), brought to this class's ``VERSION``.

        A dict without ``"version"`` is version 1. A newer version is refused (this llmopt cannot know
        what its options mean); an older one goes through :meth:`upgrade`.
        """
        options = {k: v for k, v in data.items() if k != "method"}
        version = options.pop(VERSION_KEY, 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"method {cls.name!r}: 'version' must be a positive integer, got {version!r}")
        if version > cls.VERSION:
            raise ValueError(f"method {cls.name!r}: this config was written at version {version}, and this llmopt "
                             f"reads up to version {cls.VERSION}: upgrade llmopt")
        if version < cls.VERSION:
            options = dict(cls.upgrade(dict(options), version))
        return options

    @classmethod
    def upgrade(cls, data: Dict[str, Any], version: int) -> Dict[str, Any]:
        """Options written at ``version`` (< ``VERSION``) rewritten as this version's. A class that bumps
        ``VERSION`` overrides this (rename, convert or drop options); the default knows no old version."""
        raise ValueError(f"method {cls.name!r}: no upgrade from version {version} to {cls.VERSION} "
                         f"(this config class does not define upgrade())")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MethodConfig":
        """Rebuild a config from :meth:`to_dict` output. ``MethodConfig.from_dict`` looks the method up in
        the registry; ``RTN.from_dict`` also accepts a dict without ``"method"``."""
        method = data.get("method", None if cls is MethodConfig else cls.name)
        config_cls = get_method(method).config_cls
        if cls is not MethodConfig and not issubclass(config_cls, cls):
            raise ValueError(f"not a {cls.__name__} config: method={method!r}")
        options = config_cls.read_options(data)
        check_fields(config_cls, options, f"method {method!r}")
        return config_cls(**options)


@dataclass
class ModelEdit:
    """What a model-scope handler wants changed. The handler only plans: ``compress_`` applies the edit,
    records it for ``llmopt.save``/``load`` and undoes it if anything later in the call fails.

    Attributes:
        modules: ``{full name: new module}``; every name must be one of the targets the handler got.
        attributes: ``{module name ("" = the model): {attribute: value}}`` (head counts, widths).
        config: ``{key: value}`` set on ``model.config`` (a Hugging Face config), when the model has one.
        details: the method's own summary (an object with ``to_dict()``), put in ``report.details``.
        notes: lines for ``report.notes``.

    A replaced ``nn.Linear`` of another shape, the attributes and the config values are written to the
    model's resized-shapes record, so ``llmopt.load`` rebuilds them on a skeleton of the original model.
    """

    modules: Dict[str, nn.Module] = field(default_factory=dict)
    attributes: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    config: Dict[str, Any] = field(default_factory=dict)
    details: Any = None
    notes: List[str] = field(default_factory=list)


# scope "layer": handler(module, config, *, name, stats=None) -> replacement module
# scope "block": handler(layers, config, *, stats, sources, root, prefix) -> {full_name: replacement}
# scope "model": handler(model, config, *, targets, calibration, calibration_dtype, calibration_device) -> ModelEdit
Handler = Callable[..., Any]


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its config class and handler (``scope`` is the class's ``SCOPE``)."""

    name: str
    config_cls: Type[MethodConfig]
    handler: Handler

    @property
    def scope(self) -> str:
        return self.config_cls.SCOPE


_METHODS: Dict[str, MethodEntry] = {}


def _declares_scope(config_cls: Type[MethodConfig]) -> bool:
    """True when a class between ``config_cls`` and MethodConfig sets ``SCOPE`` itself."""
    return any("SCOPE" in vars(klass) for klass in config_cls.__mro__ if klass is not MethodConfig)


def register_method(config_cls: Type[MethodConfig], *, scope: Optional[str] = None) -> Callable[[Handler], Handler]:
    """Decorator registering ``handler`` as the way to apply ``config_cls``.

    The scope is the config's ``SCOPE`` (``scope=`` is the older spelling: it sets ``SCOPE`` on a class
    that does not declare one).

    ``"layer"`` (most methods): the handler is called as ``handler(linear, config, name=module_name)``
    (plus ``stats=LayerStats`` for methods with ``needs_calibration``) and returns the module that
    replaces ``linear``; it must not modify ``linear``. It may raise :class:`~llmopt.core.errors.SkipLayer`
    to leave the layer alone, or a :class:`~llmopt.core.errors.CompressionError` naming the layer
    (passed on as is); any other exception is wrapped in one naming the layer.

    ``"block"`` (methods that look at several layers at once, e.g. AWQ folding scales into the
    norm that feeds q/k/v): the config must have ``needs_calibration = True``; the handler is called
    once per block as ``handler(layers, config, stats=..., sources=..., root=block, prefix=path)`` with
    ``layers = {full_name: linear}`` (the targeted linears of the block), their ``LayerStats`` and
    :class:`~llmopt.calibration.graph.InputSource` (empty when unknown), and returns
    ``{full_name: replacement}``; it may also replace other modules of the block (a norm with rescaled
    weights), never modify them in place. Duplicate names are rejected.

    ``"model"`` (methods that change the architecture, e.g. structured pruning): the handler is called
    once per stage as ``handler(model, config, targets=..., calibration=..., calibration_dtype=...,
    calibration_device=...)`` with ``targets = {name: module}`` from :meth:`MethodConfig.select_targets`
    (``calibration`` is ``None`` unless the config needs it) and returns a :class:`ModelEdit`, without
    changing the model. A ``ValueError``/``TypeError`` (bad input for this model) is passed on as is.
    """
    if not (isinstance(config_cls, type) and issubclass(config_cls, MethodConfig)):
        raise TypeError(f"register_method expects a MethodConfig subclass, got {config_cls!r}")
    if scope is not None:
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if _declares_scope(config_cls) and config_cls.SCOPE != scope:
            raise ValueError(f"{config_cls.__name__} declares SCOPE = {config_cls.SCOPE!r}, but register_method "
                             f"was given scope={scope!r}")
    resolved = scope if scope is not None else config_cls.SCOPE
    if resolved not in SCOPES:
        raise ValueError(f"{config_cls.__name__}.SCOPE must be one of {SCOPES}, got {resolved!r}")
    if resolved == "block" and not getattr(config_cls, "needs_calibration", False):
        # (a property counts as "declared": its value depends on the options)
        raise ValueError("block-scope methods run inside the calibration runner: set needs_calibration = True")
    name = config_cls.name
    if not name:
        raise ValueError(f"{config_cls.__name__} has no `name`")

    def decorator(handler: Handler) -> Handler:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is already registered")
        if resolved != config_cls.SCOPE:
            config_cls.SCOPE = resolved  # the older keyword form: the config now declares what it was given
        _METHODS[name] = MethodEntry(name, config_cls, handler)
        return handler

    return decorator


def unregister_method(name: str) -> None:
    """Remove a method (for tests and plug-in reloads)."""
    _METHODS.pop(name, None)


def get_method(name_or_config: Any) -> MethodEntry:
    """Registry entry for a method name or a config instance."""
    name = name_or_config.name if isinstance(name_or_config, MethodConfig) else name_or_config
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(list_methods())}")
    entry = _METHODS[name]
    if isinstance(name_or_config, MethodConfig) and not isinstance(name_or_config, entry.config_cls):
        raise TypeError(f"config {type(name_or_config).__name__} is not registered under {name!r}")
    return entry


def list_methods() -> List[str]:
    """Names of all registered methods."""
    return sorted(_METHODS)
