"""Quantized embeddings through save/load (tied and untied: the tie comes back as one module) and
compressed-tensors export (the table dequantized, the tie left to the loader)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

import llmopt
from llmopt.core.files import LoadError
from llmopt.nn import QuantEmbedding
from llmopt.testing import ToyTransformer

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[1, 5, 77, 200, 13, 255, 0, 42]])




def _file_keys(directory):
    keys = []
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), framework="pt") as f:
                keys.extend(f.keys())
    return keys


@pytest.mark.parametrize("tie", [True, False])
def test_save_load_into_meta_skeleton_bit_exact(tmp_path, bit_equal, tie):
    model = ToyTransformer(tie=tie)
    llmopt.compress_(model, llmopt.RTN("int4", 32), embeddings=llmopt.WeightQuant("int4", 32))
    assert (model.lm_head is model.embed.linear) is tie
    llmopt.save(model, tmp_path)
    manifest = json.loads((tmp_path / "llmopt.json").read_text())
    assert manifest["modules"]["embed"]["type"] == "QuantEmbedding"
    keys = _file_keys(tmp_path)
    if tie:
        assert manifest["shared_modules"] == {"lm_head": "embed.linear"}
        assert not any(k.startswith("lm_head.") for k in keys)  # one packed copy on disk
    else:
        assert "shared_modules" not in manifest and "lm_head.qdata" in keys
    assert "embed.linear.qdata" in keys and "embed.weight" not in keys

    with torch.device("meta"):
        skeleton = ToyTransformer(tie=tie)
    llmopt.load(skeleton, tmp_path)
    assert isinstance(skeleton.embed, QuantEmbedding) and repr(skeleton.embed) == repr(model.embed)
    assert (skeleton.lm_head is skeleton.embed.linear) is tie
    expected, got = model.state_dict(), skeleton.state_dict()
    assert expected.keys() == got.keys()
    assert all(bit_equal(expected[k], got[k]) for k in expected)
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(x), skeleton(x))
    assert llmopt.memory_report(skeleton).stored_bytes == llmopt.memory_report(model).stored_bytes


def test_load_failure_leaves_the_skeleton_untouched(tmp_path):
    model = ToyTransformer()
    llmopt.compress_(model, llmopt.RTN("int4", 32), embeddings="int4")
    llmopt.save(model, tmp_path)
    manifest = json.loads((tmp_path / "llmopt.json").read_text())
    manifest["shared_modules"] = {"lm_head": "nowhere"}
    (tmp_path / "llmopt.json").write_text(json.dumps(manifest))
    skeleton = ToyTransformer()
    with pytest.raises(LoadError, match="shared module 'lm_head' names 'nowhere'"):
        llmopt.load(skeleton, tmp_path)
    assert type(skeleton.embed) is torch.nn.Embedding and skeleton.lm_head.weight is skeleton.embed.weight


@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_load_pretrained_keeps_one_table(tmp_path, tie, tiny_llama):
    model = tiny_llama(tie=tie)
    llmopt.compress_(model, llmopt.RTN("int4", 32), embeddings=llmopt.WeightQuant("int4", 32))
    with torch.no_grad():
        logits = model(IDS).logits
    llmopt.save_pretrained(model, tmp_path)
    loaded, _ = llmopt.load_pretrained(tmp_path)
    embed = loaded.model.embed_tokens
    assert isinstance(embed, QuantEmbedding)
    assert (loaded.lm_head is embed.linear) is tie
    assert embed.kernel.name == model.model.embed_tokens.kernel.name
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, logits)
    if tie:
        names = [layer.name for layer in llmopt.memory_report(loaded).layers]
        assert "lm_head" not in names


@pytest.mark.parametrize("tie", [True, False])
def test_compressed_tensors_export_dequantizes_the_embedding(tmp_path, tie, tiny_llama):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(tie=tie)
    scheme = llmopt.WeightQuant("int4", 32, symmetric=True, scale_dtype="float32", kernel="reference")
    llmopt.compress_(model, llmopt.RTN(**scheme.to_dict()), embeddings=scheme)
    report = llmopt.export_compressed_tensors(model, tmp_path)
    assert "model.embed_tokens" not in report["quantized"] and "model.embed_tokens" in report["dequantized"]
    assert ("lm_head" in report["quantized"]) is not tie
    keys = _file_keys(tmp_path)
    assert "model.embed_tokens.weight" in keys and not any(".linear." in k for k in keys)
    assert not any(k.startswith("lm_head") for k in keys) if tie else "lm_head.weight_packed" in keys
    with safe_open(os.path.join(tmp_path, "model.safetensors"), framework="pt") as f:
        assert torch.equal(f.get_tensor("model.embed_tokens.weight"), model.model.embed_tokens.dequantize_weight())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, model(IDS).logits, atol=1e-5, rtol=1e-5)
