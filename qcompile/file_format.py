"""The lowbit model file's format, shared by ``qcompile.serialize`` (writing, loading)
and ``qcompile.file_read`` (reading, validation).

Invariant: a file names every parameter and buffer by its first name in
``named_modules`` order (``param_groups``: tied ones are one group) and carries a SHA-256
(``digest``) of its JSON plan and of every tensor, computed the same way on both sides.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import torch

from . import memory, safetensors_writer
from .matmul_modules import is_expert_tensor, is_matmul_module
from .products import NO_GROUP, dtype_name

__all__ = ["NO_GROUP"]

FORMAT = "lowbit.model"
VERSION = 2  # 2: the DuQuant family's "plan" and "folded" products (1: site products only)
READABLE_VERSIONS = (1, 2)
WEIGHTS_NAME = "lowbit.safetensors"  # the lowbit file inside a model folder
FOLDER_CONFIG = "lowbit_config.json"  # a model folder's compile options and source
DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}


@dataclass
class ParamGroup:
    """One parameter or buffer of a model, with every name and module that holds it."""

    name: str  # first name in named_modules order
    kind: str  # "parameter" | "buffer"
    tensor: torch.Tensor
    aliases: list[str] = field(default_factory=list)
    owners: list[tuple[str, torch.nn.Module, str]] = field(default_factory=list)
    persistent: bool = True

    @property
    def linear_only(self) -> bool:
        # a tied embedding table reads the quantized codes (passes.quantize_embedding)
        if self.kind == "parameter" and self.experts:
            return True
        return (
            self.kind == "parameter"
            and any(is_matmul_module(mod) for _, mod, _ in self.owners)
            and all(
                (is_matmul_module(mod) or isinstance(mod, torch.nn.Embedding)) and attr == "weight"
                for _, mod, attr in self.owners
            )
        )

    @property
    def experts(self) -> bool:
        """A MoE expert tensor (one matrix per expert, each quantized on its own)."""
        return bool(self.owners) and all(
            is_expert_tensor(self.tensor, mod) for _, mod, _ in self.owners
        )


def unwrap(model):
    while isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        model = model._orig_mod  # torch.compile(model) -> OptimizedModule
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"lowbit: expected an nn.Module, got {type(model).__name__}")
    return model


def param_groups(model: torch.nn.Module) -> dict[str, ParamGroup]:
    """Alias name -> group, for every parameter and buffer (tied ones share a group)."""
    by_id: dict[int, ParamGroup] = {}
    by_name: dict[str, ParamGroup] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for kind, table in (("parameter", mod._parameters), ("buffer", mod._buffers)):
            for attr, t in table.items():
                if t is None:
                    continue
                name = f"{mod_name}.{attr}" if mod_name else attr
                g = by_id.get(id(t))
                if g is None:
                    g = by_id[id(t)] = ParamGroup(name, kind, t)
                    if kind == "buffer":
                        g.persistent = attr not in mod._non_persistent_buffers_set
                if name not in g.aliases:
                    g.aliases.append(name)
                if not any(m is mod and a == attr for _, m, a in g.owners):
                    g.owners.append((mod_name, mod, attr))
                by_name[name] = g
    return by_name


def unique_groups(groups: dict[str, ParamGroup]) -> list[ParamGroup]:
    seen, out = set(), []
    for g in groups.values():
        if id(g) not in seen:
            seen.add(id(g))
            out.append(g)
    return out


def json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


def config_dict(model) -> dict | None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    return json.loads(json.dumps(config.to_dict(), default=str))


def digest(plan_json: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(plan_json.encode())
    ranges = memory.file_mapped_ranges()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{dtype_name(t.dtype)}\0{tuple(t.shape)}\0".encode())
        for piece in safetensors_writer.tensor_bytes(t, ranges):  # in place, no copy
            h.update(piece.numpy().data)
    return h.hexdigest()


def weights_file(path: str | os.PathLike) -> str:
    """The lowbit file of ``path``: the path itself, or a model folder's ``WEIGHTS_NAME``."""
    path = os.fspath(path)
    return os.path.join(path, WEIGHTS_NAME) if os.path.isdir(path) else path
