"""``qcompile.save`` / ``qcompile.load``: a quantized model as one safetensors file.

``save(model, path)`` writes what lowbit produced for ``model`` (compiled with
``backend="lowbit"`` and run at least once), for every recipe: the stored products
(``qcompile.artifacts``) keyed by the FQN of the parameter they belong to, each kind
laid out as ``qcompile.products`` defines (a quantized linear's site products; for the
DuQuant family also the transform plans and the folded constants of other parameters) —
and every other parameter and buffer in
full precision (embeddings, norms, sites left in full precision; a quantized weight
also used by another module, e.g. a tied embedding, is kept in full precision too).
Identical tensors (one plan under each of its linears) are written once. The
safetensors metadata holds a JSON plan (format and version, the model's class and
config, per parameter its shape, dtype, aliases and products: kind, recipe key,
outlier channels, bits, group size, method, the plans a folded weight was built with,
tensor names; ``plans``: per transform plan its members, fusion decisions, block
size and notes) and a SHA-256 of the plan and every tensor.

``load(path, model)`` applies the file to a freshly constructed model of the same
class and configuration (on the meta device, or with any fp weights): it
validates everything first (including each product's shapes, dtypes and value
ranges, and that every plan a product names is in the file) and raises ``ValueError``
naming the problem without touching the model; then it sets the full-precision
tensors, makes each
quantized linear's weight a zero-memory placeholder (as ``free_weights`` does:
eager calls of those layers raise) and registers the stored products under the new
parameters, so ``torch.compile(model, backend="lowbit", options=<same recipe>)``
reproduces the saved model's outputs bit for bit without calibrating.

Invariant: ``save`` writes and ``load`` registers exactly the products
``qcompile.artifacts`` holds, each as its ``qcompile.products`` layout; ``load`` changes
the model only after ``qcompile.file_read`` accepted the whole file. The format itself:
``qcompile.file_format``.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from . import artifacts, release, safetensors_writer
from .file_format import (
    DTYPES,
    FOLDER_CONFIG,
    FORMAT,
    NO_GROUP,
    READABLE_VERSIONS,
    VERSION,
    WEIGHTS_NAME,
    ParamGroup,
    config_dict,
    digest,
    dtype_name,
    json_safe,
    param_groups,
    unique_groups,
    unwrap,
    weights_file,
)
from .file_read import _read, _validate, read, read_plan
from .lowering import derived

__all__ = [
    "FOLDER_CONFIG",
    "FORMAT",
    "READABLE_VERSIONS",
    "VERSION",
    "WEIGHTS_NAME",
    "DTYPES",
    "digest",
    "unwrap",
    "load",
    "read",
    "read_plan",
    "save",
    "weights_file",
]

# save -------------------------------------------------------------------------------


def _plans_of(art: artifacts.Artifact) -> list[str]:
    """The transform plan ids a product was built with."""
    if art.kind == "site":
        ids = [art.meta.get("plan"), *(art.meta.get("row_plans") or [])]
    elif art.kind == "folded":
        ids = list(art.key.get("plans") or [])
    else:
        ids = [art.meta.get("id")]
    return [i for i in ids if i not in (None, NO_GROUP)]


def _latest(arts) -> list[artifacts.Artifact]:
    """Per site FQN, the most recently used of ``arts``."""
    latest: dict[str, artifacts.Artifact] = {}
    for art in arts:
        for fqn, used in art.sites.items():
            if fqn not in latest or latest[fqn].sites[fqn] < used:
                latest[fqn] = art
    out = []
    for art in latest.values():
        if not any(a is art for a in out):
            out.append(art)
    return out


def _used_artifacts(groups: list[ParamGroup]) -> dict[int, list[artifacts.Artifact]]:
    """Per group (``id``), the products the model uses now: per linear site the most
    recently used product that replaced or folded its weight, the transform plans those
    were built with (under every linear that holds them), and per other parameter the
    most recently used folded copy whose plans are saved. Older products (another recipe
    or options compiled before) are left out."""
    params = [g for g in groups if g.kind == "parameter"]
    every = {id(g): artifacts.artifacts_of(g.tensor) for g in params}
    weights = {
        gid: _latest(a for a in arts if a.kind == "site" or a.key.get("of") == "weight")
        for gid, arts in every.items()
    }
    named = {i for arts in weights.values() for a in arts for i in _plans_of(a)}
    out: dict[int, list[artifacts.Artifact]] = {id(g): [] for g in groups}
    held: set[str] = set()
    for g in params:
        arts = every[id(g)]
        plans = [a for a in arts if a.kind == "plan" and a.meta.get("id") in named]
        held.update(a.meta["id"] for a in plans)
        others = _latest(
            a
            for a in arts
            if a.kind == "folded" and a.key.get("of") != "weight" and set(_plans_of(a)) <= named
        )
        out[id(g)] = [*weights[id(g)], *plans, *others]
    missing = named - held
    if missing:
        raise ValueError(
            f"lowbit.save: the stored products name transform plan(s) {sorted(missing)} that "
            "lowbit no longer holds; compile and run the model again before saving"
        )
    return out


def save(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Write lowbit's products for ``model`` and its other weights to ``path``.

    ``model``: compiled with ``backend="lowbit"`` (``torch.compile(model)`` or
    ``model.compile(...)``) and run at least once. ``ValueError`` when lowbit has
    quantized nothing of it, or a quantized weight changed since it was compiled.
    """
    model = unwrap(model)
    tensors: dict[str, torch.Tensor] = {}
    fp_plan: dict[str, dict] = {}
    q_plan: dict[str, dict] = {}
    plans: dict[str, dict] = {}
    written: dict[tuple, str] = {}  # (dtype, shape, sha256) -> name: equal tensors once

    def put(name: str, t: torch.Tensor, share: bool = False) -> str:
        """``share``: a product (read-only), written once however often it occurs."""
        t = t.detach().cpu()
        same = None
        if share:
            h = hashlib.sha256()
            for piece in safetensors_writer.tensor_bytes(t):
                h.update(piece.numpy().data)
            same = (str(t.dtype), tuple(t.shape), h.hexdigest())
            if same in written:
                return written[same]
        tensors[name] = t  # written as it is (views, shared or mapped memory included)
        if same is not None:
            written[same] = name
        return name

    unique = unique_groups(param_groups(model))
    used = _used_artifacts(unique)
    for g in unique:
        entry = {
            "kind": g.kind,
            "shape": list(g.tensor.shape),
            "dtype": dtype_name(g.tensor.dtype),
            "aliases": g.aliases,
        }
        if g.kind == "parameter":
            entry["requires_grad"] = g.tensor.requires_grad
        else:
            entry["persistent"] = g.persistent
        if g.tensor.device.type == "meta":
            raise ValueError(f"lowbit.save: {g.name} is on the meta device (not loaded)")
        arts = used[id(g)]
        freed = artifacts.is_freed(g.tensor)
        for art in arts:
            if not freed and art.fingerprint != artifacts.fingerprint(g.tensor):
                raise ValueError(
                    f"lowbit.save: {g.name} changed after lowbit quantized it; compile and run "
                    "the model again before saving"
                )
        if not arts:
            if freed:
                raise ValueError(
                    f"lowbit.save: the weight {g.name} was released and lowbit holds no products "
                    "for it"
                )
            fp_plan[g.name] = {**entry, "tensor": put(f"fp/{g.name}", g.tensor)}
            continue
        keep_fp = (
            not g.linear_only
            or any(a.fp_needed for a in arts)
            or not any(a.kind == "site" for a in arts)  # only folded copies of it are stored
            or (g.experts and not release.covers_experts(g.tensor))
        )
        if keep_fp and freed:  # pragma: no cover - free_weights only releases linear-only
            raise ValueError(f"lowbit.save: {g.name} was released but is not linear-only")
        for art in arts:
            if art.kind == "plan":
                plans.setdefault(art.meta["id"], _plan_summary(art))
        entry["keep_fp"] = keep_fp
        entry["tensor"] = put(f"fp/{g.name}", g.tensor) if keep_fp else None
        entry["artifacts"] = [
            {
                "key": art.key,
                "meta": json_safe(art.meta),
                "sites": sorted(art.sites),
                "tensors": {
                    role: put(f"q/{g.name}/{i}/{role}", t, share=True)
                    for role, t in sorted(derived.products(art).items())
                },
            }
            for i, art in enumerate(arts)
        ]
        q_plan[g.name] = entry
    if not q_plan:
        raise ValueError(
            f"lowbit.save: lowbit has quantized none of this {type(model).__name__}'s weights; "
            "compile it with torch.compile(model, backend='lowbit', options=...) and run it "
            "once before saving"
        )
    recipes = sorted(
        {
            a["key"]["scheme"]
            for e in q_plan.values()
            for a in e["artifacts"]
            if a["key"].get("kind", "site") == "site"
        }
    )
    plan = {
        "format": FORMAT,
        "version": VERSION,
        "model_class": type(model).__name__,
        "config": config_dict(model),
        "recipes": recipes,
        "fp": fp_plan,
        "quantized": q_plan,
        "plans": plans,
        "tensors": {
            n: {"shape": list(t.shape), "dtype": dtype_name(t.dtype)} for n, t in tensors.items()
        },
        "data_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    }
    plan_json = json.dumps(plan, sort_keys=True)
    metadata = {"lowbit": plan_json, "lowbit_sha256": digest(plan_json, tensors)}
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        safetensors_writer.write(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _plan_summary(art: artifacts.Artifact) -> dict:
    """A transform plan as the file's ``plans`` section lists it (readable, not used)."""
    m = json_safe(art.meta)
    keys = ("transform", "members", "in_features", "block_size", "smooth_into", "perm_into")
    out = {k: m.get(k) for k in keys}
    out["duquant"] = art.key.get("duquant")
    out["act_dtype"] = art.key.get("act_dtype")
    out["notes"] = m.get("notes")
    out["online_reason"] = m.get("online_reason")
    return out


def _model_device(model) -> torch.device:
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def _assign(g: ParamGroup, value: torch.Tensor) -> torch.Tensor:
    if g.kind == "parameter":
        value = torch.nn.Parameter(value, requires_grad=g.tensor.requires_grad)
    for _, mod, attr in g.owners:
        (mod._parameters if g.kind == "parameter" else mod._buffers)[attr] = value
    return value


def load(path: str | os.PathLike, model: torch.nn.Module, *, device=None) -> torch.nn.Module:
    """Apply a file written by ``qcompile.save`` to ``model`` and return ``model``.

    ``model``: a freshly constructed model of the saved class and configuration,
    e.g. ``with torch.device("meta"): model = LlamaForCausalLM(config)``, or one with
    (any) full-precision weights, which the file's replace. ``device``: where the
    tensors go (default: the model's, or CPU for a meta model). Everything is
    checked before the model is touched: a missing, truncated or corrupt file, another
    format version, another model class, a parameter the model lacks or has with
    another shape or dtype are a ``ValueError`` and leave the model as it was.
    """
    path = os.fspath(path)
    plan, tensors = _read(path)
    root = unwrap(model)
    groups = param_groups(root)
    _validate(path, plan, tensors, root, groups)
    device = torch.device(device) if device is not None else _model_device(root)
    moved: dict[str, torch.Tensor] = {}

    def tensor(name: str) -> torch.Tensor:  # one copy of a tensor the file shares
        if name not in moved:
            moved[name] = tensors[name].to(device)
        return moved[name]

    for name, e in plan["fp"].items():
        _assign(groups[name], tensors[e["tensor"]].to(device))
    for name, e in plan["quantized"].items():
        g = groups[name]
        if e["keep_fp"]:
            param = _assign(g, tensors[e["tensor"]].to(device))
        else:
            param = _assign(g, artifacts.placeholder(e["shape"], g.tensor.dtype, device))
            for mod_name, mod, _ in g.owners:
                release.guard_eager_calls(mod, mod_name)
        for spec in e["artifacts"]:
            art = artifacts.Artifact(
                key=spec["key"],
                tensors={role: tensor(t) for role, t in spec["tensors"].items()},
                meta=dict(spec["meta"]),
                fingerprint=artifacts.fingerprint(param),
                pinned=True,
                released=not e["keep_fp"],
                fp_needed=e["keep_fp"],
            )
            for fqn in spec["sites"]:
                art.touch(fqn)
            artifacts.register(param, art)
    return model
