"""Recipes: Stage/Recipe round trips (dict, JSON, YAML), parse errors, per-layer overrides, and
multi-stage ``compress_`` (prune -> quantize -> LoRA) with one calibration pass per method."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmopt
from llmopt import AWQ, GPTQ, HQQ, RTN, LoRA, Recipe, Stage, Wanda
from llmopt.calibration import StatsSpec
from llmopt.nn import LoRALinear, QuantLinear, SparseLinear
from llmopt.pipeline.api import merged_stats_spec
from llmopt.pipeline.recipe import RecipeError
from llmopt.testing import ToyTransformer, sqnr

YAML_RECIPE = """
stages:
  - method: wanda
    sparsity: 0.5
    pattern: "2:4"
    exclude: [lm_head]
  - method: rtn
    format: int4
    group_size: 32
    exclude: [lm_head]
    overrides:
      "*.down_proj": {format: int8}
  - method: lora
    rank: 4
    alpha: 8
    include: ["*q_proj", "*v_proj"]
"""


def _model(seed: int = 0) -> ToyTransformer:
    torch.manual_seed(seed)
    return ToyTransformer(tie=False).eval()


def _calibration(n: int = 3):
    gen = torch.Generator().manual_seed(3)
    return [torch.randint(0, 128, (1, 32), generator=gen) for _ in range(n)]


def _ids():
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(7))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ round trips
def test_yaml_example_parses_and_round_trips(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(YAML_RECIPE)
    recipe = Recipe.load(path)
    assert [s.config.name for s in recipe.stages] == ["wanda", "rtn", "lora"]
    assert recipe.stages[0].config == Wanda(sparsity=0.5, pattern="2:4")
    assert recipe.stages[0].exclude == ["lm_head"]
    assert recipe.stages[1].overrides == {"*.down_proj": {"format": "int8"}}
    assert recipe.stages[2].config == LoRA(rank=4, alpha=8) and recipe.stages[2].include == ["*q_proj", "*v_proj"]
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    for name in ("copy.yaml", "copy.yml", "copy.json"):
        recipe.save(tmp_path / name)
        assert Recipe.load(tmp_path / name) == recipe
    assert json.loads((tmp_path / "copy.json").read_text()) == recipe.to_dict()


def test_yaml_reads_unquoted_nm_patterns_and_exponent_floats(tmp_path):
    """PyYAML alone reads ``2:4`` as the integer 124 and ``1e-2`` as a string."""
    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  - method: wanda\n    pattern: 2:4\n  - method: gptq\n    damp: 1e-2\n")
    recipe = Recipe.load(path)
    assert recipe.stages[0].config.pattern == "2:4"
    assert recipe.stages[1].config.damp == 0.01


_override_values = st.one_of(
    st.none(),
    st.fixed_dictionaries({"format": st.sampled_from(["int8", "int4", "nf4", "int3"])}),
    st.fixed_dictionaries({"group_size": st.sampled_from([None, 32, 64, 128])}),
    st.builds(lambda f: HQQ(format=f, group_size=64), st.sampled_from(["int4", "int3"])),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(["int4", "int8", "nf4", "fp4_e2m1", "int2"]),
    group=st.sampled_from([None, 32, 64, 128]),
    symmetric=st.sampled_from([None, True, False]),
    sparsity=st.floats(0.05, 0.9).map(lambda x: round(x, 3)),
    rank=st.integers(1, 64),
    alpha=st.sampled_from([1.0, 8.0, 16, 32.5]),
    overrides=st.dictionaries(st.sampled_from(["*.down_proj", "layers.0.q_proj", "*", "lm_head"]), _override_values,
                              max_size=3),
    exclude=st.one_of(st.none(), st.lists(st.sampled_from(["lm_head", "*.o_proj"]), max_size=2)),
    kind=st.sampled_from(["yaml", "json"]),
)
def test_recipe_round_trips_through_dict_and_files(tmp_path_factory, fmt, group, symmetric, sparsity, rank, alpha,
                                                   overrides, exclude, kind):
    changes_format = any(isinstance(v, dict) and "format" in v for v in overrides.values())
    if not fmt.startswith("int") or changes_format:
        symmetric = None  # symmetric= applies to the affine int formats only
    recipe = Recipe([
        Stage(Wanda(sparsity=sparsity), exclude=exclude),
        Stage(RTN(fmt, group, symmetric=symmetric), exclude=exclude, overrides=overrides),
        Stage(LoRA(rank=rank, alpha=alpha, use_dora=rank % 2 == 0), include=["*q_proj"]),
    ])
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    assert Recipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    path = tmp_path_factory.mktemp("r") / f"recipe.{kind}"
    recipe.save(path)
    loaded = Recipe.load(path)
    assert loaded == recipe
    assert list(loaded.stages[1].overrides) == list(overrides)  # order kept: first match wins


def test_ordered_overrides_survive_key_sorting_json():
    """llmopt.json is written with sorted keys; the ordered form keeps first-match-wins order."""
    recipe = Recipe([Stage(RTN("int4", 64), overrides={"layers.0.*": "skip", "*.down_proj": {"format": "int8"}})])
    stored = json.loads(json.dumps(recipe.to_dict(ordered_overrides=True), sort_keys=True))
    assert stored["stages"][0]["overrides"] == [{"layers.0.*": "skip"}, {"*.down_proj": {"format": "int8"}}]
    again = Recipe.from_dict(stored)
    assert again == recipe and list(again.stages[0].overrides) == ["layers.0.*", "*.down_proj"]
    assert again.stages[0].config_for("layers.0.down_proj") is None
    # The plain mapping form does not survive sorting: "*" sorts before "l".
    assert list(json.loads(json.dumps(recipe.to_dict(), sort_keys=True))["stages"][0]["overrides"])[0] == "*.down_proj"


def test_stage_normalises_skip_and_config_dicts():
    stage = Stage(RTN("int4", 64), include="layers.*",
                  overrides={"*.o_proj": "skip", "*.q_proj": {"method": "hqq", "format": "int4"},
                             "*.k_proj": None})
    assert stage.include == ["layers.*"]
    assert stage.overrides["*.o_proj"] is None and stage.overrides["*.k_proj"] is None
    assert stage.overrides["*.q_proj"] == HQQ(format="int4")
    assert stage.to_dict()["overrides"]["*.o_proj"] == "skip"
    assert Stage.from_dict(stage.to_dict()) == stage
    # A plain stage's dict is its config's: report.methods keeps its old form.
    assert Stage(RTN("int8", None)).to_dict() == RTN("int8", None).to_dict()


# ------------------------------------------------------------------------------ resolution
def test_overrides_resolve_first_match_wins_and_skip():
    stage = Stage(RTN("int4", 64), exclude=["lm_head"], overrides={
        "layers.1.down_proj": {"format": "int8", "group_size": None},   # an exact name, as the allocator emits
        "*.down_proj": {"format": "nf4"},
        "layers.0.*": "skip",                                             # the whole block 0 ...
        "layers.0.q_proj": {"format": "int2"},                            # ... so this never wins
        "*.o_proj": HQQ("int3", 32),
    })
    assert stage.config_for("layers.1.down_proj") == RTN("int8", None)
    assert stage.config_for("layers.2.down_proj") == RTN("nf4", 64)
    assert stage.config_for("layers.0.q_proj") is None
    assert stage.config_for("layers.0.down_proj") == RTN("nf4", 64)  # '*.down_proj' comes first
    assert stage.config_for("layers.0.k_proj") is None
    assert stage.config_for("layers.1.o_proj") == HQQ("int3", 32)
    assert stage.config_for("layers.1.q_proj") == RTN("int4", 64)
    assert stage.config_for("lm_head") is None  # excluded
    assert Stage(RTN(), include=["*.q_proj"]).config_for("layers.0.k_proj") is None
    assert stage.match("layers.3.down_proj") == ("*.down_proj", {"format": "nf4"})


def test_merged_stats_spec_is_the_union():
    assert merged_stats_spec([Wanda(0.5)]) == StatsSpec(hessian=False)
    spec = merged_stats_spec([Wanda(0.5), GPTQ("int4", 64)])
    assert spec.hessian and spec.dtype == torch.float64
    spec = merged_stats_spec([AWQ("int4", 64), llmopt.SmoothQuant()])
    assert spec.hessian and spec.dtype == torch.float32


# ------------------------------------------------------------------------------ parse errors
@pytest.mark.parametrize("data, message", [
    ({"stages": [{"method": "nope"}]}, r"stage 0 \(nope\): unknown method 'nope'; registered: .*rtn"),
    ({"stages": [{"method": "rtn"}, {"method": "rtn", "formatt": "int4"}]},
     r"stage 1 \(rtn\): unknown key\(s\) \['formatt'\] for method 'rtn'; its options: .*'format'.*stage keys"),
    ({"stages": [{"method": "rtn", "include_": ["x"]}]}, r"stage 0 \(rtn\): unknown key\(s\) \['include_'\]"),
    ({"stages": [{"method": "rtn", "overrides": {"*.down_proj": {"bits": 8}}}]},
     r"stage 0 \(rtn\): override '\*.down_proj': method 'rtn' has no field\(s\) \['bits'\]"),
    ({"stages": [{"method": "rtn", "overrides": {"*.down_proj": {"format": "int9"}}}]},
     r"stage 0 \(rtn\): override '\*.down_proj': .*unknown weight format 'int9'"),
    ({"stages": [{"method": "rtn", "overrides": {"*": {"method": "hqq", "lp": 1}}}]},
     r"override '\*': method 'hqq' has no option"),
    ({"stages": [{"method": "rtn", "format": "int9"}]}, r"stage 0 \(rtn\): .*unknown weight format 'int9'"),
    ({"stages": [{"method": "rtn", "group_size": "sixty-four"}]}, r"stage 0 \(rtn\): .*group_size"),
    ({"stages": [{"method": "lora", "rank": 4}, {"method": "rtn"}]},
     r"stage 1 \(rtn\): compression stages must come before the LoRA stage \(stage 0\)"),
    ({"stages": [{"method": "rtn", "overrides": {"*": {"method": "lora"}}}]},
     r"compression stage cannot be overridden by a 'lora' config"),
    ({"stages": [{"method": "lora", "overrides": {"*": {"method": "rtn"}}}]},
     r"LoRA stage cannot be overridden by a 'rtn' config"),
    ({"stages": [{"method": "rtn", "include": 3}]}, r"stage 0 \(rtn\): 'include' must be a glob string"),
    ({"stages": [{"method": "rtn", "exclude": ["a", 1]}]}, r"'exclude' must be a glob string"),
    ({"stages": [{"method": "rtn", "overrides": "*.down_proj"}]}, r"stage 0 \(rtn\): 'overrides' must be a mapping"),
    ({"stages": [{"method": "rtn", "overrides": ["*.down_proj"]}]}, r"'overrides' as a list must hold one-entry"),
    ({"stages": [{"method": "rtn", "overrides": [{"*": "skip"}, {"*": None}]}]}, r"glob '\*' appears twice"),
    ({"stages": [{"method": "rtn", "overrides": {"*": 8}}]}, r"override '\*': value must be a dict"),
    ({"stages": [{"method": 4}]}, r"stage 0: 'method' must be a string"),
    ({"stages": [{"format": "int4"}]}, r"stage 0: missing 'method'"),
    ({"stages": ["rtn"]}, r"stage 0: a stage must be a mapping"),
    ({"stages": {"method": "rtn"}}, r"'stages' must be a list"),
    ({"stages": []}, r"at least one stage"),
    ({"stage": [{"method": "rtn"}]}, r"unknown recipe key\(s\) \['stage'\]"),
    ("rtn", r"a recipe must be a mapping"),
])
def test_parse_errors_name_the_stage_and_key(data, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(data)


@pytest.mark.parametrize("name, text, message", [
    ("bad.yaml", "stages:\n  - method: rtn\n   format: int4\n", r"is not valid YAML"),
    ("bad.yml", "stages: [", r"is not valid YAML"),
    ("bad.json", '{"stages": [', r"is not valid JSON"),
    ("empty.yaml", "", r"is empty"),
    ("r.toml", "stages = []", r"unknown extension '.toml'"),
    ("typo.yaml", "stages:\n  - method: rtn\n    fromat: int4\n", r"typo.yaml.*stage 0 \(rtn\): unknown key"),
])
def test_file_errors(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(RecipeError, match=message):
        Recipe.load(path)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(RecipeError, match=r"recipe file .*missing.yaml' not found"):
        Recipe.load(tmp_path / "missing.yaml")


def test_stage_objects_validate_too():
    with pytest.raises(RecipeError, match="must be a method config"):
        Stage("rtn")
    with pytest.raises(RecipeError, match=r"override '\*': method 'rtn' has no field"):
        Stage(RTN(), overrides={"*": {"bits": 3}})
    with pytest.raises(RecipeError, match="must come before the LoRA stage"):
        Recipe([Stage(LoRA()), RTN()])
    with pytest.raises(RecipeError, match="must come before the LoRA stage"):
        llmopt.compress_(_model(), [LoRA(rank=2), RTN()])


# ------------------------------------------------------------------------------ compress_ with recipes
def test_prune_quantize_lora_in_one_call_then_save_load(tmp_path):
    model = _model()
    recipe = Recipe.from_dict({"stages": [
        {"method": "wanda", "sparsity": 0.5, "pattern": "2:4", "exclude": ["lm_head"]},
        {"method": "rtn", "format": "int4", "group_size": 32, "exclude": ["lm_head"],
         "overrides": {"*.down_proj": {"format": "int8"}, "layers.1.o_proj": "skip"}},
        {"method": "lora", "rank": 4, "alpha": 8, "include": ["*q_proj", "*v_proj"]},
    ]})
    report = llmopt.compress_(model, recipe, calibration=_calibration())
    assert report.methods == [stage.to_dict() for stage in recipe.stages]
    for i in range(2):
        down = model.get_submodule(f"layers.{i}.down_proj")
        assert isinstance(down, SparseLinear) and down.quantized and down.format.name == "int8"
        q = model.get_submodule(f"layers.{i}.q_proj")
        assert isinstance(q, LoRALinear) and isinstance(q.base, SparseLinear) and q.base.format.name == "int4"
        k = model.get_submodule(f"layers.{i}.k_proj")
        assert isinstance(k, SparseLinear) and k.quantized and k.format.name == "int4"
    o1 = model.get_submodule("layers.1.o_proj")
    assert isinstance(o1, SparseLinear) and not o1.quantized  # pruned, quantization skipped by the override
    assert "skipped by override 'layers.1.o_proj'" in report.skipped["layers.1.o_proj"]
    assert type(model.lm_head) is nn.Linear
    assert [c["method"] for c in report.layer_configs["layers.0.q_proj"]] == ["wanda", "rtn", "lora"]
    assert report.layer_configs["layers.0.down_proj"][1]["format"] == "int8"
    assert report.layer_configs["layers.0.k_proj"][1]["format"] == "int4"
    assert "layers.0.q_proj" in report.replaced and report.bytes_after < report.bytes_before
    assert Recipe.from_dict(model._llmopt_recipe) == recipe
    # Only the adapters train.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)

    # Make the adapters non-trivial, then save / load into a meta skeleton: identical outputs.
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, LoRALinear):
                layer.lora_B.weight.normal_(0, 0.05)
    ids = _ids()
    with torch.no_grad():
        expected = model(ids)
    llmopt.save(model, tmp_path, metadata={"recipe": recipe.to_dict(ordered_overrides=True)})
    with torch.device("meta"):
        skeleton = ToyTransformer(tie=False)
    loaded = llmopt.load(skeleton, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(ids), expected)
    manifest = json.loads((tmp_path / "llmopt.json").read_text())
    assert Recipe.from_dict(manifest["metadata"]["recipe"]) == recipe


def test_accepts_stage_and_mixed_list_and_call_level_globs():
    model = _model()
    report = llmopt.compress_(model, [Wanda(0.5), Stage(RTN("int8", None), include=["layers.0.*"])],
                              calibration=_calibration(), exclude=["lm_head", "*.v_proj"])
    assert len(report.methods) == 2
    assert isinstance(model.layers[0].q_proj, SparseLinear) and model.layers[0].q_proj.quantized
    assert isinstance(model.layers[1].q_proj, SparseLinear) and not model.layers[1].q_proj.quantized
    assert type(model.layers[0].v_proj) is nn.Linear and type(model.lm_head) is nn.Linear
    # The recorded recipe folds the call's globs into each stage.
    recorded = Recipe.from_dict(model._llmopt_recipe)
    assert recorded.stages[0].exclude == ["lm_head", "*.v_proj"]
    assert recorded.stages[1].include == ["layers.0.*"]
    # A single Stage works too; a second call appends to the recorded recipe.
    llmopt.compress_(model, Stage(RTN("int4", 32), include=["layers.1.*"], exclude=["*.v_proj"]))
    assert isinstance(model.layers[1].q_proj, SparseLinear) and model.layers[1].q_proj.quantized
    assert len(model._llmopt_recipe["stages"]) == 3


def _failing_snapshot(model):
    return ({n: m for n, m in model.named_modules()}, _state(model),
            {n: p.requires_grad for n, p in model.named_parameters()})


def _assert_untouched(model, snap):
    modules, state, flags = snap
    assert {n: m for n, m in model.named_modules()} == modules
    now = model.state_dict()
    assert now.keys() == state.keys()
    for key in state:
        torch.testing.assert_close(now[key], state[key], rtol=0, atol=0, equal_nan=True)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_all_or_nothing_when_the_lora_stage_fails():
    model = _model()
    snap = _failing_snapshot(model)
    recipe = Recipe([Stage(Wanda(0.5), exclude=["lm_head"]), Stage(RTN("int4", 32), exclude=["lm_head"]),
                     Stage(LoRA(rank=4), include=["*q_proj"], overrides={"layers.1.q_proj": {"rank": 1000}})])
    with pytest.raises(llmopt.CompressionError, match=r"rank 1000 exceeds .*layers.1.q_proj"):
        llmopt.compress_(model, recipe, calibration=_calibration())
    _assert_untouched(model, snap)
    assert not hasattr(model, "_llmopt_recipe")


def test_all_or_nothing_when_a_later_compression_stage_fails():
    model = _model()
    with torch.no_grad():
        model.layers[1].down_proj.weight[0, 0] = float("nan")
    snap = _failing_snapshot(model)
    recipe = Recipe([Stage(GPTQ("int4", 32), include=["layers.0.*"]), Stage(RTN("int4", 32), include=["layers.1.*"])])
    with pytest.raises(llmopt.CompressionError, match="layers.1.down_proj"):
        llmopt.compress_(model, recipe, calibration=_calibration())
    _assert_untouched(model, snap)


def _count_block0_forwards(model):
    counter = {"n": 0}

    def hook(*_):
        counter["n"] += 1

    model.layers[0].register_forward_pre_hook(hook)
    return counter


@pytest.mark.parametrize("base, override, check", [
    # Layer scope (GPTQ): one handler call per layer, each with its own config.
    (GPTQ("int4", 32), {"*.down_proj": {"format": "int8", "group_size": None}, "layers.1.q_proj": {"group_size": 64}},
     {"layers.0.down_proj": ("int8", None), "layers.1.q_proj": ("int4", 64), "layers.0.q_proj": ("int4", 32)}),
    # Block scope (AWQ): q/k/v split into two groups; the int8 one keeps its scales on the layer.
    (AWQ("int4", 32, grid=4, clip=False), {"*.q_proj": {"format": "int8"}},
     {"layers.0.q_proj": ("int8", 32), "layers.0.k_proj": ("int4", 32), "layers.1.down_proj": ("int4", 32)}),
])
def test_same_method_overrides_run_in_one_calibration_pass(base, override, check):
    plain = _model()
    counter = _count_block0_forwards(plain)
    llmopt.compress_(plain, base, calibration=_calibration(), exclude=["lm_head"])
    plain_forwards = counter["n"]

    model = _model()
    counter = _count_block0_forwards(model)
    report = llmopt.compress_(model, Stage(base, exclude=["lm_head"], overrides=override), calibration=_calibration())
    assert counter["n"] == plain_forwards  # one pass, not one per config
    for name, (fmt, group) in check.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.format.name == fmt, name
        assert report.layer_configs[name][0]["format"] == fmt
        assert report.layer_configs[name][0]["group_size"] == group
    assert len(report.methods) == 1


def test_awq_override_group_does_not_fold_into_the_shared_norm():
    model = _model()
    ids = _ids()
    with torch.no_grad():
        reference = model(ids)
    llmopt.compress_(model, Stage(AWQ("int8", 32, grid=4, clip=False), exclude=["lm_head"],
                                  overrides={"*.q_proj": {"group_size": 64}}), calibration=_calibration())
    with torch.no_grad():
        out = model(ids)
    assert sqnr(reference, out) > 25  # int8: the q and k/v groups stay consistent with the norm


def test_different_method_override_is_split_into_its_own_pass():
    model = _model()
    counter = _count_block0_forwards(model)
    report = llmopt.compress_(model, Stage(GPTQ("int4", 32), exclude=["lm_head"], overrides={
        "*.down_proj": {"method": "rtn", "format": "int8", "group_size": None},
        "layers.1.v_proj": HQQ("int4", 32),
        "layers.0.o_proj": {"method": "gptq", "format": "int4", "group_size": 32, "propagate": "float"},
    }), calibration=_calibration())
    gptq_only = _model()
    plain = _count_block0_forwards(gptq_only)
    llmopt.compress_(gptq_only, GPTQ("int4", 32), calibration=_calibration(), exclude=["lm_head"])
    # The GPTQ pass plus one more calibration pass for the float-propagation override; RTN/HQQ need none.
    assert counter["n"] > plain["n"]
    methods = {name: configs[0]["method"] for name, configs in report.layer_configs.items()}
    assert methods["layers.0.down_proj"] == methods["layers.1.down_proj"] == "rtn"
    assert methods["layers.1.v_proj"] == "hqq"
    assert report.layer_configs["layers.0.o_proj"][0]["propagate"] == "float"
    assert methods["layers.0.q_proj"] == methods["layers.1.o_proj"] == "gptq"
    assert model.layers[0].down_proj.format.name == "int8" and model.layers[1].v_proj.format.name == "int4"
    assert len(report.replaced) == 14 and len(report.methods) == 1


def test_split_override_needing_calibration_is_checked_up_front():
    with pytest.raises(ValueError, match=r"method 'gptq' needs calibration data"):
        llmopt.compress_(_model(), Stage(RTN("int4"), overrides={"*.q_proj": GPTQ("int4", 32)}))


def test_all_layers_skipped_by_overrides_is_not_an_error():
    model = _model()
    report = llmopt.compress_(model, Stage(RTN("int8", None), include=["layers.0.*"], overrides={"*": "skip"}))
    assert report.replaced == {} and len(report.skipped) == 7


def test_unused_override_globs_are_noted_and_lora_config_alone_works():
    model = _model()
    report = llmopt.compress_(model, Stage(RTN("int8", None), exclude=["lm_head"],
                                           overrides={"*.down_prj": {"format": "int4"}, "*.o_proj": "skip"}))
    assert any("'*.down_prj'" in note and "matched none" in note for note in report.notes)
    assert not any("'*.o_proj'" in note for note in report.notes)
    report = llmopt.compress_(model, LoRA(rank=2), include=["*.q_proj"])
    assert isinstance(model.layers[0].q_proj, LoRALinear) and isinstance(model.layers[0].q_proj.base, QuantLinear)
    assert report.methods == [LoRA(rank=2).to_dict()] and set(report.replaced) == {"layers.0.q_proj", "layers.1.q_proj"}


# ---------------------------------------------------------------------------------------------- presets

def test_presets_are_shipped_and_load():
    """The named recipes (package data) load; the quality presets calibrate, w4-fast does not."""
    names = llmopt.list_presets()
    assert {"w4-fast", "w4-best", "w3-best", "w2-best"} <= set(names)
    for name in names:
        recipe = Recipe.preset(name)
        assert isinstance(recipe, Recipe) and recipe.stages
        assert Recipe.from_dict(recipe.to_dict()) == recipe
        assert all("lm_head" in (stage.exclude or []) for stage in recipe.stages)
    assert not any(stage.config.needs_calibration for stage in Recipe.preset("w4-fast").stages)
    for name in ("w4-best", "w3-best", "w2-best"):
        assert any(stage.config.needs_calibration for stage in Recipe.preset(name).stages)


def test_resolve_takes_a_path_or_a_preset_name(tmp_path):
    path = tmp_path / "mine.yaml"
    Recipe([RTN("int8", None)]).save(path)
    assert Recipe.resolve(path) == Recipe.load(path)
    assert Recipe.resolve(str(path)) == Recipe.load(path)
    assert Recipe.resolve("w4-fast") == Recipe.preset("w4-fast")
    with pytest.raises(RecipeError, match="w4-best"):  # the message lists the presets
        Recipe.preset("w5-magic")
    with pytest.raises(RecipeError, match="not found"):
        Recipe.resolve(tmp_path / "missing.yaml")


def test_w4_fast_preset_compresses_a_toy_model():
    torch.manual_seed(0)
    model = ToyTransformer()
    report = llmopt.compress_(model, Recipe.preset("w4-fast"))
    assert report.replaced and "lm_head" not in report.replaced
