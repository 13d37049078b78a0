"""Bad or extreme inputs of issue 13 (items 4-9, 11): each is refused with a clear error naming the layer
or the key, or handled correctly; never a silent wrong result."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import llmopt
from llmopt import RTN, CompressionError, compress_
from llmopt.core.formats import get_format
from llmopt.calibration import collect_stats, forward_keywords
from llmopt.nn import QuantLinear
from llmopt.testing import ToyMLP

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# Item 4: weights near the float32 limit


def _rtn_reference(weight: torch.Tensor, bits: int, group_size: int) -> "tuple[torch.Tensor, torch.Tensor]":
    """Asymmetric RTN in float64: the dequantized weight and each element's scale."""
    qmax, mid = (1 << bits) - 1, 1 << (bits - 1)
    n, k = weight.shape
    w = weight.to(torch.float64).reshape(n, k // group_size, group_size)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((hi - lo) / qmax).clamp_min(1e-8)
    zero = lo + mid * scale
    codes = ((w - zero) / scale).round().add(mid).clamp(0, qmax)
    deq = (codes - mid) * scale + zero
    return deq.reshape(n, k), scale.expand_as(w).reshape(n, k)


@settings(max_examples=40, deadline=None)
@given(exponent=st.floats(-30, 38.48), sign=st.sampled_from([1.0, -1.0]),
       scale_dtype=st.sampled_from(["float32", "bfloat16", "float16"]), seed=st.integers(0, 2**16))
def test_item4_extreme_weights_quantize_finite_or_refused(exponent, sign, scale_dtype, seed):
    magnitude = 10.0 ** exponent  # up to ~3e38, inside float32
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 4))
    with torch.no_grad():
        weight = torch.randn(4, 64, generator=gen, dtype=torch.float64)
        weight[0, 0], weight[0, 1] = sign * magnitude, -sign * magnitude  # max - min = 2 * magnitude
        model[0].weight.copy_(weight.to(torch.float32))
    weight = model[0].weight.detach().to(torch.float64).clone()
    ref, ref_scale = _rtn_reference(weight, 4, 32)
    fits = float(ref_scale.max()) * 8 < torch.finfo(getattr(torch, scale_dtype)).max * 0.99
    too_big = float(ref_scale.max()) > torch.finfo(getattr(torch, scale_dtype)).max * 1.01
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            compress_(model, RTN("int4", 32, scale_dtype=scale_dtype))
        except CompressionError as exc:
            assert not fits, f"refused a representable weight: {exc}"
            assert "layer '0'" in str(exc) and scale_dtype in str(exc), str(exc)
            assert isinstance(model[0], nn.Linear)  # left as it was
            return
    assert not too_big, "a scale the scale dtype cannot hold was accepted"
    got = model[0].dequantize_weight(torch.float64)
    assert torch.isfinite(got).all(), "dequantized weight has NaN/Inf"
    # Each value within half a step of the weight (plus the scale dtype's rounding of the parameters),
    # and within one step of the float64 reference (a rounding tie may go either way).
    eps = {"float32": 2**-22, "bfloat16": 2**-7, "float16": 2**-10}[scale_dtype]
    slack = eps * float(weight.abs().max()) + 1e-6  # float16 cannot hold scales below ~6e-8
    assert bool(((got - weight).abs() <= 0.5 * ref_scale * (1 + eps) + slack).all())
    assert bool(((got - ref).abs() <= ref_scale * (1 + eps) + slack).all())


def test_item4_plus_minus_3e38_int4_g32():
    """The issue's case: +-3e38 in a row, RTN int4 g32 -> finite, and each weight within half a step."""
    model = nn.Sequential(nn.Linear(64, 16))
    with torch.no_grad():
        model[0].weight[0, 0], model[0].weight[0, 1] = 3e38, -3e38
    weight = model[0].weight.detach().to(torch.float64).clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compress_(model, RTN("int4", 32))
        got = model[0].dequantize_weight(torch.float64)
    assert torch.isfinite(got).all()
    ref, ref_scale = _rtn_reference(weight, 4, 32)
    assert bool(((got - weight).abs() <= 0.5 * ref_scale * 1.01 + 2**-7 * 3e38).all())
    assert abs(float(got[0, 0]) - 3e38) < 3e38 * 0.01 and abs(float(got[0, 1]) + 3e38) < 3e38 * 0.01


@pytest.mark.parametrize("method", [llmopt.HQQ("int4", 32), llmopt.GPTQ("int4", 32),
                                    llmopt.SparseGPT(0.5, format="int4", group_size=32),
                                    RTN("int4", 32, symmetric=True), RTN("nf4", 32)],
                         ids=lambda m: m.label())
def test_item4_other_methods_at_3e38(method):
    """HQQ, GPTQ's grid, SparseGPT + int4, symmetric and codebook formats: finite at +-3e38."""
    model = nn.Sequential(nn.Linear(64, 16))
    with torch.no_grad():
        model[0].weight[0, 0], model[0].weight[0, 1] = 3e38, -3e38
    calibration = [torch.randn(4, 64)] if method.needs_calibration else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compress_(model, method, calibration=calibration)
        got = model[0].dequantize_weight(torch.float64)
    assert torch.isfinite(got).all()
    assert abs(float(got[0, 0]) - 3e38) < 0.1 * 3e38


def test_item4_unrepresentable_refused_with_layer_named():
    """A scale float16 cannot hold, and an int2 grid whose end codes overflow: refused, model untouched."""
    for method in (RTN("int4", 32, scale_dtype="float16"), RTN("int2", 32, scale_dtype="float32")):
        model = nn.Sequential(nn.Linear(64, 16))
        with torch.no_grad():
            model[0].weight[0, 0], model[0].weight[0, 1] = 3.3e38, -3.3e38
        with pytest.raises(CompressionError, match=r"layer '0'.*too large"):
            compress_(model, method)
        assert type(model[0]) is nn.Linear


# ----------------------------------------------------------------------------------------------
# Item 5: QuantLinear.from_codes checks the codes


@pytest.mark.parametrize("fmt, bad", [("int4", 200), ("int4", 16), ("int2", 4), ("nf4", 255)])
def test_item5_from_codes_refuses_codes_out_of_range(fmt, bad):
    f = get_format(fmt)
    codes = torch.zeros(4, 32, dtype=torch.uint8)
    codes[1, 3] = bad
    scale = torch.ones(4, 1)
    zero = torch.zeros(4, 1) if f.has_zero_point else None
    with pytest.raises(ValueError, match=rf"QuantLinear.from_codes: codes must lie in \[0, {1 << f.bits}\).*{bad}"):
        QuantLinear.from_codes(codes, scale, zero, format=fmt, group_size=32)
    negative = codes.to(torch.int32)
    negative[1, 3] = -1
    with pytest.raises(ValueError, match="codes must lie in"):
        QuantLinear.from_codes(negative, scale, zero, format=fmt, group_size=32)
    with pytest.raises(ValueError, match="scale has NaN/Inf"):
        QuantLinear.from_codes(torch.zeros(4, 32, dtype=torch.uint8), torch.full((4, 1), float("nan")),
                               zero, format=fmt, group_size=32)
    # In range: accepted, and the codes come back as given.
    codes[1, 3] = (1 << f.bits) - 1
    layer = QuantLinear.from_codes(codes, scale, zero, format=fmt, group_size=32)
    assert torch.equal(layer.codes(), codes)


# ----------------------------------------------------------------------------------------------
# Item 6: Inf activations are refused by every calibrated method, AWQ included


@pytest.mark.parametrize("method", [llmopt.AWQ("int4", 32), llmopt.AWQ("int4", 32, fold=False, clip=False),
                                    llmopt.SmoothQuant(), llmopt.GPTQ("int4", 32), llmopt.Wanda(0.5)],
                         ids=lambda m: m.label())
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_item6_awq_refuses_inf_activations(method, bad, snapshot):
    model = ToyMLP()
    before = snapshot(model)
    x = torch.randn(2, 8, 96)
    x[0, 0, 3] = bad
    with pytest.raises(CompressionError, match=r"layer 'up'.*NaN/Inf"):
        compress_(model, method, calibration=[x])
    before.check()


# ----------------------------------------------------------------------------------------------
# Item 7: calibration dict keys the model's forward does not take


class _KwargsModel(nn.Module):
    """A forward that swallows anything through **kwargs (as Hugging Face models do)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(128, 32)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(32, 32)) for _ in range(2))

    def forward(self, input_ids, attention_mask=None, **kwargs):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("key, hint", [("bogus", None), ("attention_msk", "attention_mask")])
def test_item7_calibration_dict_refuses_unknown_keys(key, hint, snapshot):
    ids = torch.randint(0, 128, (2, 16))
    model = _KwargsModel()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"calibration batch 0: key\(s\) \['{key}'\] are not keyword arguments "
                                         r"of _KwargsModel.forward") as info:
        compress_(model, llmopt.GPTQ("int4", 32), calibration=[{"input_ids": ids, key: torch.ones(2, 16)}])
    assert "'attention_mask', 'input_ids'" in str(info.value)  # what the forward takes
    if hint:
        assert f"did you mean '{hint}'" in str(info.value)
    before.check()
    # The named keys pass.
    compress_(model, llmopt.GPTQ("int4", 32), calibration=[{"input_ids": ids, "attention_mask": torch.ones(2, 16)}])


def test_item7_hf_llama_keys():
    """A Llama's real keys pass (explicit, typed **kwargs and the usual HF ones); a typo is refused."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    ids = torch.randint(0, 128, (2, 16))
    good = {"input_ids": ids, "attention_mask": torch.ones(2, 16, dtype=torch.long),
            "position_ids": torch.arange(16).expand(2, -1), "labels": ids, "output_attentions": False,
            "use_cache": False}
    accepted = forward_keywords(model)
    assert set(good) <= accepted and {"inputs_embeds", "output_hidden_states", "return_dict"} <= accepted
    with pytest.raises(ValueError, match=r"'attention_mask' for 'attention_msk'"):
        compress_(model, llmopt.GPTQ("int4", 32),
                  calibration=[{"input_ids": ids, "attention_msk": torch.ones(2, 16, dtype=torch.long)}])
    assert collect_stats(model, [good], include="*.q_proj")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compress_(model, llmopt.GPTQ("int4", 32), calibration=[good])


# ----------------------------------------------------------------------------------------------
# Item 9: a bare tensor as calibration


@pytest.mark.parametrize("data", [torch.randint(0, 128, (2, 16)), {"input_ids": torch.randint(0, 128, (2, 16))}],
                         ids=["tensor", "dict"])
def test_item9_bare_tensor_calibration_says_what_is_expected(data, snapshot):
    model = llmopt.testing.ToyTransformer()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"must be a list of batches, got a single .*wrap it in a list"):
        compress_(model, llmopt.GPTQ("int4", 32), calibration=data)
    with pytest.raises(ValueError, match=r"must be a list of batches"):
        compress_(model, [RTN("int4", 32), llmopt.AWQ("int4", 32)], calibration=data)
    before.check()
    compress_(model, llmopt.GPTQ("int4", 32), calibration=[data])  # wrapped: one batch


# ----------------------------------------------------------------------------------------------
# Item 8: an override that cannot apply is reported


@pytest.mark.parametrize("later", [llmopt.RTN("int4", 32), llmopt.GPTQ("int4", 32), llmopt.SVD(rank=8)],
                         ids=lambda m: m.name)
def test_item8_override_that_cannot_apply_is_in_report_skipped(later):
    model = ToyMLP()
    stages = [llmopt.Stage(llmopt.Wanda(0.5)), llmopt.Stage(later, overrides={"up": llmopt.SVD(rank=500)})]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = compress_(model, stages, calibration=[torch.randn(2, 8, 96)])
    reason = report.skipped.get("up", "")
    assert "stage 1" in reason and "override 'up' (svd) cannot apply" in reason and "SparseLinear" in reason, \
        report.skipped
    assert "wanda" in reason
    assert type(model.up).__name__ == "SparseLinear"  # as the Wanda stage made it


# ----------------------------------------------------------------------------------------------
# Item 11: CLI user errors are one line with exit status 2; "(nanx)"; prune_heads_'s blocks_path


def _cli_error(capsys, argv):
    from llmopt.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, err)
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"llmopt {argv[0]}: error: "), err
    return err


def test_item11_cli_user_errors_one_line_exit_2(tmp_path, capsys):
    pytest.importorskip("transformers")
    recipe = tmp_path / "rtn.yaml"
    recipe.write_text("stages:\n  - method: rtn\n    format: int4\n")
    (tmp_path / "notsave").mkdir()
    (tmp_path / "notsave" / "weights.bin").write_bytes(b"\0" * 16)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text("{}")
    (corrupt / "llmopt.json").write_text("{not json")
    fake = tmp_path / "fake.gguf"
    fake.write_text("not a gguf file")

    err = _cli_error(capsys, ["bench", str(tmp_path / "notsave")])
    assert "notsave" in err and "neither an llmopt save" in err
    err = _cli_error(capsys, ["report", str(corrupt)])
    assert "corrupt" in err
    for command in (["compress", "--model", str(fake), "--recipe", str(recipe), "--out", str(tmp_path / "o")],
                    ["bench", str(fake)]):
        err = _cli_error(capsys, command)
        assert "fake.gguf" in err and "not a GGUF file" in err
    assert not (tmp_path / "o").exists()


def test_item11_cli_loader_errors_are_user_errors(tmp_path, capsys, monkeypatch):
    """A ValueError / OSError / CompressionError escaping a command is one line, exit 2; another exception
    (a bug) keeps its traceback."""
    import llmopt.cli as cli

    for exc in (ValueError("bad file 'x': truncated"), OSError(2, "No such file", "x.bin"),
                CompressionError("layer 'a': boom")):
        def boom(args, exc=exc):
            raise exc
        monkeypatch.setattr(cli, "cmd_report", boom)
        err = _cli_error(capsys, ["report", str(tmp_path)])
        assert ("'x'" in err or "'x.bin'" in err or "layer 'a'" in err), err

    def bug(args):
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(cli, "cmd_report", bug)
    with pytest.raises(ZeroDivisionError):
        cli.main(["report", str(tmp_path)])


def test_item11_recompress_reports_no_nan_ratio():
    model = ToyMLP()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compress_(model, RTN("int4", 32))
        report = compress_(model, RTN("int4", 32))
    assert not report.replaced and set(report.skipped) == {"up", "down"}
    assert "nan" not in str(report).lower() and "nothing compressed" in str(report)
    assert report.compression_ratio == 1.0 and report.to_dict()["compression_ratio"] == 1.0


def test_item11_prune_heads_error_names_blocks_path():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises((ValueError, CompressionError)) as info:
            llmopt.prune_heads_(ToyMLP(), 0.5)
    assert "blocks_path='...'" in str(info.value) and " path='" not in str(info.value), str(info.value)
