"""The streaming safetensors writer: safetensors reads back what it wrote."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qcompile import safetensors_writer, serialize

DTYPES = list(serialize.DTYPES.values())  # every dtype a lowbit file holds


def _tensor(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-100 if dtype != torch.uint8 else 0, 100, shape, generator=g).to(dtype)


@settings(max_examples=25, deadline=None)
@given(
    specs=st.lists(
        st.tuples(
            st.sampled_from(DTYPES),
            st.lists(st.integers(0, 5), min_size=0, max_size=3),
        ),
        min_size=1,
        max_size=6,
    ),
    seed=st.integers(0, 2**16),
)
def test_reads_back_as_save_file_writes(tmp_path_factory, specs, seed):
    tensors = {f"t{i}/x": _tensor(d, s, seed + i) for i, (d, s) in enumerate(specs)}
    meta = {"lowbit": json.dumps({"a": 1}), "other": "x"}
    d = tmp_path_factory.mktemp("w")
    safetensors_writer.write(tensors, d / "ours.safetensors", metadata=meta)
    save_file(tensors, str(d / "theirs.safetensors"), metadata=meta)
    ours, theirs = load_file(d / "ours.safetensors"), load_file(d / "theirs.safetensors")
    assert ours.keys() == theirs.keys() == tensors.keys()
    for k, t in tensors.items():
        assert ours[k].dtype == t.dtype and torch.equal(ours[k], t)
    with safe_open(d / "ours.safetensors", "pt") as f:
        assert f.metadata() == meta
    assert _data_bytes(d / "ours.safetensors") == _data_bytes(d / "theirs.safetensors")


def _data_bytes(path) -> int:
    """The size after the header (the header's own length depends on the data order)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    assert n % 8 == 0
    return path.stat().st_size - 8 - n


def test_views_shared_memory_and_slices(tmp_path, monkeypatch):
    base = torch.arange(64 * 1024, dtype=torch.float32).reshape(256, 256)
    tensors = {"whole": base, "rows": base[3:9], "cols": base[:, 5:7], "again": base}
    monkeypatch.setattr(safetensors_writer, "SLICE_BYTES", 1000)  # not a multiple of a row
    safetensors_writer.write(tensors, tmp_path / "f.safetensors")
    back = load_file(tmp_path / "f.safetensors")
    for k, t in tensors.items():
        assert torch.equal(back[k], t), k


def test_unsupported_dtype_says_so(tmp_path):
    with pytest.raises(ValueError, match="cannot store torch.complex64"):
        safetensors_writer.write({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "f")
