"""A process of the 2-process E2E-QP test (tests/test_e2e_qp_distributed.py): trains a
tiny Block-AP model's step sizes on its share of the batches under gloo and saves them."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import qcompile
from qcompile.qat_convert import trained_artifact


def train(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        from test_block_ap_e2e_qp import batches, tiny_llama

        model = tiny_llama()
        qcompile.block_ap(model, batches(), "w2a16-g32", epochs=1, progress=False)
        steps = batches(8, seed=7)  # 8 global batches of 2 sequences
        shard = [torch.cat(steps[i : i + 2])[rank::world] for i in range(0, 8, 2)]
        qcompile.e2e_qp(model, shard, epochs=2, lr=1e-3, progress=False)
        scales = {
            n: trained_artifact(m).tensors["scales"]
            for n, m in model.named_modules()
            if trained_artifact(m) is not None
        }
        torch.save(scales, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
