"""``int8-mixed``'s activation quantization for prefill as one CPU op
(``cpu_quantize_copies.cpp``), shared by every site.

Invariant: ``lowbit::quantize_rows_copies_cpu`` returns ``reference.quantize_rows_copies``'
codes and scales bit for bit on finite rows (a row with a NaN or an infinity gets zero codes
and a NaN scale). Why an op rather than aten ops for inductor: each site's outlier copies give
its quantization its own width K + E, so inductor compiled one kernel per site (105 C++
kernels for SmolLM2's prefill graph against ``w8a8``'s 21; docs/results.md).

The C++ is built on first use by inductor's C++ builder (cached on disk across processes).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from . import cpp_build
from .reference import empty_quantized_copies

__all__ = ["available", "library"]

_SOURCE = Path(__file__).with_name("cpu_quantize_copies.cpp")

torch.library.define(
    "lowbit::quantize_rows_copies_cpu",
    "(Tensor x, Tensor copies, Tensor src, Tensor piece) -> (Tensor, Tensor)",
)


@torch.library.register_fake("lowbit::quantize_rows_copies_cpu")
def _(x, copies, src, piece):
    return empty_quantized_copies(x, src)


@functools.cache
def library():
    """Build (first call on a machine) and load the op (``cpp_build.load``)."""
    return cpp_build.load(_SOURCE, "lowbit_quantize_copies_built_with_avx2")


@functools.cache
def available() -> bool:
    """Whether the op builds and loads here (else the aten reference stays)."""
    return cpp_build.builds(library)
