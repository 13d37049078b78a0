"""LoRA on a quantized base (QLoRA) trains under torch.distributed DDP: two processes, gloo backend.

Each rank sees different data; DDP averages the adapter gradients, so both ranks must end with
bit-identical adapters, and the frozen int4 base must not move.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _build(seed: int = 0):
    import llmopt
    from llmopt.testing import ToyTransformer

    torch.manual_seed(seed)
    model = ToyTransformer(n_layers=2, tie=False)
    llmopt.compress_(model, llmopt.RTN("int4", 32), exclude=["lm_head"])
    llmopt.add_lora_(model, llmopt.LoRA(rank=4, alpha=8), include=["*q_proj", "*v_proj", "*down_proj"])
    return model


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import llmopt

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _build()
        base_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        trainable = [p for p in ddp.parameters() if p.requires_grad]
        opt = torch.optim.SGD(trainable, lr=0.5)
        gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        for _ in range(3):
            ids = torch.randint(0, 128, (2, 16), generator=gen)
            logits = ddp(ids)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad()
        adapters = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
        base_after = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
        unchanged = all(torch.equal(base_before[k], base_after[k]) for k in base_before)
        torch.save({"adapters": adapters, "base_unchanged": unchanged,
                    "trainable": llmopt.trainable_parameters(model)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_qlora_ddp_two_processes_end_with_identical_adapters():
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        r0 = torch.load(os.path.join(tmp, "rank0.pt"), weights_only=True)
        r1 = torch.load(os.path.join(tmp, "rank1.pt"), weights_only=True)
    assert r0["base_unchanged"] and r1["base_unchanged"]
    assert r0["trainable"] == r1["trainable"] > 0
    assert r0["adapters"].keys() == r1["adapters"].keys() and r0["adapters"]
    for key in r0["adapters"]:
        assert torch.equal(r0["adapters"][key], r1["adapters"][key]), key
    # ... and training did something: the adapters moved away from their (B = 0) initialisation.
    fresh = {k: v for k, v in _build().state_dict().items() if "lora_" in k}
    assert any(not torch.equal(fresh[k], r0["adapters"][k]) for k in fresh)
