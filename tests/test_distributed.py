"""Training-time wrappers under torch.distributed: two processes, gloo backend, CPU.

* DDP: QLoRA (adapters on an int4 base) and QAT (fake-quantized float weights). Each rank sees
  different data; DDP averages the gradients, so both ranks must end bit-identical, and a frozen
  int4 base must not move.
* FSDP2 (``torch.distributed.fsdp.fully_shard``, one unit per block plus the root): LoRA, QLoRA and
  QAT. The quantized base's codes are buffers, so FSDP2 shards only the parameters (adapters, norms,
  embeddings, QAT float weights) and replicates the int4 codes. After training, the gathered full
  parameters must equal on both ranks and match the DDP run of the same data up to float rounding
  (FSDP2 reduce-scatters instead of all-reducing: a different summation order).
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

KINDS = ("qlora", "lora", "qat")


def _build(kind: str, seed: int = 0):
    import llmopt
    from llmopt.testing import ToyTransformer

    torch.manual_seed(seed)
    model = ToyTransformer(n_layers=2, tie=False)
    if kind == "qlora":
        llmopt.compress_(model, llmopt.RTN("int4", 32), exclude=["lm_head"])
    if kind in ("qlora", "lora"):
        llmopt.compress_(model, llmopt.LoRA(rank=4, alpha=8), include=["*q_proj", "*v_proj", "*down_proj"])
    if kind == "qat":
        llmopt.compress_(model, llmopt.QAT("int4", group_size=32), exclude=["lm_head"])
    return model


def _full_state(model) -> dict:
    """Every parameter and buffer as a plain tensor (FSDP2's DTensors gathered)."""
    out = {}
    for key, value in model.state_dict().items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[key] = value.detach().clone()
    return out


COMBOS = [("ddp", "qlora"), ("ddp", "qat")] + [("fsdp2", k) for k in KINDS] + [("ddp", "lora")]


def _fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


def _train(kind: str, wrapper: str, rank: int) -> dict:
    model = _build(kind)
    before = _full_state(model)
    if wrapper == "ddp":
        trained = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    else:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        trained = fully_shard(model)
    trainable = [p for p in trained.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.5 if kind != "qat" else 0.05)
    gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    for _ in range(3):
        ids = torch.randint(0, 128, (2, 16), generator=gen)
        logits = trained(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {"before": before, "after": _full_state(model),
            "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad)}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    # One process group for every run: spawning and importing torch twice per case would cost more
    # than all the training together.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for wrapper, kind in COMBOS:
            if wrapper == "fsdp2" and not _fsdp2_available():
                continue
            torch.save(_train(kind, wrapper, rank), os.path.join(out_dir, f"{wrapper}_{kind}_rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        out = {}
        for wrapper, kind in COMBOS:
            paths = [os.path.join(tmp, f"{wrapper}_{kind}_rank{r}.pt") for r in (0, 1)]
            if all(os.path.exists(p) for p in paths):
                out[wrapper, kind] = [torch.load(p, weights_only=True) for p in paths]
        yield out


def _check_ranks_agree_and_trained(r0, r1, kind):
    assert r0["trainable"] == r1["trainable"] and r0["trainable"]
    assert r0["after"].keys() == r1["after"].keys()
    for key in r0["after"]:
        assert torch.equal(r0["after"][key], r1["after"][key]), key
    trainable = set(r0["trainable"])
    moved = [k for k in trainable if not torch.equal(r0["before"][k], r0["after"][k])]
    assert moved, "training changed no trainable parameter"
    # Everything frozen stays bit-identical: the int4 codes and scales, the frozen float weights.
    for key in r0["before"]:
        if key not in trainable:
            assert torch.equal(r0["before"][key], r0["after"][key]), key
    if kind in ("qlora", "lora"):
        assert all("lora_" in k for k in trainable)


@pytest.mark.parametrize("kind", ["qlora", "qat", "lora"])
def test_ddp_two_processes_end_identical(kind, runs):
    r0, r1 = runs["ddp", kind]
    _check_ranks_agree_and_trained(r0, r1, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_fsdp2_two_processes_match_ddp(kind, runs):
    if not _fsdp2_available():
        pytest.skip("this torch has no torch.distributed.fsdp.fully_shard (FSDP2 needs torch >= 2.4)")
    f0, f1 = runs["fsdp2", kind]
    d0, _ = runs["ddp", kind]
    _check_ranks_agree_and_trained(f0, f1, kind)
    for key in d0["after"]:
        torch.testing.assert_close(f0["after"][key], d0["after"][key], rtol=1e-4, atol=1e-5, msg=key)
