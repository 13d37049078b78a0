"""Rotate: the rotated model computes the same function (float64, ~1e-14), the rotations are orthogonal,
the norms are folded, the head untied; outliers planted in the residual channels hurt RTN less after it;
save/load is bit-exact; non-Llama models are refused untouched; it composes in recipes."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

import llmopt
from llmopt.core.targets import is_compressed
from llmopt.methods.base import unregister_method
from llmopt.methods.quant.rotate import RotateReport, hadamard_matrix, random_orthogonal, rotation_matrix
from llmopt.testing import ToyMLP, ToyTransformer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")


def _llama(hidden=64, heads=4, kv=2, tie=True, layers=2, bias=False, head_dim=None, seed=0, intermediate=128):
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=tie,
        attention_bias=bias, mlp_bias=bias, head_dim=head_dim)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norm gains and biases, so folding them is tested (HF inits ones and zeros)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


@pytest.fixture
def float64_norms(monkeypatch):
    """HF's LlamaRMSNorm computes in float32 whatever the input; the exactness checks run in float64, so
    patch it to keep the input's dtype (the same function, without the float32 rounding)."""
    from transformers.models.llama import modeling_llama

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


def _ids(batch=2, seq=12, seed=1):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------------------------------ matrices
@pytest.mark.parametrize("n", [1, 2, 16, 24, 64, 96])
@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
def test_rotation_matrices_are_orthogonal_and_seeded(n, kind):
    q = rotation_matrix(n, kind, torch.Generator().manual_seed(3))
    assert q.dtype == torch.float64 and q.shape == (n, n)
    eye = torch.eye(n, dtype=torch.float64)
    assert torch.allclose(q.T @ q, eye, atol=1e-12, rtol=0)
    assert torch.equal(q, rotation_matrix(n, kind, torch.Generator().manual_seed(3)))
    if n > 2:
        assert not torch.equal(q, rotation_matrix(n, kind, torch.Generator().manual_seed(4)))
    if kind == "hadamard" and n & (n - 1) == 0:  # every entry +-1/sqrt(n): no coordinate is favoured
        assert torch.allclose(q.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64), atol=1e-15, rtol=0)


def test_hadamard_and_orthogonal_helpers():
    h = hadamard_matrix(8)
    assert torch.allclose(h @ h.T, torch.eye(8, dtype=torch.float64), atol=1e-15)
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_matrix(12)
    with pytest.raises(ValueError, match="unknown rotation kind"):
        rotation_matrix(8, "givens")
    q = random_orthogonal(5, torch.Generator().manual_seed(0))
    assert torch.allclose(q @ q.T, torch.eye(5, dtype=torch.float64), atol=1e-12)


# ------------------------------------------------------------------------------------------ exactness
CASES = [
    # (hidden, heads, kv, head_dim, tie, bias): GQA with power-of-two sizes; a hidden size that is not a
    # power of two (random orthogonal Q) with a power-of-two head_dim; multi-head attention with a head_dim
    # that is not one either; biases on every Linear; a head_dim unrelated to hidden / heads.
    pytest.param(64, 4, 2, None, True, False, id="gqa-h64-tied"),
    pytest.param(64, 4, 2, None, False, False, id="gqa-h64-untied"),
    pytest.param(96, 3, 1, None, True, False, id="mqa-h96-hd32-tied"),
    pytest.param(96, 4, 4, None, False, False, id="mha-h96-hd24-untied"),
    pytest.param(64, 4, 2, None, False, True, id="gqa-h64-biases"),
    pytest.param(64, 4, 2, 8, True, False, id="gqa-h64-hd8"),
]


@pytest.mark.parametrize("hidden, heads, kv, head_dim, tie, bias", CASES)
@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
def test_rotated_model_computes_the_same_logits(hidden, heads, kv, head_dim, tie, bias, kind, float64_norms):
    model = _llama(hidden, heads, kv, tie=tie, bias=bias, head_dim=head_dim).double()
    ids = _ids()
    reference = _logits(model, ids)
    embed = model.model.embed_tokens.weight.detach().clone()
    report = llmopt.compress_(model, llmopt.Rotate(seed=5, kind=kind))
    assert _rel(_logits(model, ids), reference) < 1e-10
    # The residual rotation is the orthogonal matrix of the seed, applied to the embedding rows.
    q = rotation_matrix(hidden, kind, torch.Generator().manual_seed(5))
    assert torch.allclose(q.T @ q, torch.eye(hidden, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.allclose(model.model.embed_tokens.weight, embed @ q, atol=1e-13, rtol=0)
    # Every norm gain was folded: the norms are ones now.
    norms = [m for n, m in model.named_modules() if n.endswith("norm")]
    assert len(norms) == 2 * 2 + 1 and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    # A tied head got its own copy; the config says so, so transformers does not tie it again.
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    details = report.details[0]
    assert isinstance(details, RotateReport) and details.untied_head == tie
    assert details.extra_bytes == (256 * hidden * 8 if tie else 0)
    assert report.bytes_after - report.bytes_before == details.extra_bytes
    assert details.hidden_size == hidden and details.blocks == 2 and len(details.norms_folded) == 5
    assert details.residual_rotation == ("randomised hadamard" if kind == "hadamard" and hidden == 64
                                         else "random orthogonal")
    assert set(report.replaced) >= {"model.embed_tokens", "lm_head", "model.norm", "model.layers.1.mlp.down_proj"}
    assert report.skipped == {} and report.methods == [llmopt.Rotate(seed=5, kind=kind).to_dict()]


def test_without_head_rotation_v_and_o_only_see_the_residual_rotation(float64_norms):
    model = _llama().double()
    ids = _ids()
    reference = _logits(model, ids)
    v = model.model.layers[0].self_attn.v_proj.weight.detach().clone()
    g = model.model.layers[0].input_layernorm.weight.detach().clone()
    report = llmopt.compress_(model, llmopt.Rotate(rotate_heads=False))
    assert _rel(_logits(model, ids), reference) < 1e-10
    q = rotation_matrix(64, "hadamard", torch.Generator().manual_seed(0))
    assert torch.allclose(model.model.layers[0].self_attn.v_proj.weight, (v * g) @ q, atol=1e-13, rtol=0)
    assert report.details[0].head_rotation is None and "value heads left alone" in str(report.details[0])


def test_float32_and_bfloat16_models_stay_close():
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.05)):
        model = _llama().to(dtype)
        ids = _ids()
        reference = _logits(model, ids)
        llmopt.compress_(model, llmopt.Rotate())
        assert all(p.dtype == dtype for p in model.parameters())
        assert _rel(_logits(model, ids), reference) < tol, dtype


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = _llama(), _llama(), _llama()
    llmopt.compress_(a, llmopt.Rotate(seed=1))
    llmopt.compress_(b, llmopt.Rotate(seed=1))
    llmopt.compress_(c, llmopt.Rotate(seed=2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)


# ------------------------------------------------------------------------------------------ outliers
def _plant_outliers(model, channels=(3, 17, 40, 77), factor=20.0):
    """Residual channels ``factor`` times larger in every Linear reading the residual (q/k/v, gate/up and
    the head), as the massive activations of trained LLMs make them: one large column per group of the
    quantizer, so its scale crushes the other columns of that group."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "gate_proj",
                                                                            "up_proj", "lm_head"):
                module.weight[:, list(channels)] *= factor
    return model


READERS = ["*q_proj", "*k_proj", "*v_proj", "*gate_proj", "*up_proj", "lm_head"]


def _rtn_errors(base, fmt):
    """Relative logit error of RTN on the residual readers, without and with Rotate first."""
    ids = _ids(batch=4, seq=32)
    reference = _logits(base, ids)
    # Only the readers are quantized (in both models), so their error is what is measured: o/down
    # hold no planted outliers, and their RTN error would only add the same noise to both.
    stage = llmopt.Stage(llmopt.RTN(fmt, 32), include=READERS)
    plain, rotated = copy.deepcopy(base), copy.deepcopy(base)
    llmopt.compress_(plain, stage)
    llmopt.compress_(rotated, [llmopt.Rotate(), stage])
    assert is_compressed(rotated.lm_head) and is_compressed(rotated.model.layers[0].self_attn.q_proj)
    return _rel(_logits(plain, ids), reference), _rel(_logits(rotated, ids), reference)


@pytest.mark.parametrize("fmt", ["int3", "int4"])
def test_rotation_lowers_rtn_error_on_outlier_channels(fmt):
    # Measured (2 blocks, hidden 128): int3 0.72 -> 0.48, int4 0.37 -> 0.24 (ratios 0.66, 0.65); without
    # planted outliers the ratio is 0.99-1.04, so the assertion tests the outliers' removal.
    base = _plant_outliers(_llama(hidden=128, heads=4, kv=2, tie=False, intermediate=256))
    err_plain, err_rotated = _rtn_errors(base, fmt)
    assert err_rotated < 0.75 * err_plain, (err_rotated, err_plain)
    control_plain, control_rotated = _rtn_errors(_llama(hidden=128, heads=4, kv=2, tie=False, intermediate=256), fmt)
    assert control_rotated > 0.85 * control_plain, (control_rotated, control_plain)


# ------------------------------------------------------------------------------------------ save / load
def _skeleton(config):
    # Built for real (accelerate's init_empty_weights would not tie the head): the load must break the tie.
    torch.manual_seed(99)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("then_rtn", [False, True], ids=["rotate", "rotate+rtn"])
def test_save_load_round_trip_is_bit_exact_and_keeps_the_head_untied(then_rtn, tmp_path, bit_equal):
    model = _llama(tie=True)
    original_config = copy.deepcopy(model.config)  # tied, as a user rebuilding the architecture would have it
    stages = [llmopt.Rotate()] + ([llmopt.RTN("int4", 32)] if then_rtn else [])
    llmopt.compress_(model, stages)
    llmopt.save(model, tmp_path)
    skeleton = _skeleton(original_config)
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
    llmopt.load(skeleton, tmp_path)
    assert skeleton.config.tie_word_embeddings is False
    expected, got = model.state_dict(), skeleton.state_dict()
    assert expected.keys() == got.keys() and all(bit_equal(expected[k], got[k]) for k in expected)
    if not then_rtn:
        assert skeleton.lm_head.weight is not skeleton.model.embed_tokens.weight
    ids = _ids()
    assert torch.equal(_logits(skeleton, ids), _logits(model, ids))


def test_save_pretrained_load_pretrained_round_trip(tmp_path):
    model = _llama(tie=True)
    llmopt.compress_(model, [llmopt.Rotate(), llmopt.RTN("int4", 32)], exclude=None)
    llmopt.save_pretrained(model, tmp_path)
    loaded, _ = llmopt.load_pretrained(tmp_path)
    assert loaded.config.tie_word_embeddings is False
    ids = _ids()
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("build", [ToyMLP, ToyTransformer], ids=["ToyMLP", "ToyTransformer"])
def test_non_llama_models_are_refused_and_left_alone(build, snapshot):
    model = build()
    before = snapshot(model)
    with pytest.raises(ValueError, match="Rotate supports Llama-style"):
        llmopt.compress_(model, llmopt.Rotate())
    before.check()


class _GemmaStyleNorm(nn.Module):
    """An RMSNorm scaling by ``1 + weight``: its gain is not its weight, so folding would be wrong."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("norm, message", [
    (lambda: nn.LayerNorm(64), "has a bias"),
    (lambda: nn.LayerNorm(64, bias=False), "does not compute x / rms"),
    (lambda: _GemmaStyleNorm(64), "does not compute x / rms"),
], ids=["layernorm", "layernorm-no-bias", "one-plus-weight"])
def test_norms_other_than_rmsnorm_are_refused_naming_the_module(norm, message, snapshot):
    model = _llama()
    model.model.layers[1].post_attention_layernorm = norm()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message) as err:
        llmopt.compress_(model, llmopt.Rotate())
    assert "model.layers.1.post_attention_layernorm" in str(err.value)
    before.check()


def test_unknown_modules_quantized_layers_and_exclusions_are_refused(snapshot):
    model = _llama()
    model.model.layers[0].mlp.extra = nn.Linear(64, 64)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.extra"):
        llmopt.compress_(model, llmopt.Rotate())

    model = _llama()
    llmopt.compress_(model, llmopt.RTN("int4", 32))
    before = snapshot(model)
    with pytest.raises(ValueError, match="must come before quantization"):
        llmopt.compress_(model, llmopt.Rotate())
    before.check()

    model = _llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"leave out \['lm_head'\].*Stage"):
        llmopt.compress_(model, [llmopt.Rotate(), llmopt.RTN("int4", 32)], exclude=["lm_head"])
    before.check()


@dataclasses.dataclass(frozen=True)
class _Failing(llmopt.MethodConfig):
    """A layer method that fails on one layer, after Rotate has been applied."""

    name = "failing_after_rotate_demo"


def _fail_on_down(linear, config, *, name=""):
    if name.endswith("layers.1.mlp.down_proj"):
        raise RuntimeError("planted failure")
    return copy.deepcopy(linear)


def test_a_failing_later_stage_undoes_the_rotation(snapshot):
    llmopt.register_method(_Failing)(_fail_on_down)
    try:
        model = _llama(tie=True)
        before = snapshot(model)
        with pytest.raises(llmopt.CompressionError, match="planted failure"):
            llmopt.compress_(model, [llmopt.Rotate(), _Failing()])
    finally:
        unregister_method(_Failing.name)
    before.check()
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings is True


# ------------------------------------------------------------------------------------------ recipes and config
def test_composes_with_gptq_in_a_recipe():
    model = _llama(tie=False)
    ids = _ids()
    reference = _logits(model, ids)
    recipe = llmopt.Recipe([llmopt.Rotate(), llmopt.GPTQ("int4", 32)])
    report = llmopt.compress_(model, recipe, calibration=[_ids(seed=s) for s in range(3)])
    assert [m["method"] for m in report.methods] == ["rotate", "gptq"]
    assert is_compressed(model.model.layers[0].self_attn.o_proj)
    assert report.layer_configs["model.layers.0.mlp.down_proj"][0]["method"] == "rotate"
    assert _rel(_logits(model, ids), reference) < 0.2
    assert model._llmopt_recipe["stages"][0]["method"] == "rotate"


def test_config_validation_dict_and_label():
    cfg = llmopt.Rotate(seed=3, kind="orthogonal", rotate_heads=False)
    assert cfg.to_dict() == {"method": "rotate", "seed": 3, "kind": "orthogonal", "rotate_heads": False}
    assert llmopt.MethodConfig.from_dict(cfg.to_dict()) == cfg
    assert llmopt.Recipe.from_dict(llmopt.Recipe([cfg]).to_dict()) == llmopt.Recipe([cfg])
    assert cfg.label() == "rotate orthogonal (seed 3, no head rotation)"
    assert (cfg.SCOPE, cfg.lossless, cfg.reduces_stored_bytes, cfg.needs_calibration) == ("model", True, False, False)
    for bad in (dict(seed=-1), dict(seed=True), dict(kind="givens"), dict(rotate_heads="yes")):
        with pytest.raises(ValueError):
            llmopt.Rotate(**bad)


@pytest.mark.parametrize("arch", ["Mistral", "Qwen2", "Qwen3"])
def test_architectures_with_the_llama_layout(arch):
    """Mistral (sliding window), Qwen2 (q/k/v biases), Qwen3 (per-head q/k norms): the same layout."""
    config_cls = getattr(transformers, f"{arch}Config", None)
    model_cls = getattr(transformers, f"{arch}ForCausalLM", None)
    if config_cls is None or model_cls is None:
        pytest.skip(f"transformers has no {arch}")
    config = config_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand_like(p))
    ids = _ids()
    reference = _logits(model, ids)
    llmopt.compress_(model, llmopt.Rotate())
    assert _rel(_logits(model, ids), reference) < 1e-5  # float32 rounding (their norms compute in float32)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 1024])
def test_fast_hadamard_equals_the_dense_product(n):
    from llmopt.methods.quant.rotate import _fwht, _left_t, _RandomHadamard, _right

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, n, dtype=torch.float64, generator=gen)
    dense_h = hadamard_matrix(n) * n ** 0.5
    assert torch.allclose(_fwht(x), x @ dense_h, atol=1e-12 * n, rtol=0)
    q = _RandomHadamard(torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1)
    assert torch.allclose(_right(x, q), x @ q.dense(), atol=1e-12, rtol=0)
    y = torch.randn(n, 3, dtype=torch.float64, generator=gen)
    assert torch.allclose(_left_t(q, y), q.dense().T @ y, atol=1e-12, rtol=0)
