"""The method protocol (llmopt.methods.base): what a config declares, and that compress_ / Recipe read
only that. Toy methods registered here stand for "a method added later": each scope, a versioned
config, an adapter-like method that orders itself like LoRA."""

from __future__ import annotations

import ast
import dataclasses
import json
import pathlib
import types
from typing import Any, Dict, List

import pytest
import torch
import torch.nn as nn

import llmopt
from llmopt.methods.base import MethodConfig, ModelEdit, get_method, register_method, unregister_method
from llmopt.pipeline.recipe import RecipeError
from llmopt.testing import ToyMLP, ToyTransformer

PIPELINE = pathlib.Path(llmopt.__file__).resolve().parent / "pipeline"


def _copy(linear: nn.Module, out_features: int = None) -> nn.Linear:
    """A plain nn.Linear with ``linear``'s weights (the first ``out_features`` rows)."""
    rows = out_features or linear.out_features
    new = nn.Linear(linear.in_features, rows, bias=linear.bias is not None)
    with torch.no_grad():
        new.weight.copy_(linear.weight[:rows])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[:rows])
    return new


@pytest.fixture
def registered():
    """``registered(config_cls, handler)``: register a toy method for one test."""
    names: List[str] = []

    def _register(config_cls, handler, **kwargs):
        register_method(config_cls, **kwargs)(handler)
        names.append(config_cls.name)
        return config_cls

    yield _register
    for name in names:
        unregister_method(name)


# ------------------------------------------------------------------------------------------ defaults
def test_a_simple_method_declares_nothing():
    @dataclasses.dataclass(frozen=True)
    class Plain(MethodConfig):
        name = "plain_demo"

    cfg = Plain()
    assert (cfg.SCOPE, cfg.VERSION, cfg.needs_calibration, cfg.propagate) == ("layer", 1, False, "quantized")
    assert not (cfg.adds_adapters or cfg.changes_shapes or cfg.lossless) and cfg.reduces_stored_bytes
    assert cfg.stats_spec() == llmopt.calibration.StatsSpec() and cfg.example_setup() == []
    assert not cfg.accepts_compressed(nn.Linear(2, 2)) and cfg.after_stage(nn.Linear(2, 2), {}) == []
    assert cfg.to_dict() == {"method": "plain_demo"} and cfg.describe_targets() == "uncompressed nn.Linear"


def test_version_1_configs_serialise_as_before():
    """{"method": name, **fields}, nothing else: recipes and manifests written before still read. A field
    added later with an "as before" default (``omit_if_default``, e.g. ``zero_point``) is left out when unset."""
    for name in llmopt.list_methods():
        for cfg in get_method(name).config_cls.examples():
            assert cfg.VERSION == 1
            fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                      if not (f.metadata.get("omit_if_default") and getattr(cfg, f.name) == f.default)}
            everything = dataclasses.asdict(cfg)
            assert cfg.to_dict() == {"method": cfg.name, **{k: everything[k] for k in fields}}
            assert "zero_point" not in cfg.to_dict() or cfg.zero_point is not None
    assert llmopt.LoRA(rank=4).to_dict() == {
        "method": "lora", "rank": 4, "alpha": 16.0, "dropout": 0.0, "use_rslora": False, "use_dora": False,
        "init": "gaussian", "loftq_iters": 1, "quantize_base": None, "quant_group_size": 64}


def test_propagate_field_keeps_its_place():
    """A config's own `propagate` field overrides the protocol default without moving in the field order."""
    assert [f.name for f in dataclasses.fields(llmopt.GPTQ)][:2] == ["format", "group_size"]
    assert llmopt.GPTQ("int4", 32).propagate == "quantized" and llmopt.QuantLowRank().propagate == "float"
    assert llmopt.RTN().propagate == "quantized"  # the default, for a method without the option


# ------------------------------------------------------------------------------------------ VERSION
@dataclasses.dataclass(frozen=True)
class Versioned(MethodConfig):
    """Version 2 renamed ``bits`` to ``level``."""

    name = "versioned_demo"
    VERSION = 2
    level: int = 1

    @classmethod
    def upgrade(cls, data: Dict[str, Any], version: int) -> Dict[str, Any]:
        if version == 1 and "bits" in data:
            data["level"] = data.pop("bits")
        return data


def _apply_copy(linear, config, *, name="", **_):
    return _copy(linear)


def test_newer_version_is_refused_older_is_upgraded(registered):
    registered(Versioned, _apply_copy)
    cfg = Versioned(3)
    assert cfg.to_dict() == {"method": "versioned_demo", "version": 2, "level": 3}
    assert MethodConfig.from_dict(cfg.to_dict()) == cfg == Versioned.from_dict(json.loads(json.dumps(cfg.to_dict())))
    # A version-1 dict (no "version" key) goes through upgrade(); so does a stage of a recipe.
    assert MethodConfig.from_dict({"method": "versioned_demo", "bits": 5}) == Versioned(5)
    recipe = llmopt.Recipe.from_dict({"stages": [{"method": "versioned_demo", "bits": 4, "include": ["up"]},
                                                 {"method": "rtn", "overrides": {"down": {"method": "versioned_demo",
                                                                                          "version": 1, "bits": 2}}}]})
    assert recipe.stages[0].config == Versioned(4) and recipe.stages[1].overrides["down"] == Versioned(2)
    assert llmopt.Recipe.from_dict(recipe.to_dict()) == recipe
    # Newer than this llmopt knows: refused, saying what to do.
    with pytest.raises(ValueError, match="version 3.*upgrade llmopt"):
        MethodConfig.from_dict({"method": "versioned_demo", "version": 3, "level": 1})
    with pytest.raises(RecipeError, match=r"stage 0 \(rtn\): .*version 2.*upgrade llmopt"):
        llmopt.Recipe.from_dict({"stages": [{"method": "rtn", "version": 2, "format": "int4"}]})
    with pytest.raises(RecipeError, match=r"override 'down'.*version 9.*upgrade llmopt"):
        llmopt.Recipe.from_dict({"stages": [{"method": "rtn", "overrides": {"down": {"method": "rtn", "version": 9}}}]})
    with pytest.raises(RecipeError, match="'version' must be a positive integer"):
        llmopt.Recipe.from_dict({"stages": [{"method": "rtn", "version": "2"}]})


def test_an_older_version_without_upgrade_is_a_clear_error(registered):
    @dataclasses.dataclass(frozen=True)
    class NoUpgrade(MethodConfig):
        name = "no_upgrade_demo"
        VERSION = 3

    registered(NoUpgrade, _apply_copy)
    with pytest.raises(RecipeError, match="no upgrade from version 1 to 3"):
        llmopt.Recipe.from_dict([{"method": "no_upgrade_demo"}])


def test_manifest_recipe_version_is_checked_on_read(tmp_path, registered):
    registered(Versioned, _apply_copy)
    model = ToyMLP()
    llmopt.compress_(model, [Versioned(2), llmopt.Stage(llmopt.RTN("int4", 32), overrides={"down": "skip"})])
    llmopt.save(model, tmp_path)
    manifest_path = tmp_path / "llmopt.json"
    manifest = json.loads(manifest_path.read_text())
    stages = manifest["metadata"]["recipe"]["stages"]
    assert stages[0]["version"] == 2 and "version" not in stages[1]
    assert llmopt.Recipe.from_dict(manifest["metadata"]["recipe"]).stages[0].config == Versioned(2)

    # Written by an older llmopt (version 1, the old option name): loads, and reads upgraded.
    stages[0] = {"method": "versioned_demo", "bits": 2}
    manifest_path.write_text(json.dumps(manifest))
    loaded = llmopt.load(ToyMLP(), tmp_path)
    assert isinstance(loaded.down, nn.Linear)
    recipe = llmopt.Recipe.from_dict(llmopt.io.read_manifest(tmp_path)["metadata"]["recipe"])
    assert recipe.stages[0].config == Versioned(2)

    # Written by a newer llmopt: refused before anything is loaded.
    for stage in ({"method": "versioned_demo", "version": 7, "level": 2},
                  {"method": "rtn", "overrides": [{"down": {"method": "rtn", "version": 2}}]}):
        stages[0] = stage
        manifest_path.write_text(json.dumps(manifest))
        skeleton = ToyMLP()
        before = dict(skeleton.named_modules())
        with pytest.raises(ValueError, match="upgrade llmopt"):
            llmopt.load(skeleton, tmp_path)
        assert dict(skeleton.named_modules()) == before
        with pytest.raises(ValueError, match="llmopt.json: recipe stage 0"):
            llmopt.io.read_manifest(tmp_path)


# ------------------------------------------------------------------------------------------ scopes
def test_register_method_reads_the_scope_from_the_config(registered):
    @dataclasses.dataclass(frozen=True)
    class OldStyle(MethodConfig):
        name = "old_style_demo"
        needs_calibration = True

    def handler(layers, config, *, stats, sources, root, prefix):
        return {name: _copy(layer) for name, layer in layers.items()}

    registered(OldStyle, handler, scope="block")  # the keyword of older callers (docs/add_method.md)
    assert OldStyle.SCOPE == "block" and get_method("old_style_demo").scope == "block"

    @dataclasses.dataclass(frozen=True)
    class Declared(MethodConfig):
        name = "declared_demo"
        SCOPE = "model"

    with pytest.raises(ValueError, match="declares SCOPE = 'model'.*scope='layer'"):
        register_method(Declared, scope="layer")
    with pytest.raises(ValueError, match="scope must be one of"):
        register_method(Declared, scope="row")
    with pytest.raises(ValueError, match="needs_calibration"):
        register_method(dataclasses.dataclass(frozen=True)(type("B", (MethodConfig,), {"name": "b", "SCOPE": "block"})))
    assert "declared_demo" not in llmopt.list_methods()


def test_a_block_scope_method_sees_each_block_once(registered, calibration):
    calls: List[str] = []

    @dataclasses.dataclass(frozen=True)
    class PerBlock(MethodConfig):
        name = "per_block_demo"
        SCOPE = "block"
        needs_calibration = True

    def handler(layers, config, *, stats, sources, root, prefix):
        calls.append(prefix)
        assert all(stats[name].count > 0 for name in layers)
        return {name: _copy(layer) for name, layer in layers.items()}

    registered(PerBlock, handler)
    model = ToyTransformer()
    report = llmopt.compress_(model, PerBlock(), calibration=calibration(model), exclude=["lm_head"])
    assert calls == ["layers.0", "layers.1"] and len(report.replaced) == 14


@dataclasses.dataclass(frozen=True)
class Narrow(MethodConfig):
    """A model-scope toy: keeps the first ``rows`` outputs of ``up`` and the matching inputs of ``down``,
    and records the width on the model and in its config."""

    name = "narrow_demo"
    SCOPE = "model"
    changes_shapes = True
    rows: int = 100


def _plan_narrow(model, config, *, targets, calibration=None, **_):
    assert calibration is None and set(targets) == {"up", "down"}
    down = nn.Linear(config.rows, model.down.out_features)
    with torch.no_grad():
        down.weight.copy_(model.down.weight[:, :config.rows])
        down.bias.copy_(model.down.bias)
    return ModelEdit(modules={"up": _copy(model.up, config.rows), "down": down},
                     attributes={"": {"hidden": config.rows}}, config={"hidden_size": config.rows},
                     notes=["narrowed"])


def _failing(linear, config, *, name="", **_):
    raise ValueError("no way")


def test_a_model_scope_method_edits_records_and_rolls_back(registered, tmp_path, snapshot):
    registered(Narrow, _plan_narrow)

    @dataclasses.dataclass(frozen=True)
    class Fails(MethodConfig):
        name = "fails_demo"

    registered(Fails, _failing)
    model = ToyMLP()
    model.config = types.SimpleNamespace(hidden_size=208)
    snap = snapshot(model)
    with pytest.raises(llmopt.CompressionError, match="layer 'up' \\(fails_demo\\): no way"):
        llmopt.compress_(model, [Narrow(), Fails()])
    snap.check()
    assert not hasattr(model, "hidden") and model.config.hidden_size == 208
    assert not hasattr(model, "_llmopt_resized")

    report = llmopt.compress_(model, Narrow())
    assert set(report.replaced) == {"up", "down"} and model.up.out_features == 100 and model.hidden == 100
    assert model.config.hidden_size == 100 and "stage 0 (narrow_demo): narrowed" in report.notes
    assert report.details == [None] and report.bytes_after < report.bytes_before
    llmopt.save(model, tmp_path)
    assert llmopt.io.read_manifest(tmp_path)["resized"] == {
        "linears": {"up": [100, 96, True], "down": [64, 100, True]}, "attributes": {"": {"hidden": 100}},
        "config": {"hidden_size": 100}}
    skeleton = ToyMLP()
    skeleton.config = types.SimpleNamespace(hidden_size=208)
    llmopt.load(skeleton, tmp_path)
    x = torch.randn(2, 96)
    assert torch.equal(skeleton(x), model(x)) and skeleton.hidden == 100 and skeleton.config.hidden_size == 100


def test_a_model_scope_handler_may_only_replace_its_targets(registered):
    registered(Narrow, _plan_narrow)
    # include narrows what the handler is given (the toy asserts it gets both layers); a failure inside a
    # handler that is not about the input becomes a CompressionError naming the method and stage.
    with pytest.raises(llmopt.CompressionError, match=r"narrow_demo \(stage 0\)"):
        llmopt.compress_(ToyMLP(), Narrow(), include=["up"])

    def sneaky(model, config, *, targets, **_):
        return ModelEdit(modules={"down": _copy(model.down)})

    unregister_method("narrow_demo")
    registered(Narrow, sneaky)
    model = ToyMLP()
    with pytest.raises(llmopt.CompressionError, match=r"replaces \['down'\], which are not among its targets"):
        llmopt.compress_(model, Narrow(), exclude=["down"])
    assert type(model.down).__name__ == "CustomLinear"


# ------------------------------------------------------------------------------------------ adapters
@dataclasses.dataclass(frozen=True)
class Adapter(MethodConfig):
    """Adapter-like toy: a trainable copy next to each frozen layer; no method name anywhere says so."""

    name = "adapter_demo"
    adds_adapters = True
    reduces_stored_bytes = False

    def after_stage(self, model, replaced):
        for name, layer in replaced.items():
            layer.base.requires_grad_(False)
        return [f"{len(replaced)} adapted"] if replaced else []


class _Adapted(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base, self.delta = base, nn.Linear(base.in_features, base.out_features, bias=False)
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x):
        return self.base(x) + self.delta(x)


def _adapt(linear, config, *, name="", **_):
    return _Adapted(linear)


def test_an_adapter_like_method_orders_itself_like_lora(registered):
    registered(Adapter, _adapt)
    rtn = llmopt.RTN("int4", 32)
    with pytest.raises(RecipeError, match=r"stage 1 \(rtn\): compression stages must come before the Adapter "
                                          r"stage \(stage 0\)"):
        llmopt.Recipe([Adapter(), rtn])
    with pytest.raises(RecipeError, match="must come before the Adapter stage"):
        llmopt.compress_(ToyMLP(), [Adapter(), rtn])
    with pytest.raises(RecipeError, match=r"a compression stage cannot be overridden by a 'adapter_demo' config"):
        llmopt.Stage(rtn, overrides={"up": Adapter()})
    with pytest.raises(RecipeError, match=r"an? Adapter stage cannot be overridden by a 'rtn' config"):
        llmopt.Stage(Adapter(), overrides={"up": rtn})
    llmopt.Recipe([rtn, Adapter(), llmopt.LoRA(rank=2)])  # adapter kinds may follow one another

    model = ToyMLP()
    report = llmopt.compress_(model, [llmopt.Stage(rtn, include=["down"]), llmopt.Stage(Adapter(), include=["up"])])
    assert isinstance(model.up, _Adapted) and "stage 1 (adapter_demo): 1 adapted" in report.notes
    assert not any(p.requires_grad for p in model.up.base.parameters())
    assert all(p.requires_grad for p in model.up.delta.parameters())
    assert report.layer_configs["up"] == [Adapter().to_dict()]


def test_a_failing_stage_restores_the_flags_an_after_stage_step_changed(registered):
    registered(Adapter, _adapt)

    @dataclasses.dataclass(frozen=True)
    class Fails(MethodConfig):
        name = "fails_after_demo"
        adds_adapters = True

    registered(Fails, _failing)
    model = ToyMLP()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(llmopt.CompressionError):
        llmopt.compress_(model, [Adapter(), Fails()], include=["up"])
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert type(model.up) is nn.Linear


# ------------------------------------------------------------------------------------------ no special case
def _tree(name: str) -> ast.Module:
    return ast.parse((PIPELINE / name).read_text())


@pytest.mark.parametrize("name", ["api.py", "recipe.py"])
def test_compress_and_recipe_know_no_method(name):
    """The entry point reads the protocol only: from methods/ it imports the base, and it never probes a
    config for protocol attributes (every config has them all)."""
    tree = _tree(name)
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
                and "methods" in node.module}
    assert imported <= {"methods.base"}, imported
    probes = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
              and getattr(node.func, "id", None) in ("hasattr", "getattr") and len(node.args) >= 2
              and isinstance(node.args[1], ast.Constant)
              and node.args[1].value in ("stats_spec", "accepts_compressed", "propagate", "needs_calibration",
                                         "is_lora", "adds_adapters", "SCOPE", "scope")]
    assert not probes, f"{name}: protocol probed with hasattr/getattr at lines {probes}"
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    assert not names & {"LoRA", "QAT", "PruneChannels", "PruneHeads", "LoRALinear", "QATLinear"}
