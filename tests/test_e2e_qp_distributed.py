"""E2E-QP under torch.distributed: two gloo processes, each with half of every global
batch, end with the step sizes one process gets from the whole batches."""

from __future__ import annotations

import socket

import torch
import torch.multiprocessing as mp
from ddp_e2e_qp_worker import train


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_the_step_sizes_one_process_does(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    mp.spawn(train, args=(1, free_port(), str(one)), nprocs=1)
    mp.spawn(train, args=(2, free_port(), str(two)), nprocs=2)
    reference = torch.load(one / "rank0.pt")
    assert len(reference) == 14
    for rank in (0, 1):
        scales = torch.load(two / f"rank{rank}.pt")
        assert scales.keys() == reference.keys()
        for name, s in reference.items():
            torch.testing.assert_close(scales[name], s, rtol=1e-4, atol=1e-6, msg=name)
