"""The ``llmopt`` command line: ``compress`` a causal LM with a recipe, ``report`` a saved model's
memory and recipe, ``bench`` perplexity / decode speed / weight memory, and the toy ``demo``.

```
llmopt compress --model smollm2 --recipe recipe.yaml --calib calib.txt --out out/
llmopt report out/ [--json]
llmopt bench out/ --text eval.txt [--new-tokens 32] [--json]
llmopt export out/ --to gguf --out model.gguf [--requantize]
llmopt export out/ --to compressed-tensors --out ct/ [--requantize]
llmopt demo
```

Input errors (a missing file, a bad recipe, empty calibration text, a file that is not a model, a corrupt
manifest, ...) print one line ``llmopt <command>: error: ...`` and exit with status 2; a compression
failure exits with 1. Any other exception is a bug and keeps its traceback.
Nothing is downloaded: models come from local directories, GGUF files or the SmolLM2 wheel.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

from .core.errors import CompressionError
from .core.measure import memory_report
from .demo import main as demo_main
from .evaluate import decode_throughput, perplexity, weight_bytes
from .io.compressed_tensors import export_compressed_tensors
from .io.gguf import export_gguf
from .io.hf import load_pretrained, save_pretrained
from .io.save import MANIFEST_NAME, read_manifest
from .models import load_causal_lm
from .pipeline.api import compress_
from .pipeline.recipe import Recipe, RecipeError, _yaml_dump

__all__ = ["main", "CliError", "calibration_batches"]

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


class CliError(Exception):
    """An input problem reported as one line with exit status 2 (no traceback)."""


# ---------------------------------------------------------------------------------------------- helpers
def _dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}") from None


def _read_text(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise CliError(f"{what} file {path!r} not found")
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if not text.strip():
        raise CliError(f"{what} file {path!r} is empty")
    return text


def _check_model_source(source: str) -> None:
    """A clear one-line error for a model source that cannot load, before the (slow) load is tried."""
    if source == "smollm2":
        return
    if source.endswith(".gguf"):
        if not os.path.isfile(source):
            raise CliError(f"model file {source!r} not found")
        with open(source, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise CliError(f"model file {source!r} is not a GGUF file (it does not start with the GGUF magic "
                           "bytes)")
        return
    if not os.path.isdir(source):
        raise CliError(f"model {source!r} not found: give a local model directory, a .gguf file or 'smollm2'")
    if not os.path.isfile(os.path.join(source, "config.json")):
        saved = os.path.isfile(os.path.join(source, MANIFEST_NAME))
        raise CliError(f"{source!r} has no config.json: " + (
            "written by llmopt.save, not save_pretrained (load it with llmopt.load(skeleton, dir))" if saved else
            "neither an llmopt save (llmopt.json) nor a Hugging Face model directory"))


def _token_ids(tokenizer: Any, text: str) -> torch.Tensor:
    """The text as one 1-D stream of token ids."""
    ids = tokenizer(text)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def calibration_batches(ids: torch.Tensor, samples: int, seqlen: int) -> List[torch.Tensor]:
    """``samples`` windows ``[1, seqlen]`` spread evenly over the token stream ``ids`` (overlapping
    when the text is short; ``seqlen`` is cut to the stream's length if the text is shorter)."""
    if samples < 1 or seqlen < 2:
        raise CliError(f"need --calib-samples >= 1 and --calib-seqlen >= 2, got {samples} and {seqlen}")
    n = int(ids.numel())
    if n < 2:
        raise CliError(f"the calibration text has {n} token(s); it needs at least 2")
    seqlen = min(seqlen, n)
    last = n - seqlen
    starts = [round(i * last / (samples - 1)) if samples > 1 else 0 for i in range(samples)]
    return [ids[s:s + seqlen].unsqueeze(0) for s in starts]


def _load_any(source: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer, saved_manifest_or_None)``: an llmopt directory (``save_pretrained``) or any
    source :func:`llmopt.models.load_causal_lm` takes.

    An llmopt directory is loaded with its compressed layers (``load_pretrained``): read as a plain
    Hugging Face directory, its quantized weights would be missing and silently re-initialised. A file
    that cannot be read as a model (``ValueError`` / ``OSError`` from the loader) is a one-line
    :class:`CliError` naming it.
    """
    _check_model_source(source)
    try:
        if os.path.isdir(source) and os.path.isfile(os.path.join(source, MANIFEST_NAME)):
            manifest = read_manifest(source)
            model, tokenizer = load_pretrained(source)
            return model, tokenizer, manifest
        model, tokenizer, _info = load_causal_lm(source, dtype=dtype)
    except (ValueError, OSError) as exc:
        raise CliError(f"could not load model {source!r}: {_one_line(exc)}") from exc
    return model, tokenizer, None


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _recipe_dict(stored: Any) -> Any:
    """A stored recipe in its canonical form (stage keys in order, overrides as a mapping); as stored
    when it does not parse (e.g. a method this installation lacks)."""
    if not stored:
        return None
    try:
        return Recipe.from_dict(stored).to_dict()
    except RecipeError:
        return stored


def _recipe_text(recipe: Any) -> str:
    return _yaml_dump(recipe).rstrip() if recipe else "(no recipe recorded)"


# ---------------------------------------------------------------------------------------------- compress
def cmd_compress(args: argparse.Namespace) -> int:
    """Load a model, apply a recipe with calibration text, save with ``llmopt.hf.save_pretrained``."""
    # Every input is checked before the (slow) model load.
    recipe = Recipe.resolve(args.recipe)
    needs = [f"stage {i} ({cfg.name})" for i, stage in enumerate(recipe.stages)
             for cfg in stage.configs() if cfg.needs_calibration]
    text = _read_text(args.calib, "calibration") if args.calib else None
    if needs and text is None:
        raise CliError(f"{needs[0]} needs calibration data: pass --calib TEXT_FILE")
    _check_model_source(args.model)
    if os.path.isfile(args.out):
        raise CliError(f"--out {args.out!r} is a file; give a directory")

    model, tokenizer, _manifest = _load_any(args.model, dtype=args.dtype)
    if tokenizer is None and text is not None:
        raise CliError(f"{args.model!r} has no tokenizer saved with it; cannot tokenize the calibration text")
    calibration = None
    if text is not None:
        samples = args.calib_samples
        if samples is None:
            # Methods that train on the calibration data (LearnedRound) overfit a few thousand tokens.
            trains = any(cfg.block_io is not None for stage in recipe.stages for cfg in stage.configs())
            samples = 64 if trains else 16
        calibration = calibration_batches(_token_ids(tokenizer, text), samples, args.calib_seqlen)
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters; recipe: "
          f"{recipe.label()}", file=sys.stderr)
    try:
        report = compress_(model, recipe, calibration=calibration if needs else None,
                           calibration_dtype=args.calibration_dtype)
    except (CompressionError, ValueError) as exc:
        kind = "compression failed (model unchanged)" if isinstance(exc, CompressionError) else "error"
        print(f"llmopt compress: {kind}: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, CompressionError) else 2
    # Ordered overrides: the manifest's JSON is written with sorted keys, and the first match wins.
    save_pretrained(model, args.out, tokenizer=tokenizer, metadata={"recipe": recipe.to_dict(ordered_overrides=True)})
    if args.json:
        _print_json({"out": args.out, "report": report.to_dict(), "recipe": recipe.to_dict()})
    else:
        print(report)
        for note in report.notes:
            print(f"note: {note}")
        for name, reason in report.skipped.items():
            print(f"skipped {name}: {reason}")
        print(f"saved to {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------- report
def cmd_report(args: argparse.Namespace) -> int:
    """Memory per layer (stored bytes, bits per weight), totals, and the recipe of a saved directory."""
    directory = args.directory
    if not os.path.isdir(directory):
        raise CliError(f"directory {directory!r} not found")
    if not os.path.isfile(os.path.join(directory, MANIFEST_NAME)):
        raise CliError(f"{directory!r} has no {MANIFEST_NAME}: not written by llmopt")
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise CliError(f"{directory!r} has no config.json: written by llmopt.save, not save_pretrained "
                       "(load it with llmopt.load(skeleton, dir))")
    try:
        manifest = read_manifest(directory)
        model, _tokenizer = load_pretrained(directory, with_tokenizer=False)
    except (ValueError, OSError) as exc:
        raise CliError(f"could not load {directory!r}: {_one_line(exc)}") from exc
    memory = memory_report(model)
    recipe = _recipe_dict(manifest.get("metadata", {}).get("recipe"))
    linear_weights = sum(layer.num_weights for layer in memory.layers)
    linear_bits = sum(layer.num_weights * layer.bits_per_weight for layer in memory.layers)
    totals = {
        "stored_bytes": memory.stored_bytes,
        "runtime_bytes": memory.runtime_bytes,
        "linear_stored_bytes": sum(layer.stored_bytes for layer in memory.layers),
        "linear_bits_per_weight": linear_bits / linear_weights if linear_weights else float("nan"),
        "compressed_layers": sum(1 for layer in memory.layers if layer.kind != "Linear"),
        "linear_layers": len(memory.layers),
    }
    if args.json:
        _print_json({"directory": directory, "memory": memory.to_dict(), "totals": totals, "recipe": recipe,
                     "llmopt_version": manifest.get("llmopt_version")})
        return 0
    print(memory)
    print(f"\ntotal stored {_mib(totals['stored_bytes'])}, in memory {_mib(totals['runtime_bytes'])}; "
          f"{totals['compressed_layers']} of {totals['linear_layers']} linear layers compressed, "
          f"{totals['linear_bits_per_weight']:.3f} bits/weight over the linear layers")
    print("\nrecipe:")
    print(_recipe_text(recipe))
    return 0


# ---------------------------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    """Perplexity on a text file, batch-1 decode tokens/s, weight memory."""
    text = _read_text(args.text, "text") if args.text else None
    if args.new_tokens < 2:
        raise CliError(f"--new-tokens must be >= 2, got {args.new_tokens}")
    model, tokenizer, manifest = _load_any(args.model, args.dtype)
    result: Dict[str, Any] = {"model": args.model, "compressed": manifest is not None}
    if text is not None:
        if tokenizer is None:
            raise CliError(f"{args.model!r} has no tokenizer saved with it; cannot measure perplexity on text")
        ids = _token_ids(tokenizer, text)
        if ids.numel() < 2:
            raise CliError(f"text file {args.text!r} has fewer than 2 tokens")
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or args.window
        window = max(2, min(args.window, int(limit), int(ids.numel())))
        ppl = perplexity(model, ids, window=window, max_tokens=args.max_tokens, progress=not args.json)
        result["perplexity"] = {k: ppl[k] for k in ("ppl", "nll", "tokens_scored", "window", "seconds")}
    decode = decode_throughput(model, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                               repeats=args.repeats, warmup=1)
    result["decode"] = {k: decode[k] for k in ("tokens_per_s", "ms_per_step", "batch_size", "prompt_tokens",
                                               "new_tokens", "repeats")}
    memory = weight_bytes(model)
    result["memory"] = {k: memory[k] for k in ("stored_bytes", "runtime_bytes", "linear_bits_per_weight")}
    if args.json:
        _print_json(result)
        return 0
    rows = [("model", args.model + (" (llmopt)" if manifest is not None else ""))]
    if "perplexity" in result:
        p = result["perplexity"]
        rows.append(("perplexity", f"{p['ppl']:.3f} ({p['tokens_scored']} tokens, window {p['window']})"))
    d = result["decode"]
    rows.append(("decode (batch 1)", f"{d['tokens_per_s']:.1f} tok/s ({d['ms_per_step']:.2f} ms/token, "
                                     f"{d['new_tokens']} new tokens)"))
    m = result["memory"]
    bits = m["linear_bits_per_weight"]
    rows.append(("weights", f"{_mib(m['stored_bytes'])} stored, {_mib(m['runtime_bytes'])} in memory, "
                            f"{bits:.3f} bits/weight (linear layers)" if not math.isnan(bits) else
                 f"{_mib(m['stored_bytes'])} stored"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


# ---------------------------------------------------------------------------------------------- export
EXPORT_TARGETS = ("gguf", "compressed-tensors")


def cmd_export(args: argparse.Namespace) -> int:
    """Write a saved (or plain) model as GGUF (llama.cpp) or compressed-tensors (vLLM, transformers)."""
    model, tokenizer, _manifest = _load_any(args.model)
    if args.to == "gguf":
        report = export_gguf(model, args.out, tokenizer=tokenizer, requantize=args.requantize,
                             float_type=args.float_type)
    else:
        report = export_compressed_tensors(model, args.out, tokenizer=tokenizer, requantize=args.requantize)
    if args.json:
        _print_json(report.to_dict() if hasattr(report, "to_dict") else report)
    else:
        print(report)
        print(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmopt", description="LLM compression: compress, report, bench, export.")
    sub = parser.add_subparsers(dest="command", metavar="{compress,report,bench,export,demo}")

    p = sub.add_parser("compress", help="apply a recipe to a model and save it",
                       description="Apply a recipe (YAML/JSON) to a causal LM, calibrating on a text file, "
                                   "and save it with llmopt.hf.save_pretrained.")
    p.add_argument("--model", required=True, help="local HF model directory, a .gguf file, or 'smollm2'")
    p.add_argument("--recipe", required=True,
                   help="recipe file (.yaml, .yml or .json) or a preset name (w4-fast, w4-best, w3-best, w2-best)")
    p.add_argument("--calib", help="calibration text file (needed by calibrated methods: GPTQ, AWQ, Wanda, ...)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--calib-samples", type=int, default=None,
                   help="calibration windows (default 16; 64 for recipes that train on them, as LearnedRound)")
    p.add_argument("--calib-seqlen", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--calibration-dtype", type=_dtype, default=None,
                   help="dtype of the calibration forwards (bf16 is ~2.5x faster on CPU); default: the model's")
    p.add_argument("--dtype", type=_dtype, default=torch.float32, help="dtype to load the model in (fp32, bf16)")
    p.add_argument("--json", action="store_true", help="print the compression report as JSON")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("report", help="memory per layer and the recipe of a saved model")
    p.add_argument("directory", help="a directory written by `llmopt compress` / llmopt.hf.save_pretrained")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("bench", help="perplexity, decode tokens/s and weight memory")
    p.add_argument("model", help="a compressed directory, a local HF model directory, a .gguf file or 'smollm2'")
    p.add_argument("--text", help="text file for perplexity (skipped without it)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per decode run (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length for decoding (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed decode runs, median reported (default 3)")
    p.add_argument("--window", type=int, default=1024, help="perplexity window in tokens (default 1024)")
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens of the text")
    p.add_argument("--dtype", type=_dtype, default=torch.float32, help="dtype for an uncompressed model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export", help="write a model as GGUF (llama.cpp) or compressed-tensors (vLLM)",
                       description="Export a directory written by `llmopt compress` (or any model `bench` takes) "
                                   "to GGUF or compressed-tensors, from llmopt's own codes; a layer that does not "
                                   "map exactly is refused unless --requantize.")
    p.add_argument("model", help="a compressed directory, a local HF model directory, a .gguf file or 'smollm2'")
    p.add_argument("--to", required=True, choices=EXPORT_TARGETS, help="target format")
    p.add_argument("--out", required=True, help="output file (gguf) or directory (compressed-tensors)")
    p.add_argument("--requantize", action="store_true",
                   help="re-quantize layers that do not map exactly (the added error is reported)")
    p.add_argument("--float-type", default="f16", choices=("f16", "bf16", "f32"),
                   help="GGUF type of the tensors that stay float (default f16; norms are always f32)")
    p.add_argument("--json", action="store_true", help="print the export report as JSON")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("demo", help="a 10-second demo on a toy model", add_help=False)
    p.set_defaults(func=None)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``llmopt`` console script and ``python -m llmopt``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] == "demo":  # bare `python -m llmopt` keeps running the demo
        return demo_main(argv[1:]) or 0
    args = _parser().parse_args(argv)
    if args.func is None:
        _parser().print_help()
        return 2
    try:
        return args.func(args)
    # User errors: bad input files (a loader's ValueError / OSError names the file), a bad recipe, a model
    # the recipe cannot apply to. Anything else is a bug in llmopt and keeps its traceback.
    except (CliError, RecipeError, CompressionError, ValueError, OSError) as exc:
        print(f"llmopt {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"llmopt {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line (an OSError's own text with its file name, not its repr)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.strerror}: {exc.filename!r}"
    elif isinstance(exc, (KeyError, OSError)) and exc.args and isinstance(exc.args[0], str):
        text = exc.args[0]
    else:
        text = str(exc)
    return " ".join(text.split()) or type(exc).__name__


if __name__ == "__main__":
    raise SystemExit(main())
