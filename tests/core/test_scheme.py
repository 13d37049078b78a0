"""WeightQuant, the one quantization scheme, and the method configs that carry it.

Properties over every registered format: valid schemes build and round-trip, invalid ones raise a
ValueError naming the field. Then the configs: the same fields give the same scheme in every
quantizing method, and their serialised forms are exactly what they were before the scheme existed.
"""

import dataclasses
import inspect
import json
import pickle
from typing import Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmopt
from llmopt.core.formats import AffineFormat, get_format, list_formats, register_format, unregister_format
from llmopt.core.scheme import WeightQuant
from llmopt.methods.base import MethodConfig
from llmopt.methods.lowrank.compensation import QuantLowRank
from llmopt.methods.prune.sparsegpt import SparseGPT
from llmopt.methods.quant.awq import AWQ
from llmopt.methods.quant.gptq import GPTQ
from llmopt.methods.quant.hqq import HQQ
from llmopt.methods.quant.rtn import RTN
from llmopt.methods.quant.smoothquant import SmoothQuant
from llmopt.methods.quantized import QuantizesWeights, WeightQuantFields, check_kernel_name

FORMATS = list_formats()
AFFINE = [name for name in FORMATS if isinstance(get_format(name), AffineFormat)]
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

formats = st.sampled_from(FORMATS)
group_sizes = st.one_of(st.none(), st.just(-1), st.integers(1, 4096))
symmetrics = st.sampled_from([None, True, False])
scale_dtypes = st.sampled_from(list(SCALE_DTYPES) + list(SCALE_DTYPES.values()))
kernels = st.sampled_from(["auto", "reference", "int4pack_cpu"])


def _valid(fmt, symmetric):
    """The oracle: only affine formats take ``symmetric``; every other combination of valid values is fine."""
    return symmetric is None or fmt in AFFINE


# ------------------------------------------------------------------------------ WeightQuant properties
@settings(max_examples=150, deadline=None)
@given(fmt=formats, group_size=group_sizes, symmetric=symmetrics, scale_dtype=scale_dtypes, kernel=kernels)
def test_every_combination_builds_or_names_the_field(fmt, group_size, symmetric, scale_dtype, kernel):
    if not _valid(fmt, symmetric):
        with pytest.raises(ValueError, match=rf"'{fmt}'.*symmetric"):
            WeightQuant(fmt, group_size, symmetric, scale_dtype, kernel)
        return
    scheme = WeightQuant(fmt, group_size, symmetric, scale_dtype, kernel)
    # round trip, also through JSON text
    assert WeightQuant.from_dict(scheme.to_dict()) == scheme
    assert WeightQuant.from_dict(json.loads(json.dumps(scheme.to_dict()))) == scheme
    assert list(scheme.to_dict()) == ["format", "group_size", "symmetric", "scale_dtype", "kernel"]
    # what the methods use
    expected_fmt = get_format(fmt, **({} if symmetric is None else {"symmetric": symmetric}))
    assert scheme.weight_format() == expected_fmt
    assert scheme.weight_format() is not scheme.weight_format()  # a fresh instance per call
    name = scale_dtype if isinstance(scale_dtype, str) else str(scale_dtype).replace("torch.", "")
    assert scheme.scale_dtype == name and scheme.scale_torch_dtype == SCALE_DTYPES[name]
    for k in (1, 7, 64, 4096):
        expected = k if group_size in (None, -1) else min(group_size, k)
        assert scheme.resolve_group_size(k) == expected
    group = "channel" if group_size is None else f"g{group_size}"
    assert scheme.label() == f"{fmt}{' sym' if symmetric else ''} {group}"
    assert scheme.replace(kernel="auto").kernel == "auto"
    assert hash(scheme) == hash(WeightQuant.from_dict(scheme.to_dict()))


bad_values = {
    "format": [("int5", "unknown weight format 'int5'"), (4, "unknown weight format 4"),
               (None, "unknown weight format None"), ("", "unknown weight format ''"),
               ({"name": "int4"}, "format must be a registered format name"),
               (get_format("int4"), "format must be a registered format name")],
    "group_size": [(0, "group_size.*got 0"), (-5, "group_size.*got -5"), (3.5, "group_size.*got 3.5"),
                   (True, "group_size.*got True"), ("32", "group_size.*got '32'")],
    "symmetric": [(1, "symmetric.*got 1"), (0, "symmetric.*got 0"), ("yes", "symmetric.*got 'yes'")],
    "scale_dtype": [("float64", "scale_dtype.*'float64'"), ("int8", "scale_dtype: unsupported dtype 'int8'"),
                    (torch.float64, "scale_dtype.*float64"), (torch.int8, "scale_dtype.*int8"),
                    (None, "scale_dtype.*None")],
    "kernel": [("", "kernel.*got ''"), (None, "kernel.*got None"), (3, "kernel.*got 3")],
}


@settings(max_examples=120, deadline=None)
@given(data=st.data(), fmt=formats, group_size=group_sizes, scale_dtype=scale_dtypes)
def test_one_bad_field_is_a_value_error_naming_it(data, fmt, group_size, scale_dtype):
    field = data.draw(st.sampled_from(sorted(bad_values)))
    value, message = data.draw(st.sampled_from(bad_values[field]))
    good = dict(format=fmt, group_size=group_size, scale_dtype=scale_dtype)
    with pytest.raises(ValueError, match=message) as info:
        WeightQuant(**{**good, field: value})
    assert field in str(info.value)
    with pytest.raises(ValueError, match=message):
        WeightQuant.from_dict({**good, field: value})
    with pytest.raises(ValueError, match=message):
        WeightQuant(**good).replace(**{field: value})


@pytest.mark.parametrize("fmt", [name for name in FORMATS if name not in AFFINE])
@pytest.mark.parametrize("symmetric", [True, False])
def test_symmetric_only_for_formats_that_take_it(fmt, symmetric):
    with pytest.raises(ValueError, match=rf"'{fmt}'.*symmetric"):
        WeightQuant(fmt, 64, symmetric)
    assert WeightQuant(fmt, 64).weight_format() == get_format(fmt)


def test_defaults_positional_order_and_immutability():
    scheme = WeightQuant()
    assert scheme.to_dict() == {"format": "int4", "group_size": 128, "symmetric": None,
                                "scale_dtype": "bfloat16", "kernel": "auto"}
    assert WeightQuant("nf4", 64) == WeightQuant(format="nf4", group_size=64)
    assert WeightQuant.field_names() == ("format", "group_size", "symmetric", "scale_dtype", "kernel", "zero_point",
                                        "full_range")
    with pytest.raises(dataclasses.FrozenInstanceError):
        scheme.group_size = 32
    assert WeightQuant("int4", 64, True).label() == "int4 sym g64"
    assert WeightQuant("int8", None).label() == "int8 channel"
    assert WeightQuant("int4", 64, False).label() == "int4 g64"


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"no field\(s\) \['bits'\]"):
        WeightQuant.from_dict({"format": "int4", "bits": 4})
    with pytest.raises(ValueError, match=r"no field\(s\) \['bits'\]"):
        WeightQuant().replace(bits=4)
    with pytest.raises(ValueError, match="expects a mapping"):
        WeightQuant.from_dict([("format", "int4")])
    assert WeightQuant.from_dict({"format": "nf4"}) == WeightQuant("nf4")  # missing keys: defaults


def test_from_format_takes_instances_dicts_and_names():
    assert WeightQuant.from_format(get_format("int4", symmetric=True), 64) == WeightQuant("int4", 64, True)
    expected = WeightQuant("int3", None, scale_dtype="float16")
    assert WeightQuant.from_format({"name": "int3"}, None, scale_dtype="float16") == expected
    expected = WeightQuant("nf4", 32, kernel="reference")
    assert WeightQuant.from_format("nf4", 32, kernel="reference") == expected
    built = AffineFormat(4, symmetric=True)  # not built through get_format: found by its registered name
    assert WeightQuant.from_format(built, 32).weight_format() == built
    with pytest.raises(ValueError, match="contradicts"):
        WeightQuant.from_format(get_format("int4", symmetric=True), 64, symmetric=False)
    # None means "not given" (prepare_qat_'s default), so the format's own option stands
    assert WeightQuant.from_format(get_format("int4", symmetric=True), 64, symmetric=None).symmetric is True
    assert WeightQuant.from_format("int4", 64, symmetric=True).symmetric is True


def test_from_format_refuses_options_a_scheme_cannot_carry():
    class Scaled(AffineFormat):
        def __init__(self, bits: int = 4, symmetric: bool = False, offset: int = 0):
            super().__init__(bits, symmetric)
            self.offset = offset

        def options(self):
            return {**super().options(), "offset": self.offset}

    register_format("test_scheme_offset4", bits=4)(Scaled)
    try:
        with pytest.raises(ValueError, match=r"option\(s\) \['offset'\]"):
            WeightQuant.from_format(get_format("test_scheme_offset4", offset=2), 64)
        # a scheme of a registered name still builds that format with its defaults
        assert WeightQuant("test_scheme_offset4", 64).weight_format().offset == 0
    finally:
        unregister_format("test_scheme_offset4")


# ------------------------------------------------------------------------------ the configs carry it
CONFIG_DEFAULTS = {  # the scheme fields each config declares, and their defaults
    RTN: dict(format="int4", group_size=128, symmetric=None, scale_dtype="bfloat16", kernel="auto", zero_point=None, full_range=None),
    GPTQ: dict(format="int4", group_size=128, symmetric=None, scale_dtype="bfloat16", kernel="auto", zero_point=None, full_range=None),
    AWQ: dict(format="int4", group_size=128, symmetric=None, scale_dtype="bfloat16", kernel="auto", zero_point=None, full_range=None),
    HQQ: dict(format="int4", group_size=64, symmetric=None, scale_dtype="bfloat16", kernel="auto", zero_point=None, full_range=None),
    QuantLowRank: dict(format="int3", group_size=64, symmetric=None, scale_dtype="bfloat16", kernel="auto", zero_point=None, full_range=None),
    SparseGPT: dict(format=None, group_size=None, symmetric=None, scale_dtype="bfloat16"),
    SmoothQuant: dict(scale_dtype="float32", kernel="auto"),
}


@pytest.mark.parametrize("cls", list(CONFIG_DEFAULTS), ids=lambda c: c.__name__)
def test_every_quantizing_config_is_a_quantizes_weights(cls):
    assert issubclass(cls, QuantizesWeights)
    declared = {f.name: f.default for f in dataclasses.fields(cls) if f.name in WeightQuant.field_names()}
    assert declared == CONFIG_DEFAULTS[cls]


@settings(max_examples=60, deadline=None)
@given(fmt=st.sampled_from(AFFINE), group_size=group_sizes, symmetric=symmetrics,
       scale_dtype=st.sampled_from(list(SCALE_DTYPES)), kernel=kernels)
def test_same_fields_give_the_same_scheme_in_every_config(fmt, group_size, symmetric, scale_dtype, kernel):
    scheme = WeightQuant(fmt, group_size, symmetric, scale_dtype, kernel)
    fields = scheme.to_dict()
    configs = [RTN(**fields), GPTQ(**fields), AWQ(**fields), QuantLowRank(**fields)]
    configs.append(SparseGPT(0.5, **{k: v for k, v in fields.items() if k != "kernel"}))
    if not symmetric:  # HQQ refits a zero point: asymmetric only
        configs.append(HQQ(**fields))
    for config in configs:
        expected = scheme if "kernel" in CONFIG_DEFAULTS[type(config)] else scheme.replace(kernel="auto")
        if "symmetric" not in CONFIG_DEFAULTS[type(config)]:
            expected = expected.replace(symmetric=None)
        assert config.scheme == expected, type(config).__name__
        assert config.weight_format() == expected.weight_format()
        assert MethodConfig.from_dict(config.to_dict()).scheme == config.scheme


def test_smoothquant_fixes_int8_symmetric_per_channel():
    config = SmoothQuant(0.5, scale_dtype="bfloat16", kernel="reference")
    assert config.scheme == WeightQuant("int8", None, True, "bfloat16", "reference")
    assert config.weight_format() == get_format("int8", symmetric=True)
    assert "format" not in config.to_dict()


def test_sparsegpt_without_a_format_has_no_scheme():
    config = SparseGPT(0.5)
    assert config.scheme is None and config.weight_format() is None
    with pytest.raises(ValueError, match="scale_dtype"):  # a bad value is refused even before a format is set
        SparseGPT(0.5, scale_dtype="int8")
    with pytest.raises(ValueError, match="apply only with a quantization format"):
        SparseGPT(0.5, group_size=32)
    assert SparseGPT(0.5, format="nf4", group_size=32).scheme == WeightQuant("nf4", 32)


@pytest.mark.parametrize("make, message", [
    (lambda: RTN("int4", 32, kernel="bogus"), "unknown kernel 'bogus'"),
    (lambda: GPTQ(kernel="bogus"), "unknown kernel 'bogus'"),
    (lambda: SmoothQuant(kernel="bogus"), "unknown kernel 'bogus'"),
    (lambda: HQQ("nf4", 32), "nf4"),
    (lambda: HQQ("int4", 32, scale_dtype="int8"), "unsupported dtype 'int8'"),
    (lambda: QuantLowRank("int4", 32, symmetric=True, base="hqq"), "zero point"),
    (lambda: AWQ(format="int9"), "unknown weight format 'int9'"),
    (lambda: GPTQ(group_size=0), "group_size.*got 0"),
    (lambda: RTN("nf4", 64, symmetric=True), "'nf4'.*symmetric"),
])
def test_config_errors_name_the_problem(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_kernel_name_check():
    assert check_kernel_name("auto") == "auto"
    assert check_kernel_name("reference") == "reference"
    with pytest.raises(ValueError, match=r"unknown kernel 'nope'; use 'auto' or one of \["):
        check_kernel_name("nope")


def test_scheme_is_not_part_of_equality_hash_repr_or_pickle():
    config = RTN("int4", 64)
    assert "scheme" not in repr(config) and "_scheme" not in config.to_dict()
    assert config == RTN("int4", 64) and hash(config) == hash(RTN("int4", 64))
    again = pickle.loads(pickle.dumps(config))
    assert again == config and again.scheme == config.scheme
    changed = dataclasses.replace(config, group_size=32)
    assert changed.scheme == WeightQuant("int4", 32)


def test_weight_quant_fields_mirror_the_scheme():
    """WeightQuantFields declares the scheme's fields, in the scheme's order, with the scheme's defaults."""
    mixin = [(f.name, f.default) for f in dataclasses.fields(WeightQuantFields)]
    scheme = [(f.name, f.default) for f in dataclasses.fields(WeightQuant)]
    assert mixin == scheme


def test_a_new_config_adopts_the_scheme_in_one_line():
    @dataclasses.dataclass(frozen=True)
    class Toy(WeightQuantFields, MethodConfig):
        name = "toy_scheme"
        group_size: int = 64  # a redeclared default keeps the field's place
        steps: int = 3

    config = Toy("nf4")
    assert list(config.to_dict()) == ["method", "format", "group_size", "symmetric", "scale_dtype", "kernel",
                                      "steps"]
    assert config.scheme == WeightQuant("nf4", 64)
    assert list(inspect.signature(Toy).parameters)[:2] == ["format", "group_size"]
    with pytest.raises(ValueError, match="unknown kernel"):
        Toy(kernel="nope")

    @dataclasses.dataclass(frozen=True)
    class Checked(WeightQuantFields, MethodConfig):
        name = "toy_checked"
        steps: int = 3

        def __post_init__(self) -> None:
            if self.steps < 1:
                raise ValueError("steps must be >= 1")
            super().__post_init__()

    assert Checked().scheme == WeightQuant()
    with pytest.raises(ValueError, match="steps"):
        Checked(steps=0)


def test_a_config_with_its_own_field_names_and_an_optional_format():
    """LoRA's shape: ``quantize_base`` (a format name or None) and ``quant_group_size``."""
    @dataclasses.dataclass(frozen=True)
    class Adapters(QuantizesWeights, MethodConfig):
        name = "toy_adapters"
        scheme_optional = True
        scheme_field_names = {"format": "quantize_base", "group_size": "quant_group_size"}
        rank: int = 8
        quantize_base: Optional[str] = None
        quant_group_size: Optional[int] = 64

    assert Adapters().scheme is None and Adapters().weight_format() is None
    assert Adapters(quantize_base="nf4").scheme == WeightQuant("nf4", 64)
    assert Adapters(quantize_base="int4", quant_group_size=None).weight_format() == get_format("int4")
    with pytest.raises(ValueError, match=r"quant_group_size: group_size .*got 0"):
        Adapters(quant_group_size=0)
    with pytest.raises(ValueError, match="unknown weight format 'int5'"):
        Adapters(quantize_base="int5")
    assert list(Adapters().to_dict()) == ["method", "rank", "quantize_base", "quant_group_size"]


# ------------------------------------------------------------------------------ serialised forms, pinned
# The five scheme fields are declared once (WeightQuantFields), so they come first in every config that
# carries them all; SparseGPT (optional format, sparsity first) and SmoothQuant (fixed int8) declare theirs
# in place. A dict written with the previous key order (scheme fields interleaved with the method's own)
# still loads: from_dict reads keys by name.
PINNED = [
    (RTN("int4", 64),
     [("method", "rtn"), ("format", "int4"), ("group_size", 64), ("symmetric", None),
      ("scale_dtype", "bfloat16"), ("kernel", "auto")], None),
    (GPTQ("int4", 64, act_order=True),
     [("method", "gptq"), ("format", "int4"), ("group_size", 64), ("symmetric", None), ("scale_dtype", "bfloat16"),
      ("kernel", "auto"), ("act_order", True), ("damp", 0.01), ("block_size", 128), ("propagate", "quantized")],
     [("method", "gptq"), ("format", "int4"), ("group_size", 64), ("symmetric", None), ("act_order", True),
      ("damp", 0.01), ("block_size", 128), ("scale_dtype", "bfloat16"), ("kernel", "auto"),
      ("propagate", "quantized")]),
    (AWQ("int4", 32),
     [("method", "awq"), ("format", "int4"), ("group_size", 32), ("symmetric", None), ("scale_dtype", "bfloat16"),
      ("kernel", "auto"), ("grid", 20), ("duo_scaling", False), ("clip", True), ("clip_grid", 20),
      ("max_shrink", 0.5), ("fold", True), ("propagate", "float"), ("rounding", "rtn"), ("act_order", True),
      ("damp", 0.01)],
     [("method", "awq"), ("format", "int4"), ("group_size", 32), ("symmetric", None), ("grid", 20),
      ("duo_scaling", False), ("clip", True), ("clip_grid", 20), ("max_shrink", 0.5), ("fold", True),
      ("scale_dtype", "bfloat16"), ("kernel", "auto"), ("propagate", "float")]),
    (HQQ("int3", None, round_zero=True),
     [("method", "hqq"), ("format", "int3"), ("group_size", None), ("symmetric", None), ("scale_dtype", "bfloat16"),
      ("kernel", "auto"), ("iters", 20), ("lp_norm", 0.7), ("round_zero", True)],
     [("method", "hqq"), ("format", "int3"), ("group_size", None), ("iters", 20), ("lp_norm", 0.7),
      ("scale_dtype", "bfloat16"), ("kernel", "auto"), ("round_zero", True)]),
    (QuantLowRank("int4", 32, symmetric=True, rank=16),
     [("method", "quant_lowrank"), ("format", "int4"), ("group_size", 32), ("symmetric", True),
      ("scale_dtype", "bfloat16"), ("kernel", "auto"), ("rank", 16), ("activation_aware", False), ("base", "rtn"),
      ("factor_dtype", "bfloat16"), ("damp", 0.01), ("propagate", "float")],
     [("method", "quant_lowrank"), ("format", "int4"), ("group_size", 32), ("symmetric", True), ("rank", 16),
      ("activation_aware", False), ("base", "rtn"), ("scale_dtype", "bfloat16"), ("kernel", "auto"),
      ("factor_dtype", "bfloat16"), ("damp", 0.01), ("propagate", "float")]),
    (SparseGPT(0.5, format="int4", group_size=64),
     [("method", "sparsegpt"), ("sparsity", 0.5), ("pattern", "unstructured"), ("scope", "row"),
      ("block_size", 128), ("damp", 0.01), ("format", "int4"), ("group_size", 64), ("symmetric", None),
      ("scale_dtype", "bfloat16"), ("propagate", "quantized"), ("value_dtype", None)], None),
    (SmoothQuant(0.5),
     [("method", "smoothquant"), ("alpha", 0.5), ("fold", True), ("scale_dtype", "float32"),
      ("kernel", "auto"), ("propagate", "float")], None),
]


@pytest.mark.parametrize("config, expected, previous", PINNED)
def test_to_dict_is_pinned_and_previous_dicts_still_load(config, expected, previous):
    assert list(config.to_dict().items()) == expected  # keys, values and order
    assert MethodConfig.from_dict(config.to_dict()) == config
    if previous is not None:  # a recipe or manifest written by the previous layout
        assert MethodConfig.from_dict(dict(previous)) == config


def test_labels_are_exactly_as_before():
    assert RTN("int4", 64, symmetric=True).label() == "rtn int4 sym g64"
    assert RTN("int8", None).label() == "rtn int8 channel"
    assert GPTQ("int4", 64, symmetric=True, act_order=True).label() == "gptq int4 g64 act-order"
    assert AWQ("int3", None, propagate="quantized").label() == "awq int3 channel quantized-propagation"
    assert HQQ("int4", 128, round_zero=True).label() == "hqq int4 g128 rz"
    assert QuantLowRank("int4", 32, symmetric=True, rank=16).label() == "rtn int4 sym g32 + rank 16 plain"
    assert SparseGPT(0.5, format="nf4").label() == "sparsegpt 50% per-row + nf4 channel"
    assert [c.label() for c in RTN.benchmark_configs()] == [
        "rtn int8 channel", "rtn int4 g128", "rtn int4 g64", "rtn int3 g64", "rtn nf4 g64"]


def test_positional_arguments():
    """Configs are called with the format and group size first (``RTN("int4", 64)``), then symmetric;
    SparseGPT with the sparsity first. (No caller passes more positional arguments: the method's own
    options follow the scheme's five fields and are passed by keyword.)"""
    def params(cls):
        return list(inspect.signature(cls).parameters)

    assert params(RTN) == ["format", "group_size", "symmetric", "scale_dtype", "kernel", "zero_point", "full_range"]
    for cls in (GPTQ, AWQ, HQQ, QuantLowRank):
        assert params(cls)[:7] == params(RTN), cls.__name__
    assert params(SparseGPT)[0] == "sparsity" and params(SmoothQuant)[0] == "alpha"
    assert isinstance(llmopt.RTN("int4", 64), RTN)
