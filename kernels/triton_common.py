"""Helpers shared by the Triton kernel modules (``triton_int8``, ``triton_lowbit``,
``triton_dequant_gemm``): the interpreter switch, the autotune-config builder, launch grid and
grouped program order of the tiled GEMMs.

Invariant: nothing here changes a kernel's numerics; the ``@triton.jit`` helpers are
inlined into the kernels that call them (import them as module globals of the caller).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def gemm_configs(cfg, interpreted: dict) -> list[triton.Config]:
    """Autotune configs of a tiled GEMM: one config ``interpreted`` (its meta-parameters,
    ``num_warps=4``) under the interpreter, else one per ``(BLOCK_M, BLOCK_N, BLOCK_K,
    GROUP_M, num_stages, num_warps)`` row of ``cfg``."""
    if _interpret_env():
        return [triton.Config(interpreted, num_warps=4)]
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g},
            num_stages=s,
            num_warps=w,
        )
        for bm, bn, bk, g, s, w in cfg
    ]


def gemm_grid(M: int, N: int):
    """Launch grid of a tiled GEMM in grouped program order: one program per output tile."""

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    return grid


@triton.jit
def grouped_tile(
    M,
    N,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """This program's output tile of a ``gemm_grid`` launch: ``(offs_m, offs_n, offs_k,
    m_ok, n_ok)``, rows and columns of the tile, the first K offsets, and the row / column
    masks for ragged shapes."""
    # grouped ordering: GROUP_M row-blocks share the same column-blocks of B (L2 reuse)
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pids_per_group = GROUP_M * num_pid_n
    group = pid // pids_per_group
    first_m = group * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_per_group) % group_rows
    pid_n = (pid % pids_per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    return offs_m, offs_n, offs_k, offs_m < M, offs_n < N
