"""Block-sequential calibration runner and streaming stats (llmopt.calibration).

Every check runs on three kinds of model: ``ToyTransformer`` (hand-written, ``layers``), a tiny
Hugging Face Llama (``model.layers``) and a tiny GPT-2 (``transformer.h``, ``Conv1D`` layers), plus a
model defined here whose blocks return tuples and take their hidden states by keyword.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmopt.calibration import (
    LayerStats,
    StatsSpec,
    capture_block_inputs,
    collect_stats,
    find_blocks,
    linear_like_modules,
    run_blocks,
)
from llmopt.testing import ToyMLP, ToyTransformer

VOCAB = 128


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matmuls: see conftest.one_thread


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------
class TupleBlock(nn.Module):
    """A block no library knows: hidden states by keyword, extra positional arg, returns a tuple."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ff = nn.Linear(dim, 2 * dim)
        self.ff_out = nn.Linear(2 * dim, dim)

    def forward(self, bias_table, *, hidden_states, mask=None):
        h = self.norm(hidden_states)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        att = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5 + bias_table
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf"))
        x = hidden_states + self.out(att.softmax(-1) @ v)
        x = x + self.ff_out(F.gelu(self.ff(x)))
        return x, att


class TupleModel(nn.Module):
    def __init__(self, dim: int = 32, n_layers: int = 3):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(TupleBlock(dim) for _ in range(n_layers))
        self.extra = nn.ModuleList([nn.Linear(dim, dim)])  # a smaller ModuleList: must not be picked
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, input_ids, attention_mask=None):
        t = input_ids.shape[1]
        x = self.tok(input_ids)
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        if attention_mask is not None:
            mask = mask & attention_mask.bool()[:, None, :]
            mask = mask | torch.eye(t, dtype=torch.bool)  # padded rows still see themselves
        bias_table = torch.linspace(-1, 0, t)
        for block in self.blocks:
            x, _ = block(bias_table, hidden_states=x, mask=mask)
        return self.head(self.extra[0](x))


def make_model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "toy":
        model = ToyTransformer(vocab=VOCAB, n_layers=3)
    elif kind == "tuple":
        model = TupleModel()
    elif kind == "llama":
        transformers = pytest.importorskip("transformers")
        cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "gpt2":
        transformers = pytest.importorskip("transformers")
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                                      bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
        model.train()  # dropout on: the runner must calibrate in eval mode and restore the flag
    else:
        raise KeyError(kind)
    return model


BLOCK_PATHS = {"toy": "layers", "tuple": "blocks", "llama": "model.layers", "gpt2": "transformer.h"}
KINDS = list(BLOCK_PATHS)


def batches_for(n: int = 3, batch: int = 2, seq: int = 12, seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=gen) for _ in range(n)]


def forward(model, batch):
    kwargs = dict(batch) if isinstance(batch, dict) else {"input_ids": batch}
    if hasattr(model, "config"):
        kwargs["use_cache"] = False
    with torch.no_grad():
        return model(**kwargs)


def hidden_of(args, kwargs):
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


class BlockInputRecorder:
    """Pre-hooks on every block: the hidden states each call received, per block."""

    def __init__(self, blocks):
        self.inputs = {i: [] for i in range(len(blocks))}
        self.handles = [b.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                        for i, b in enumerate(blocks)]

    def _hook(self, i):
        def hook(module, args, kwargs):
            self.inputs[i].append(hidden_of(args, kwargs).detach().clone())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def reference_stats(model, batches):
    """x^T x, count, column sums of squares and absmax of every linear's inputs, from plain forwards."""
    ref, handles = {}, []
    for name, module in linear_like_modules(model).items():
        def hook(mod, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            h, c, sq, am = ref.get(name, (0, 0, 0, torch.zeros(x.shape[1], dtype=torch.float64)))
            ref[name] = (h + x.T @ x, c + x.shape[0], sq + (x * x).sum(0), torch.maximum(am, x.abs().amax(0)))
        handles.append(module.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for b in batches:
            forward(model, b)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return ref


def assert_stats_match(stats, ref):
    assert set(stats) == set(ref)
    for name, s in stats.items():
        h, count, sq, am = ref[name]
        assert s.count == count, name
        assert s.hessian.dtype == torch.float64
        rel = (s.hessian - h).norm() / h.norm()
        assert rel < 1e-6, f"{name}: Hessian relative error {rel:.2e}"
        torch.testing.assert_close(s.col_sq_sum, sq, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(s.absmax.double(), am, rtol=1e-6, atol=0)


def run_identity(model, batches, **kwargs):
    collected, calls = {}, []

    def process_block(i, block, stats):
        calls.append(i)
        collected.update(stats)

    run_blocks(model, batches, process_block, progress=False, **kwargs)
    return collected, calls


# --------------------------------------------------------------------------------------------------
# LayerStats
# --------------------------------------------------------------------------------------------------
def test_layer_stats_streaming_matches_direct():
    x = torch.randn(5, 7, 24, dtype=torch.float32)
    s = LayerStats(24)
    s.update(x[:2])
    s.update(x[2:])
    flat = x.reshape(-1, 24).double()
    assert s.count == 35
    torch.testing.assert_close(s.hessian, flat.T @ flat)
    torch.testing.assert_close(s.mean_hessian(), flat.T @ flat / 35)
    torch.testing.assert_close(s.col_norm(), flat.norm(dim=0))
    torch.testing.assert_close(s.absmax, x.abs().reshape(-1, 24).amax(0))
    assert "count=35" in repr(s)


def test_layer_stats_float32_and_cheap_mode():
    x = torch.randn(10, 16)
    s32 = LayerStats(16, StatsSpec(dtype=torch.float32))
    s32.update(x)
    assert s32.hessian.dtype == torch.float32
    cheap = LayerStats(16, StatsSpec(hessian=False))
    cheap.update(x)
    assert cheap.hessian is None and cheap.count == 10
    torch.testing.assert_close(cheap.col_norm().float(), x.norm(dim=0))
    with pytest.raises(RuntimeError, match="hessian=True"):
        cheap.mean_hessian()
    with pytest.raises(RuntimeError, match="no inputs"):
        LayerStats(16).mean_hessian()
    with pytest.raises(ValueError, match="expected 16"):
        LayerStats(16).update(torch.randn(3, 8))
    with pytest.raises(ValueError, match="float64 or torch.float32"):
        StatsSpec(dtype=torch.float16)


# --------------------------------------------------------------------------------------------------
# find_blocks
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_find_blocks_generic(kind):
    model = make_model(kind)
    path, blocks = find_blocks(model)
    assert path == BLOCK_PATHS[kind]
    assert blocks is model.get_submodule(path)
    assert find_blocks(model, path=path)[1] is blocks  # the override path


def test_find_blocks_override_and_errors():
    model = TupleModel()
    path, blocks = find_blocks(model, path="extra")
    assert path == "extra" and len(blocks) == 1
    with pytest.raises(ValueError, match="'nope.layers' does not exist"):
        find_blocks(model, path="nope.layers")
    with pytest.raises(ValueError, match="expected a non-empty nn.ModuleList"):
        find_blocks(model, path="head")
    with pytest.raises(ValueError, match="no repeated blocks"):
        find_blocks(ToyMLP())


# --------------------------------------------------------------------------------------------------
# Capture
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_capture_block_inputs(kind, snapshot):
    model = make_model(kind)
    snap = snapshot(model)
    path, blocks = find_blocks(model)
    batches = batches_for(n=2)
    captured = capture_block_inputs(model, blocks, batches)
    assert len(captured) == 2
    rec = BlockInputRecorder(blocks)
    try:
        model.eval()
        for b in batches:
            forward(model, b)
    finally:
        rec.remove()
    for (args, kwargs), expected in zip(captured, rec.inputs[0]):
        torch.testing.assert_close(hidden_of(args, kwargs), expected, rtol=0, atol=0)
        assert kwargs.get("use_cache", False) is False
        for v in list(args) + list(kwargs.values()):
            assert v is None or not type(v).__name__.endswith("Cache")
    if kind == "llama":
        cos, sin = captured[0][1]["position_embeddings"]
        assert cos.shape[-2] == 12
    snap.check()


# --------------------------------------------------------------------------------------------------
# Block-sequential run
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_identity_run_matches_full_forward(kind):
    model = make_model(kind)
    was_training = model.training
    path, blocks = find_blocks(model)
    batches = batches_for()

    # the real model's block inputs, from hooked full forwards
    rec = BlockInputRecorder(blocks)
    model.eval()
    try:
        for b in batches:
            forward(model, b)
    finally:
        rec.remove()
    model.train(was_training)
    expected_inputs = rec.inputs
    ref = reference_stats(model, batches)

    rec = BlockInputRecorder(blocks)
    try:
        stats, calls = run_identity(model, batches)
    finally:
        rec.remove()
    assert calls == list(range(len(blocks)))
    assert model.training == was_training
    n = len(batches)
    for i in range(len(blocks)):
        # the first n calls of block i are its calibration pass, fed by block i-1's outputs
        for got, want in zip(rec.inputs[i][:n], expected_inputs[i]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    block_ref = {k: v for k, v in ref.items() if k.startswith(path + ".")}
    assert_stats_match(stats, block_ref)
    assert any(".0." in k for k in stats) and any(f".{len(blocks) - 1}." in k for k in stats)

    # collect_stats (plain forwards) gives the same numbers, for every linear of the model
    assert_stats_match(collect_stats(model, batches), ref)
    # hooks are gone
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["inplace", "replace"])
def test_compressed_block_feeds_next_block(kind, mode):
    model = make_model(kind)
    path, blocks = find_blocks(model)
    batches = batches_for()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    rec = BlockInputRecorder(blocks)
    try:
        for b in batches:
            forward(model, b)
    finally:
        rec.remove()
    original_block1 = rec.inputs[1]

    seen = {}

    def process_block(i, block, stats):
        seen[i] = stats
        if i != 0:
            return
        name = sorted(stats)[-1]  # some linear of block 0
        rel = name[len(f"{path}.0."):]
        layer = block.get_submodule(rel)
        if mode == "inplace":
            layer.weight.data.mul_(0.5)
        else:
            new = type(layer).__new__(type(layer))
            new.__dict__ = dict(layer.__dict__)
            new._parameters = {k: (nn.Parameter(v.detach() * 0.5) if k == "weight" and v is not None else v)
                               for k, v in layer._parameters.items()}
            parent, _, attr = rel.rpartition(".")
            setattr(block.get_submodule(parent) if parent else block, attr, new)

    rec = BlockInputRecorder(blocks)
    try:
        run_blocks(model, batches, process_block, progress=False)
    finally:
        rec.remove()

    # expected: block 1's inputs in the *modified* model, from hooked full forwards
    expected = BlockInputRecorder(blocks)
    try:
        for b in batches:
            forward(model, b)
    finally:
        expected.remove()
    n = len(batches)
    for got, want, before in zip(rec.inputs[1][:n], expected.inputs[1], original_block1):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, before, atol=1e-4), "block 1 did not see the compressed block 0"
    assert model.state_dict().keys() == original.keys()

    # block 1's stats come from the compressed block 0's outputs
    ref = reference_stats(model, batches)
    assert_stats_match(seen[1], {k: v for k, v in ref.items() if k in seen[1]})


@pytest.mark.parametrize("kind", ["toy", "tuple", "llama", "gpt2"])
def test_dict_batches_with_padding(kind):
    model = make_model(kind)
    path, blocks = find_blocks(model)
    gen = torch.Generator().manual_seed(3)
    batches = []
    for pad in (0, 3):
        ids = torch.randint(0, VOCAB, (2, 10), generator=gen)
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[1, :pad] = 0  # left padding on the second row
        batches.append({"input_ids": ids, "attention_mask": mask} if kind != "toy" else {"input_ids": ids})
    model.eval()
    rec = BlockInputRecorder(blocks)
    try:
        for b in batches:
            forward(model, b)
    finally:
        rec.remove()
    expected = rec.inputs
    rec = BlockInputRecorder(blocks)
    try:
        stats, _ = run_identity(model, batches)
    finally:
        rec.remove()
    for got, want in zip(rec.inputs[len(blocks) - 1][:2], expected[len(blocks) - 1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert all(s.count == 40 and torch.isfinite(s.hessian).all() for s in stats.values())


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
@pytest.mark.parametrize("offload", [False, True])
def test_device_argument(device, offload):
    model = make_model("toy")
    batches = batches_for()
    ref, _ = run_identity(model, batches)
    got, _ = run_identity(model, batches, device=device, offload_activations=offload)
    for name in ref:
        torch.testing.assert_close(got[name].hessian, ref[name].hessian, rtol=0, atol=0)
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_stats_spec_and_patterns():
    model = make_model("toy")
    batches = batches_for(n=2)
    seen = {}
    calls = []
    run_blocks(model, batches, lambda i, b, s: calls.append(s), progress=False, include=["lm_head"])
    assert calls == [{}, {}, {}]  # no linear of the blocks selected: every block still runs, with no stats
    run = run_blocks(model, batches, lambda i, b, s: seen.update(s), progress=False,
                     stats_spec=StatsSpec(hessian=False, dtype=torch.float32), include=["*_proj"],
                     exclude="*.up_proj")
    assert run.num_blocks == 3 and run.num_batches == 2 and run.tokens == 48 and len(run.block_seconds) == 3
    assert seen and not any(k.endswith("up_proj") for k in seen)
    assert all(s.hessian is None and s.col_sq_sum.dtype == torch.float32 for s in seen.values())


def test_collect_stats_include():
    pytest.importorskip("transformers")
    model = make_model("llama")
    stats = collect_stats(model, batches_for(n=2), StatsSpec(hessian=False), include="*.mlp.*")
    assert set(stats) == {f"model.layers.{i}.mlp.{p}" for i in range(2)
                          for p in ("gate_proj", "up_proj", "down_proj")}
    assert "lm_head" in collect_stats(model, batches_for(n=1), StatsSpec(hessian=False))
    with pytest.raises(ValueError, match="no linear layer"):
        collect_stats(model, batches_for(n=1), include="*.nothing_here")


def test_progress_bar(capsys):
    model = make_model("toy")
    run_blocks(model, batches_for(n=1), lambda *a: None, progress=True)
    assert "calibrating layers" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Errors leave the model untouched
# --------------------------------------------------------------------------------------------------
BAD_BATCHES = [
    ([], "calibration data is empty"),
    (None, "calibration data is empty"),
    (torch.randint(0, VOCAB, (2, 8)), "list of batches"),
    ([torch.randint(0, VOCAB, (2, 8)), torch.randn(2, 8)], r"batch 1: .*dtype torch.float32.*token ids"),
    ([torch.randint(0, VOCAB, (2, 8)), torch.randint(0, VOCAB, (2, 8, 4))], r"batch 1: .*shape \(2, 8, 4\)"),
    ([torch.randint(0, VOCAB, (2, 8)), torch.full((2, 8), VOCAB + 5)], r"batch 1: .*vocabulary"),
    (["some text"], r"batch 0 is a str; expected a tensor of token ids"),
    ([{}], "batch 0 is an empty dict"),
    ([{"input_ids": torch.randint(0, VOCAB, (2, 8)), "attention_mask": torch.ones(2, 9)}],
     r"batch 0: attention_mask has shape \(2, 9\)"),
    ([torch.zeros(2, 0, dtype=torch.long)], "batch 0: the tensor is empty"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("data,message", BAD_BATCHES, ids=[f"bad{i}" for i in range(len(BAD_BATCHES))])
def test_bad_calibration_data(kind, data, message, snapshot):
    if kind == "toy" and isinstance(data, list) and data and isinstance(data[0], dict) and len(data[0]) > 1:
        pytest.skip("ToyTransformer takes no attention_mask")
    model = make_model(kind)
    snap = snapshot(model)
    training = model.training
    called = []
    with pytest.raises(ValueError, match=message):
        run_blocks(model, data, lambda *a: called.append(a), progress=False)
    with pytest.raises(ValueError, match=message):
        collect_stats(model, data)
    assert not called
    assert model.training == training
    snap.check()


def test_forward_failure_names_the_batch(snapshot):
    pytest.importorskip("transformers")
    model = make_model("gpt2")  # n_positions=64: a longer sequence fails inside the model
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"calibration batch 1 could not be run through the model"):
        run_blocks(model, [torch.randint(0, VOCAB, (1, 8)), torch.randint(0, VOCAB, (1, 80))],
                   lambda *a: pytest.fail("process_block must not run"), progress=False)
    snap.check()


def test_process_block_error_propagates_and_cleans_up():
    model = make_model("toy")

    def process_block(i, block, stats):
        if i == 1:
            raise RuntimeError("boom in block 1")

    with pytest.raises(RuntimeError, match="boom in block 1"):
        run_blocks(model, batches_for(n=2), process_block, progress=False, device="cpu")
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert model.training


def test_compute_increment_leaves_its_input_untouched():
    # Regression: the chunked per-column sums once took |x| in place, and .to() returns x itself
    # when it already has the accumulation dtype, so the caller's activations were modified.
    from llmopt.calibration.stats import StatsSpec, compute_increment

    for dtype in (torch.float64, torch.float32):
        x = torch.randn(3000, 7, dtype=dtype)
        before = x.clone()
        inc = compute_increment(x, 7, StatsSpec(dtype=dtype))
        assert torch.equal(x, before)
        ref = x.double()
        assert torch.allclose(inc.col_sq.double(), (ref * ref).sum(0), rtol=1e-5)
        assert torch.allclose(inc.xtx.double(), ref.T @ ref, rtol=1e-5, atol=1e-9 if dtype == torch.float64 else 1e-2)
