"""QuantEmbedding: lookups against float64 references, tied heads sharing one packed table, compress_(embeddings=...)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import llmopt
from llmopt import WeightQuant
from llmopt.core.errors import CompressionError
from llmopt.methods.base import MethodConfig, register_method, unregister_method
from llmopt.nn import QuantEmbedding, QuantLinear
from llmopt.testing import ToyTransformer, sqnr

transformers = pytest.importorskip("transformers")


def _embedding(n: int = 96, d: int = 64, dtype=torch.float32, padding_idx=None, seed: int = 0) -> nn.Embedding:
    torch.manual_seed(seed)
    emb = nn.Embedding(n, d, padding_idx=padding_idx, dtype=dtype)
    with torch.no_grad():
        emb.weight.normal_(0, 0.05)
    return emb




IDS = torch.tensor([[1, 5, 77, 200, 13, 255, 0, 42], [9, 9, 9, 3, 250, 17, 128, 64]])


# ---------------------------------------------------------------------------------------------- lookups
@pytest.mark.parametrize("fmt,group", [("int4", 32), ("int8", None), ("int3", 16), ("nf4", 64), ("fp8_e4m3", 32)])
def test_lookup_is_the_dequantized_table_rows(fmt, group):
    emb = _embedding()
    q = QuantEmbedding.from_embedding(emb, fmt, group)
    ids = torch.randint(0, 96, (3, 7))
    out = q(ids)
    assert out.shape == (3, 7, 64) and out.dtype == torch.float32
    assert torch.equal(out, q.dequantize_weight()[ids])
    # The same codes a QuantLinear of the same weight holds.
    ql = QuantLinear.from_linear(_as_linear(emb), fmt, group, kernel="reference")
    assert torch.equal(q.linear.codes(), ql.codes())
    assert torch.equal(q.dequantize_weight(), ql.dequantize_weight())


def _as_linear(emb: nn.Embedding) -> nn.Linear:
    linear = nn.Linear(emb.embedding_dim, emb.num_embeddings, bias=False)
    with torch.no_grad():
        linear.weight.copy_(emb.weight)
    return linear


@pytest.mark.parametrize("group", [16, 32, 64])
def test_lookup_within_the_rounding_bound_of_the_float_embedding(group):
    """float64 reference: round to nearest moves each entry by at most half a step of its group."""
    emb = _embedding(d=64)
    q = QuantEmbedding.from_embedding(emb, "int4", group, symmetric=True, scale_dtype="float32")
    ids = torch.arange(96)
    got, want = q(ids).double(), emb(ids).detach().double()
    scale = q.linear.canonical_state()["scale"].double().repeat_interleave(group, dim=1)[:, :64]
    assert ((got - want).abs() <= 0.5 * scale * (1 + 1e-6) + 1e-12).all()
    assert sqnr(want, got) > 15


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(1, 80), fmt=st.sampled_from(["int2", "int3", "int4", "int8", "nf4"]),
       group=st.sampled_from([None, 8, 16, 32, 64]), seed=st.integers(0, 2**16))
def test_property_lookup_equals_table_rows(n, d, fmt, group, seed):
    gen = torch.Generator().manual_seed(seed)
    emb = nn.Embedding(n, d)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(n, d, generator=gen))
    q = QuantEmbedding.from_embedding(emb, fmt, group)
    ids = torch.randint(0, n, (2, 5), generator=gen)
    out = q(ids)
    table = q.dequantize_weight(torch.float64)
    assert out.shape == (2, 5, d)
    assert torch.equal(out.double(), table[ids])
    assert q.group_size == (d if group is None else min(group, d))
    assert q.stored_bytes() == q.linear.stored_bytes() > 0


def test_output_dtype_is_the_embeddings():
    q = QuantEmbedding.from_embedding(_embedding(dtype=torch.bfloat16), "int4", 32)
    assert q(IDS % 96).dtype == torch.bfloat16 and q.weight_dtype == torch.bfloat16
    q32 = QuantEmbedding.from_embedding(_embedding(), "int4", 32)
    q32.to(torch.bfloat16)  # follows the model's dtype, as nn.Embedding would
    assert q32(IDS % 96).dtype == torch.bfloat16
    assert q32.linear.canonical_state()["qdata"].dtype == torch.uint8  # the codes are not cast


def test_padding_idx_is_kept_and_looked_up():
    emb = _embedding(padding_idx=-1)
    q = QuantEmbedding.from_embedding(emb, "int8", None)
    assert q.padding_idx == 95 == emb.padding_idx
    assert torch.equal(q(torch.tensor([95])), q.dequantize_weight()[95:96])
    assert "padding_idx=95" in repr(q)


def test_repr_bytes_and_config_round_trip():
    q = QuantEmbedding.from_embedding(_embedding(), "int4", 32)
    text = repr(q)
    assert "96, 64" in text and "format=int4" in text and "group_size=32" in text and "kernel=reference" in text
    # int4 codes + bf16 scale and zero point per 32 entries: 4 + 2 * 16 / 32 = 5 bits per entry.
    assert q.bits_per_weight() == 5.0
    assert q.stored_bytes() == 96 * 64 // 2 + 2 * 96 * 2 * 2 == q.runtime_bytes()
    assert set(q.state_dict()) == {"linear.qdata", "linear.scale", "linear.zero_point"}
    twin = QuantEmbedding.from_config(q.config())
    twin.load_state_dict(q.state_dict())
    assert torch.equal(twin(IDS % 96), q(IDS % 96)) and repr(twin) == repr(q)
    assert torch.equal(q.to_embedding().weight, q.dequantize_weight())


# ---------------------------------------------------------------------------------------------- errors
def test_bad_ids_are_clear_errors():
    q = QuantEmbedding.from_embedding(_embedding(), "int4", 32)
    with pytest.raises(TypeError, match=r"QuantEmbedding\(96, 64\).*integer token ids"):
        q(torch.tensor([1.0, 2.0]))
    with pytest.raises(IndexError, match=r"QuantEmbedding\(96, 64\).*token id 96.*96 rows"):
        q(torch.tensor([3, 96]))
    with pytest.raises(IndexError, match=r"token id -1"):
        q(torch.tensor([-1, 0]))
    assert q(torch.zeros(0, dtype=torch.long)).shape == (0, 64)


def test_bad_weights_are_clear_errors():
    emb = _embedding()
    with torch.no_grad():
        emb.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match=r"nn.Embedding\(96, 64\).*NaN/Inf"):
        QuantEmbedding.from_embedding(emb, "int4", 32)
    with pytest.raises(ValueError, match="max_norm"):
        QuantEmbedding.from_embedding(nn.Embedding(10, 8, max_norm=1.0), "int4", 8)
    with pytest.raises(TypeError, match="nn.Embedding"):
        QuantEmbedding.from_embedding(nn.Linear(8, 10), "int4", 8)
    with pytest.raises(ValueError, match=r"\[10, 8\]"):
        QuantEmbedding(12, 8, linear=QuantLinear(8, 10, bias=False, group_size=8))


# ---------------------------------------------------------------------------------------------- compress_
def test_embeddings_are_not_quantized_unless_asked(tiny_llama):
    model = tiny_llama()
    llmopt.compress_(model, llmopt.RTN("int4", 32))
    assert type(model.model.embed_tokens) is nn.Embedding


def test_tied_head_shares_the_embedding_table(tiny_llama):
    model = tiny_llama(tie=True)
    with torch.no_grad():
        reference = model(IDS).logits
    float_bytes = model.model.embed_tokens.weight.numel() * 4
    report = llmopt.compress_(model, llmopt.RTN("int4", 32), embeddings=WeightQuant("int4", 32))
    embed = model.model.embed_tokens
    assert isinstance(embed, QuantEmbedding)
    assert model.lm_head is embed.linear  # one module, one set of packed tensors
    assert model.get_output_embeddings() is embed.linear
    head_ptrs = {k: t.data_ptr() for k, t in model.lm_head._buffers.items()}
    table_ptrs = {k: t.data_ptr() for k, t in embed.linear._buffers.items()}
    assert head_ptrs == table_ptrs
    assert "model.embed_tokens" in report.replaced and "lm_head" in report.replaced
    assert not any("embed" in name for name in report.skipped)
    assert any("shared with lm_head" in note for note in report.notes)
    assert not any("keeps the float tensor" in note for note in report.notes)
    # The tied float weight counted once before, the packed table once after.
    linears = [m for n, m in model.named_modules() if isinstance(m, QuantLinear) and n.startswith("model.layers")]
    assert report.bytes_before == float_bytes + sum(m.in_features * m.out_features * 4 for m in linears)
    assert report.bytes_after == embed.stored_bytes() + sum(m.stored_bytes() for m in linears)
    memory = llmopt.memory_report(model)
    names = [layer.name for layer in memory.layers]
    assert "model.embed_tokens" in names and "lm_head" not in names
    floats = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
                 if t.is_floating_point())  # norms, rotary frequencies (the quantized tensors are integer or bf16)
    floats -= sum(t.numel() * t.element_size() for m in [embed.linear] + linears for t in m.buffers()
                  if t.is_floating_point())
    assert memory.stored_bytes == report.bytes_after + floats
    with torch.no_grad():
        out = model(IDS).logits
    assert sqnr(reference, out) > 8
    # Lookup uses the table's rows; the head multiplies by the same table.
    hidden = torch.randn(3, 64)
    assert torch.allclose(model.lm_head(hidden), hidden @ embed.dequantize_weight().T, atol=5e-2)


def test_untied_embedding_gets_its_own_table_on_the_row_kernel(tiny_llama):
    model = tiny_llama(tie=False)
    report = llmopt.compress_(model, llmopt.RTN("int4", 32), embeddings="int8")
    embed = model.model.embed_tokens
    assert isinstance(embed, QuantEmbedding) and embed.kernel.name == "reference"
    assert embed.format.name == "int8" and embed.group_size == 64  # WeightQuant's default g128, clipped
    assert isinstance(model.lm_head, QuantLinear) and model.lm_head is not embed.linear
    assert "model.embed_tokens" in report.replaced


def test_embeddings_only_and_recipe_round_trip(tiny_llama):
    model = tiny_llama()
    recipe = llmopt.Recipe([llmopt.RTN("int4", 32)], embeddings=WeightQuant("int4", 64))
    assert llmopt.Recipe.from_dict(recipe.to_dict()) == recipe
    assert recipe.to_dict()["embeddings"] == {"format": "int4", "group_size": 64, "symmetric": None,
                                              "scale_dtype": "bfloat16", "kernel": "auto"}
    assert "embeddings" not in llmopt.Recipe([llmopt.RTN("int4", 32)]).to_dict()
    assert recipe.label().startswith("embeddings int4 g64 -> ")
    llmopt.compress_(model, recipe)
    assert model.lm_head is model.model.embed_tokens.linear
    assert model._llmopt_recipe["embeddings"]["group_size"] == 64
    with pytest.raises(ValueError, match="differs from the recipe"):
        llmopt.compress_(tiny_llama(), recipe, embeddings="int8")

    only = tiny_llama()
    report = llmopt.compress_(only, None, embeddings=WeightQuant("int4", 32))
    assert set(report.replaced) == {"model.embed_tokens", "lm_head"}
    assert isinstance(only.model.layers[0].mlp.up_proj, nn.Linear)
    with pytest.raises(TypeError, match="method config"):
        llmopt.compress_(tiny_llama(), None)


def test_what_is_left_alone_and_why(tiny_llama):
    model = tiny_llama(tie=True)
    report = llmopt.compress_(model, llmopt.RTN("int4", 32), exclude=["lm_head"], embeddings="int4")
    assert type(model.model.embed_tokens) is nn.Embedding  # quantizing it alone would add a copy
    assert "lm_head" in report.skipped["model.embed_tokens"] and "excluded" in report.skipped["model.embed_tokens"]
    assert model.lm_head.weight is model.model.embed_tokens.weight

    class Scaled(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids) * 2.0

    toy = ToyTransformer(tie=False)
    toy.embed = Scaled(128, 64)
    report = llmopt.compress_(toy, llmopt.RTN("int4", 32), embeddings="int4")
    assert type(toy.embed) is Scaled and "subclass" in report.skipped["embed"]
    with pytest.raises(ValueError, match="no nn.Embedding"):
        llmopt.compress_(tiny_llama(), llmopt.RTN("int4", 32), embeddings="int4", exclude=["*embed_tokens"])
    with pytest.raises(ValueError, match="unknown kernel"):
        llmopt.compress_(tiny_llama(), llmopt.RTN("int4", 32), embeddings=WeightQuant("int4", kernel="nope"))


def test_all_or_nothing(tiny_llama):
    @dataclasses.dataclass(frozen=True)
    class Boom(MethodConfig):
        name = "boom_embedding_test"

    @register_method(Boom)
    def _boom(linear, config, *, name=""):
        if name.endswith("down_proj"):
            raise RuntimeError("boom")
        return QuantLinear.from_linear(linear, "int4", 32)

    try:
        model = tiny_llama(tie=True)
        embed, head = model.model.embed_tokens, model.lm_head
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(CompressionError, match="down_proj"):
            llmopt.compress_(model, Boom(), embeddings="int4")
        assert model.model.embed_tokens is embed and model.lm_head is head and head.weight is embed.weight
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    finally:
        unregister_method("boom_embedding_test")

    model = tiny_llama(tie=True)
    with torch.no_grad():
        model.model.embed_tokens.weight[7, 3] = float("inf")
    with pytest.raises(CompressionError, match=r"model\.embed_tokens.*NaN/Inf"):
        llmopt.compress_(model, llmopt.RTN("int4", 32), embeddings="int4")
    assert type(model.model.embed_tokens) is nn.Embedding and type(model.lm_head) is nn.Linear


def test_copies_and_casts_keep_the_tie(tiny_llama):
    model = tiny_llama(tie=True)
    llmopt.compress_(model, llmopt.RTN("int4", 32), embeddings="int4")
    twin = copy.deepcopy(model)
    assert twin.lm_head is twin.model.embed_tokens.linear and twin.lm_head is not model.lm_head
    with torch.no_grad():
        assert torch.equal(twin(IDS).logits, model(IDS).logits)
    model.to(torch.bfloat16)
    assert model.lm_head is model.model.embed_tokens.linear
    assert model.model.embed_tokens(IDS).dtype == torch.bfloat16
    with torch.no_grad():
        assert model(IDS).logits.dtype == torch.bfloat16


def test_quantizing_embeddings_twice_skips_them(tiny_llama):
    model = tiny_llama()
    llmopt.compress_(model, llmopt.RTN("int4", 32), embeddings="int4")
    table = model.model.embed_tokens.linear
    again = llmopt.compress_(model, None, embeddings="int4")
    assert again.replaced == {} and again.skipped == {"model.embed_tokens": "already compressed (QuantEmbedding)"}
    assert model.lm_head is table is model.model.embed_tokens.linear
