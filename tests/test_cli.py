"""The ``llmopt`` command line end to end on a tiny random Llama with an offline word-level tokenizer:
``compress`` / ``report`` / ``bench`` as subprocesses, error cases (exit status 2, one line)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import llmopt  # noqa: E402
from llmopt.cli import calibration_batches, main  # noqa: E402
from llmopt.models import load_causal_lm, speed_model  # noqa: E402
from llmopt.pipeline.recipe import Recipe  # noqa: E402
from llmopt.testing import word_tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the quick brown fox jumps over a lazy dog while small models learn to compress weights into fewer "
         "bits and keep their quality").split()
RECIPE = """\
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
      "model.layers.1.self_attn.o_proj": skip
  - method: lora
    rank: 4
    alpha: 8
    include: ["*q_proj", "*v_proj"]
"""
CALIB = dict(samples=4, seqlen=48)


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "llmopt", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny HF model directory (random LlamaForCausalLM + tokenizer), calibration text and a recipe."""
    root = tmp_path_factory.mktemp("cli")
    model = speed_model("tiny")
    model.save_pretrained(root / "base")
    word_tokenizer(WORDS).save_pretrained(root / "base")
    rng = random.Random(0)
    (root / "calib.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(16)) for _ in range(40)))
    (root / "eval.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(16)) for _ in range(10)))
    (root / "recipe.yaml").write_text(RECIPE)
    return root


@pytest.fixture(scope="module")
def compressed(workspace):
    out = workspace / "out"
    proc = _run("compress", "--model", str(workspace / "base"), "--recipe", str(workspace / "recipe.yaml"),
                "--calib", str(workspace / "calib.txt"), "--out", str(out),
                "--calib-samples", str(CALIB["samples"]), "--calib-seqlen", str(CALIB["seqlen"]))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_compress_writes_a_self_contained_directory(workspace, compressed):
    out, proc = compressed
    assert "compressed 14 layer(s)" in proc.stdout and f"saved to {out}" in proc.stdout
    assert "skipped model.layers.1.self_attn.o_proj: stage 1 (rtn): skipped by override" in proc.stdout
    for name in ("config.json", "llmopt.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "llmopt.json").read_text())
    assert Recipe.from_dict(manifest["metadata"]["recipe"]) == Recipe.load(workspace / "recipe.yaml")

    # Same result as the library call on the same calibration windows.
    model, tokenizer, _ = load_causal_lm(str(workspace / "base"))
    ids = torch.as_tensor(tokenizer((workspace / "calib.txt").read_text())["input_ids"])
    llmopt.compress_(model, Recipe.load(workspace / "recipe.yaml"),
                     calibration=calibration_batches(ids, CALIB["samples"], CALIB["seqlen"]))
    from llmopt.io.hf import load_pretrained

    loaded, loaded_tokenizer = load_pretrained(out)
    assert loaded_tokenizer is not None
    prompt = torch.randint(0, 40, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(prompt).logits, model(prompt).logits)
    down = loaded.model.layers[0].mlp.down_proj
    assert down.quantized and down.format.name == "int8"
    assert type(loaded.model.layers[0].self_attn.q_proj).__name__ == "LoRALinear"


def test_report_subprocess_prints_layers_totals_and_recipe(compressed):
    out, _ = compressed
    proc = _run("report", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "bits/w" in text and "model.layers.0.mlp.down_proj" in text and "total stored" in text
    assert "recipe:" in text and "method: wanda" in text and "'*.down_proj': {format: int8}" in text


def test_report_json(compressed, capsys):
    out, _ = compressed
    assert main(["report", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["totals"]["stored_bytes"] == data["memory"]["stored_bytes"] > 0
    assert 0 < data["totals"]["linear_bits_per_weight"] < 32
    assert [stage["method"] for stage in data["recipe"]["stages"]] == ["wanda", "rtn", "lora"]
    layers = {layer["name"]: layer for layer in data["memory"]["layers"]}
    assert layers["model.layers.0.mlp.down_proj"]["kind"] == "SparseLinear"


def test_bench_subprocess_json(workspace, compressed):
    out, _ = compressed
    proc = _run("bench", str(out), "--text", str(workspace / "eval.txt"), "--new-tokens", "4", "--repeats", "1",
                "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(proc.stdout)
    assert data["compressed"] is True
    assert 1 < data["perplexity"]["ppl"] < 1e4 and data["perplexity"]["tokens_scored"] > 100
    assert data["decode"]["tokens_per_s"] > 0 and data["decode"]["new_tokens"] == 4
    assert data["memory"]["stored_bytes"] > 0


def test_bench_table_on_an_uncompressed_model(workspace, capsys):
    assert main(["bench", str(workspace / "base"), "--new-tokens", "3", "--repeats", "1", "--prompt-tokens", "4",
                 "--text", str(workspace / "eval.txt"), "--window", "64"]) == 0
    text = capsys.readouterr().out
    assert "perplexity" in text and "window 64" in text and "tok/s" in text and "32.000 bits/weight" in text


# ------------------------------------------------------------------------------ errors: exit 2, one line
def _errors(workspace, tmp_path):
    w, t = workspace, tmp_path
    (t / "typo.yaml").write_text("stages:\n  - method: rtn\n    fromat: int4\n")
    (t / "method.yaml").write_text("stages:\n  - method: rtm\n")
    (t / "format.yaml").write_text("stages:\n  - method: rtn\n    format: int9\n")
    (t / "broken.yaml").write_text("stages: [\n")
    (t / "empty.txt").write_text("  \n\n")
    (t / "notllmopt").mkdir()
    base, recipe, calib, out = str(w / "base"), str(w / "recipe.yaml"), str(w / "calib.txt"), str(t / "o")

    def compress(model=base, recipe=recipe, calib=calib):
        return ["compress", "--model", model, "--recipe", recipe, "--calib", calib, "--out", out]

    return [
        (compress(model=str(t / "nope")), r"model '.*nope' not found"),
        (compress(model=str(t / "nope.gguf")), r"model file '.*nope.gguf' not found"),
        (compress(recipe=str(t / "nope.yaml")), r"recipe file '.*nope.yaml' not found"),
        (compress(calib=str(t / "nope.txt")), r"calibration file '.*nope.txt' not found"),
        (compress(recipe=str(t / "typo.yaml")), r"stage 0 \(rtn\): unknown key\(s\) \['fromat'\]"),
        (compress(recipe=str(t / "method.yaml")), r"unknown method 'rtm'; registered: .*rtn"),
        (compress(recipe=str(t / "format.yaml")), r"unknown weight format 'int9'"),
        (compress(recipe=str(t / "broken.yaml")), r"is not valid YAML"),
        (compress(calib=str(t / "empty.txt")), r"calibration file '.*empty.txt' is empty"),
        (["compress", "--model", base, "--recipe", recipe, "--out", out], r"stage 0 \(wanda\) needs calibration"),
        (["report", str(t / "nope")], r"directory '.*nope' not found"),
        (["report", str(t / "notllmopt")], r"has no llmopt.json"),
        (["bench", str(t / "nope")], r"model '.*nope' not found"),
        (["bench", base, "--text", str(t / "nope.txt")], r"text file '.*nope.txt' not found"),
    ]


def test_error_cases_exit_2_with_one_line(workspace, tmp_path, capsys):
    import re

    for argv, message in _errors(workspace, tmp_path):
        code = main(argv)
        err = capsys.readouterr().err.strip()
        assert code == 2, (argv, err)
        assert re.search(message, err), (message, err)
        assert len(err.splitlines()) == 1 and err.startswith(f"llmopt {argv[0]}: error: "), err
        assert not (tmp_path / "o").exists()


def test_error_in_a_subprocess_has_no_traceback(workspace, tmp_path):
    (tmp_path / "typo.yaml").write_text("stages:\n  - method: rtn\n    fromat: int4\n")
    proc = _run("compress", "--model", str(workspace / "base"), "--recipe", str(tmp_path / "typo.yaml"),
                "--calib", str(workspace / "calib.txt"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("llmopt compress: error: recipe file")


def test_usage_errors_and_demo(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compress", "--model", "x"])  # argparse: missing --recipe/--out
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["bench", "x", "--dtype", "int3"])
    assert exc.value.code == 2 and "unknown dtype 'int3'" in capsys.readouterr().err
    assert main(["demo", "--dim", "64", "--layers", "1"]) == 0
    assert "save -> load round trip bit-exact: True" in capsys.readouterr().out


def test_calibration_batches_cover_the_text():
    ids = torch.arange(100)
    batches = calibration_batches(ids, 4, 30)
    assert [b.shape for b in batches] == [(1, 30)] * 4
    assert batches[0][0, 0] == 0 and batches[-1][0, -1] == 99
    assert [b.shape for b in calibration_batches(ids[:10], 3, 30)] == [(1, 10)] * 3  # short text: shorter windows
    assert len(calibration_batches(ids, 1, 30)) == 1


def _saved_tiny(directory, **rtn):
    model = speed_model("tiny", seed=0)
    llmopt.compress_(model, llmopt.RTN("int4", 32, **rtn), exclude=["lm_head"])
    llmopt.save_pretrained(model, directory)
    return model


def test_export_gguf_and_compressed_tensors(tmp_path, capsys):
    gguf = pytest.importorskip("gguf")
    model = _saved_tiny(tmp_path / "sym", symmetric=True, scale_dtype="float16")
    assert main(["export", str(tmp_path / "sym"), "--to", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_down.weight"] == "Q4_0"
    capsys.readouterr()
    assert main(["export", str(tmp_path / "sym"), "--to", "compressed-tensors", "--out", str(tmp_path / "ct"),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out.split("\nwrote")[0])
    assert report["ignore"] == ["lm_head"] and not report["requantized"]
    loaded, _ = llmopt.load_quantized(tmp_path / "ct")
    layer = model.model.layers[0].mlp.down_proj
    assert torch.equal(loaded.model.layers[0].mlp.down_proj.codes(), layer.codes())


def test_export_that_cannot_map_is_one_line_exit_2(tmp_path, capsys):
    _saved_tiny(tmp_path / "asym")  # float zero points: neither Q4_1 (bf16 min) nor compressed-tensors maps them
    for target, out in (("gguf", "a.gguf"), ("compressed-tensors", "ct")):
        capsys.readouterr()
        assert main(["export", str(tmp_path / "asym"), "--to", target, "--out", str(tmp_path / out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("llmopt export: error:") and "requantize" in err[0], err
        assert not (tmp_path / out).exists()
    assert main(["export", str(tmp_path / "asym"), "--to", "compressed-tensors", "--out", str(tmp_path / "ct"),
                 "--requantize"]) == 0


def test_compress_with_a_preset_name(workspace, tmp_path):
    """``--recipe`` takes a preset name where no such file exists (w4-fast: no calibration needed)."""
    out = tmp_path / "preset"
    proc = _run("compress", "--model", str(workspace / "base"), "--recipe", "w4-fast", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "llmopt.json").read_text())
    assert Recipe.from_dict(manifest["metadata"]["recipe"]) == Recipe.preset("w4-fast")
    bad = _run("compress", "--model", str(workspace / "base"), "--recipe", "w9-nope", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "w4-fast" in bad.stderr
