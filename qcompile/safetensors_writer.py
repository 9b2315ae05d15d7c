"""A safetensors file written one tensor at a time, never holding a second copy.

``safetensors.torch.save_file`` turns every tensor into bytes in memory before it writes
(for a model as large as memory, a second copy of it). ``write`` streams each tensor's
bytes to the file in slices, and ``tensor_bytes`` (also what the checksums read) gives
back, slice by slice, the pages of tensors mapped from a file, so saving a model whose
weights are still mapped from its checkpoint reads them without keeping them resident.

Invariant: the file holds what ``save_file`` writes for the same tensors and metadata
(``load_file`` / ``safe_open`` read back the same tensors; only the order of the data
may differ): the header's size as a little-endian u64, the JSON header padded with spaces
to a multiple of 8 bytes, then the data, largest element size first, so every tensor
starts at a multiple of its element size. Tensors may share memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch

from . import memory

_NAMES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint64": "U64",
    "uint32": "U32",
    "uint16": "U16",
    "uint8": "U8",
    "bool": "BOOL",
}
SLICE_BYTES = 16 << 20  # read, written and given back this much at a time


def dtype_code(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _NAMES:
        raise ValueError(f"safetensors cannot store {dtype}; convert the tensor first")
    return _NAMES[name]


def tensor_bytes(t: torch.Tensor, ranges=None) -> Iterator[torch.Tensor]:
    """``t``'s bytes (row-major) as uint8 tensors of at most ``SLICE_BYTES``; where ``t``
    lies in a mapped file, each slice's pages are given back after the caller used it.
    ``ranges``: ``memory.file_mapped_ranges()``, read once by a caller of many tensors."""
    flat = t.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return
    raw = flat.view(torch.uint8)
    ranges = memory.file_mapped_ranges() if ranges is None else ranges
    mapped = memory.in_ranges(raw, ranges)
    for start in range(0, raw.numel(), SLICE_BYTES):
        piece = raw[start : start + SLICE_BYTES]
        yield piece
        if mapped:
            memory.drop_file_pages(piece, ranges)


def write(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> None:
    """Write ``tensors`` (CPU, any layout) and string ``metadata`` to ``path``."""
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": dtype_code(t.dtype),
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    ranges = memory.file_mapped_ranges()
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name in order:
            for piece in tensor_bytes(tensors[name], ranges):
                f.write(piece.numpy().data)
