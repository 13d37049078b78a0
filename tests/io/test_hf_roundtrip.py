"""Hugging Face round trip: compress a transformers Llama, save it with ``llmopt.save_pretrained``, rebuild
it in a fresh process from the directory alone with ``llmopt.load_pretrained``, and generate the same
tokens. One subprocess loads every method family's directory (a separate interpreter per family would
cost ~8 s each on 2 cores); each family is then checked by its own test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import llmopt

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from llmopt.models import speed_model  # noqa: E402
from llmopt.testing import word_tokenizer  # noqa: E402

NEW_TOKENS = 8
PROMPT = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 300]])


def _calibration():
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 512, (2, 32), generator=g) for _ in range(2)]


def _model(dtype=torch.float32):
    return speed_model("tiny", dtype=dtype, seed=0)


def _structured(model):
    llmopt.compress_(model, [llmopt.PruneChannels(0.25), llmopt.PruneHeads(0.5)])


def _qlora(model):
    llmopt.compress_(model, llmopt.RTN("int4", 32), exclude=["lm_head"])
    llmopt.compress_(model, llmopt.LoRA(rank=4, alpha=8), include=["*q_proj", "*v_proj"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking adapters: B = 0 would hide a lost adapter
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _recipe(model):
    """prune -> quantize (8-bit down_proj, lm_head skipped) -> LoRA in one call, from a YAML-shaped dict."""
    recipe = llmopt.Recipe.from_dict({"stages": [
        {"method": "wanda", "sparsity": 0.5, "exclude": ["lm_head"]},
        {"method": "rtn", "format": "int4", "group_size": 32, "exclude": ["lm_head"],
         "overrides": {"*.down_proj": {"format": "int8", "group_size": None}}},
        {"method": "lora", "rank": 4, "alpha": 8, "include": ["*q_proj", "*v_proj"]},
    ]})
    llmopt.compress_(model, recipe, calibration=_calibration())
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)


# family -> (dtype, function compressing the model in place)
FAMILIES = {
    "rtn_int4": (torch.float32, lambda m: llmopt.compress_(m, llmopt.RTN("int4", 32), exclude=["lm_head"])),
    # bf16: the fast int4pack / int8pack CPU kernels with their own runtime layouts
    "rtn_bf16_kernels": (torch.bfloat16, lambda m: llmopt.compress_(
        m, [llmopt.RTN("int8", None)], include=["*.self_attn.*"]) and llmopt.compress_(
        m, llmopt.RTN("int4", 32), include=["*.mlp.*"])),
    "nf4_hqq": (torch.float32, lambda m: llmopt.compress_(m, llmopt.HQQ("int3", 32), exclude=["lm_head"])
                and llmopt.compress_(m, llmopt.RTN("nf4", 64), include=["lm_head"])),
    "gptq": (torch.float32, lambda m: llmopt.compress_(m, llmopt.GPTQ("int4", 32), exclude=["lm_head"],
                                                       calibration=_calibration())),
    "awq": (torch.float32, lambda m: llmopt.compress_(m, llmopt.AWQ("int4", 32), exclude=["lm_head"],
                                                      calibration=_calibration())),
    "smoothquant_w8a8": (torch.float32, lambda m: llmopt.compress_(m, llmopt.SmoothQuant(), exclude=["lm_head"],
                                                                   calibration=_calibration())),
    "svd": (torch.float32, lambda m: llmopt.compress_(m, llmopt.SVD(rank=16), exclude=["lm_head"])),
    "compensated": (torch.float32, lambda m: llmopt.compress_(m, llmopt.QuantLowRank("int3", 32, rank=8),
                                                              exclude=["lm_head"])),
    "wanda_2of4_int4": (torch.float32, lambda m: llmopt.compress_(
        m, [llmopt.Wanda(pattern="2:4"), llmopt.RTN("int4", 32)], exclude=["lm_head"], calibration=_calibration())),
    "sparsegpt_int4": (torch.float32, lambda m: llmopt.compress_(
        m, llmopt.SparseGPT(sparsity=0.5, format="int4", group_size=32), exclude=["lm_head"],
        calibration=_calibration())),
    "structured": (torch.float32, _structured),
    "qlora": (torch.float32, _qlora),
    "recipe": (torch.float32, _recipe),
    "qat": (torch.float32, lambda m: llmopt.compress_(m, llmopt.QAT("int4", group_size=32), exclude=["lm_head"])),
}

LOADER = textwrap.dedent("""
    import json, sys, torch, llmopt
    from safetensors.torch import save_file
    root, names, prompt, new = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
    out = {}
    for name in names:
        try:
            model, tok = llmopt.load_pretrained(f"{root}/{name}")
            ids = torch.tensor(prompt)
            with torch.no_grad():
                logits = model(ids).logits.float()
                gen = model.generate(ids, max_new_tokens=new, do_sample=False)
            save_file({"logits": logits.contiguous()}, f"{root}/{name}/reloaded_logits.safetensors")
            out[name] = {"tokens": gen.tolist(), "types": sorted({type(m).__name__ for m in model.modules()}),
                         "tokenizer": tok("w1 w7 w99 zzz").input_ids if tok is not None else None}
        except Exception as exc:
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
    print("RESULT" + json.dumps(out))
""")


def _tiny_tokenizer():
    """A word-level tokenizer built offline (no hub): enough to check it is saved and reloaded."""
    pytest.importorskip("tokenizers")
    return word_tokenizer(f"w{i}" for i in range(100))


def _compress_all(root, expected) -> None:
    for name, (dtype, compress) in FAMILIES.items():
        model = _model(dtype)
        compress(model)
        model.eval()
        with torch.no_grad():
            logits = model(PROMPT).logits.float()
            tokens = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
        llmopt.save_pretrained(model, root / name, tokenizer=_tiny_tokenizer() if name == "rtn_int4" else None,
                               max_shard_bytes=2**16 if name == "gptq" else 512 * 2**20)
        expected[name] = {"logits": logits, "tokens": tokens.tolist(),
                          "types": sorted({type(m).__name__ for m in model.modules()})}


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """Compress every family in this process, then reload all of them in one fresh interpreter."""
    root = tmp_path_factory.mktemp("hf_round_trip")
    expected = {}
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocess: the same reduction order, so bit-equal logits
    try:
        _compress_all(root, expected)
    finally:
        torch.set_num_threads(threads)
    proc = subprocess.run([sys.executable, "-c", LOADER, str(root), json.dumps(list(FAMILIES)),
                           json.dumps(PROMPT.tolist()), str(NEW_TOKENS)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    return root, expected, json.loads(line[len("RESULT"):])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reloaded_model_generates_the_same_tokens(round_trip, family):
    from safetensors.torch import load_file

    root, expected, reloaded = round_trip
    got = reloaded[family]
    assert "error" not in got, got.get("error")
    assert got["tokens"] == expected[family]["tokens"]
    assert got["types"] == expected[family]["types"]  # same wrappers rebuilt (QuantLinear, SparseLinear, ...)
    logits = load_file(str(root / family / "reloaded_logits.safetensors"))["logits"]
    # Same kernels on the same tensors: the reloaded model computes exactly the same logits.
    torch.testing.assert_close(logits, expected[family]["logits"], rtol=0, atol=0)


def test_structured_model_reloads_at_its_new_shapes(round_trip):
    root, _, _ = round_trip
    config = json.loads((root / "structured" / "config.json").read_text())
    base = speed_model("tiny").config
    assert config["intermediate_size"] < base.intermediate_size
    assert config["num_key_value_heads"] < base.num_key_value_heads


def test_sharded_save_writes_several_files_and_reloads(round_trip):
    root, _, _ = round_trip
    manifest = json.loads((root / "gptq" / "llmopt.json").read_text())
    assert isinstance(manifest["tensors"], list) and len(manifest["tensors"]) > 1
    assert manifest["format_version"] == 2
    for fname in manifest["tensors"]:
        assert (root / "gptq" / fname).is_file()


def test_recipe_is_kept_in_the_saved_directory(round_trip):
    root, expected, _ = round_trip
    manifest = json.loads((root / "recipe" / "llmopt.json").read_text())
    methods = [stage["method"] for stage in manifest["metadata"]["recipe"]["stages"]]
    assert methods == ["wanda", "rtn", "lora"]
    assert {"LoRALinear", "SparseLinear"} <= set(expected["recipe"]["types"])


def test_tokenizer_is_saved_and_reloaded(round_trip):
    _, _, reloaded = round_trip
    assert reloaded["rtn_int4"]["tokenizer"] == _tiny_tokenizer()("w1 w7 w99 zzz").input_ids
    assert reloaded["gptq"]["tokenizer"] is None


def test_load_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        llmopt.load_pretrained(tmp_path / "nope")
    llmopt.save(torch.nn.Linear(4, 4), tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        llmopt.load_pretrained(tmp_path / "plain")
    with pytest.raises(TypeError, match="transformers model"):
        llmopt.save_pretrained(torch.nn.Linear(4, 4), tmp_path / "x")


def test_meta_skeleton_with_unsaved_buffers_fails_clearly(tmp_path):
    model = _model()
    llmopt.compress_(model, llmopt.RTN("int4", 32), exclude=["lm_head"])
    llmopt.save(model, tmp_path)
    with torch.device("meta"):  # rotary inv_freq (non-persistent) would stay on meta
        skeleton = transformers.LlamaForCausalLM(model.config)
    with pytest.raises(RuntimeError, match="still on the meta device"):
        llmopt.load(skeleton, tmp_path)
    from accelerate import init_empty_weights

    with init_empty_weights():  # parameters on meta, buffers real: the documented way
        skeleton = transformers.LlamaForCausalLM(model.config)
    llmopt.load(skeleton, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(skeleton(PROMPT).logits, model(PROMPT).logits, rtol=0, atol=0)


def test_save_and_load_stream_in_shards(tmp_path):
    """Saving and loading need about one shard of extra memory, not a second copy of the model."""
    from llmopt.evaluate import PeakMemory

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(48)])  # 192 MiB
    model_mib = 48 * 4
    with PeakMemory() as save_peak:
        llmopt.save(model, tmp_path, max_shard_bytes=16 * 2**20)
    if not save_peak.reset:
        pytest.skip("this kernel does not let a process reset its peak RSS")
    extra_save = (save_peak.peak_rss_kib - save_peak.start_rss_kib) / 1024
    assert extra_save < model_mib / 3, f"save used {extra_save:.0f} MiB extra for a {model_mib} MiB model"
    with torch.device("meta"):
        skeleton = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(48)])
    with PeakMemory() as load_peak:
        llmopt.load(skeleton, tmp_path)
    extra_load = (load_peak.peak_rss_kib - load_peak.start_rss_kib) / 1024
    # The loaded model itself is model_mib; on top of it at most about a shard.
    assert extra_load < model_mib + 64, f"load used {extra_load:.0f} MiB for a {model_mib} MiB model"
    for a, b in zip(model, skeleton):
        assert torch.equal(a.weight, b.weight)
