"""Parameters of a meta-device model read from a safetensors checkpoint, part by part.

Block-AP on a model larger than memory (``qcompile.block_ap(..., checkpoint=...)``): the
model is built without weights (accelerate's ``init_empty_weights``: parameters on the
meta device, buffers real), the parameters outside the repeated blocks are read up front and
each block's when its turn comes. Invariant: a materialized parameter holds exactly the
checkpoint's tensor (cast to the parameter's dtype), every module sharing it (a tied
lm_head) gets the same new ``Parameter``, and nothing else of the checkpoint is read.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


class Checkpoint:
    """The tensors of one ``.safetensors`` file, or of a folder of them (sharded)."""

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise ValueError(
                f"checkpoint {str(path)!r}: expected a .safetensors file or a folder holding "
                "them (e.g. what save_pretrained writes)"
            )
        self.where: dict[str, Path] = {}
        for f in files:
            with safe_open(f, framework="pt") as sf:
                for key in sf.keys():
                    self.where[key] = f

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        missing = [n for n in names if n not in self.where]
        if missing:
            raise ValueError(
                f"the checkpoint lacks {len(missing)} parameter(s) the model needs, e.g. "
                f"{missing[:3]}; is it the checkpoint of this model?"
            )
        out = {}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        for f, keys in by_file.items():
            with safe_open(f, framework="pt") as sf:
                for key in keys:
                    out[key] = sf.get_tensor(key)
        return out


def meta_parameters(model: nn.Module, prefix: str = "", exclude: str | None = None) -> dict:
    """``{Parameter: [names]}`` of the meta parameters under ``prefix`` (all names a
    shared parameter has), skipping those under ``exclude``."""
    found: dict[nn.Parameter, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.device.type != "meta" or not name.startswith(prefix):
            continue
        if exclude is not None and name.startswith(exclude + "."):
            continue
        found.setdefault(p, []).append(name)
    return found


def materialize(model: nn.Module, checkpoint: Checkpoint, params: dict, device="cpu") -> int:
    """Replace each meta parameter in ``params`` (``meta_parameters``) by the checkpoint's
    tensor under one of its names, in every module that holds it; returns the bytes read."""
    wanted = {}
    for p, names in params.items():
        stored = [n for n in names if n in checkpoint.where]
        wanted[p] = stored[0] if stored else names[0]
    tensors = checkpoint.read(list(wanted.values()))
    size = 0
    for p, names in params.items():
        t = tensors[wanted[p]]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(
                f"{wanted[p]}: the checkpoint holds shape {tuple(t.shape)}, the model "
                f"{tuple(p.shape)}"
            )
        new = nn.Parameter(t.to(device=device, dtype=p.dtype), requires_grad=p.requires_grad)
        for name in names:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._parameters[leaf] = new
        size += t.numel() * t.element_size()
    return size


def open_streamed(model: nn.Module, checkpoint, caller: str) -> Checkpoint | None:
    """The ``Checkpoint`` a meta-device ``model``'s weights are read from part by part, or
    ``None`` for a model that holds its weights; ``ValueError`` (naming ``caller``) for a
    meta model without a checkpoint, meta buffers, or a checkpoint given for a real model."""
    on_meta = any(p.device.type == "meta" for p in model.parameters())
    if on_meta and checkpoint is None:
        raise ValueError(
            f"{caller}: the model has parameters on the meta device; pass "
            "checkpoint='model.safetensors' (or its folder) to read each block's weights "
            "in its turn"
        )
    meta_buffers = [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if on_meta and meta_buffers:
        raise ValueError(
            f"{caller}: buffers such as {meta_buffers[0]!r} are on the meta device too, and "
            "a checkpoint does not hold them all; build the model under "
            "accelerate.init_empty_weights(), which leaves buffers real"
        )
    if not on_meta:
        if checkpoint is not None:
            raise ValueError(
                f"{caller}: checkpoint= is for a model built on the meta device; this one "
                "holds its weights (drop checkpoint=, or build it under "
                "accelerate.init_empty_weights())"
            )
        return None
    return Checkpoint(checkpoint)
