"""``qcompile.save`` / ``qcompile.load``: a quantized model as one safetensors file.

``save(model, path)`` writes what lowbit produced for ``model`` (compiled with
``backend="lowbit"`` and run at least once), for every recipe: the stored products
(``qcompile.artifacts``) keyed by the FQN of the parameter they belong to — per
quantized linear weight its int8 weights and scales and outlier columns, or packed
codes, scales and zero points, or low-bit ``w_q`` / ``w_scale`` and clip ratios; for
the DuQuant family also the transform plans (online rotation blocks, permutations,
smoothing scales) and the constants folded in place of other parameters (an RMSNorm
weight divided by the smoothing scales) — and every other parameter and buffer in
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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import artifacts, memory, safetensors_writer
from .matmul_modules import is_expert_tensor, is_matmul_module
from .recipes import RECIPES

FORMAT = "lowbit.model"
VERSION = 2  # 2: the DuQuant family's "plan" and "folded" products (1: site products only)
READABLE_VERSIONS = (1, 2)
WEIGHTS_NAME = "lowbit.safetensors"  # the lowbit file inside a model folder
FOLDER_CONFIG = "lowbit_config.json"  # a model folder's compile options and source
NO_GROUP = "-"  # passes/_plans.py: a row_plans / folded key entry for "no input transform"
_DTYPES = {
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
class _Group:
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


def _unwrap(model):
    while isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        model = model._orig_mod  # torch.compile(model) -> OptimizedModule
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"lowbit: expected an nn.Module, got {type(model).__name__}")
    return model


def _groups(model: torch.nn.Module) -> dict[str, _Group]:
    """Alias name -> group, for every parameter and buffer (tied ones share a group)."""
    by_id: dict[int, _Group] = {}
    by_name: dict[str, _Group] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for kind, table in (("parameter", mod._parameters), ("buffer", mod._buffers)):
            for attr, t in table.items():
                if t is None:
                    continue
                name = f"{mod_name}.{attr}" if mod_name else attr
                g = by_id.get(id(t))
                if g is None:
                    g = by_id[id(t)] = _Group(name, kind, t)
                    if kind == "buffer":
                        g.persistent = attr not in mod._non_persistent_buffers_set
                if name not in g.aliases:
                    g.aliases.append(name)
                if not any(m is mod and a == attr for _, m, a in g.owners):
                    g.owners.append((mod_name, mod, attr))
                by_name[name] = g
    return by_name


def _unique(groups: dict[str, _Group]) -> list[_Group]:
    seen, out = set(), []
    for g in groups.values():
        if id(g) not in seen:
            seen.add(id(g))
            out.append(g)
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _config_dict(model) -> dict | None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    return json.loads(json.dumps(config.to_dict(), default=str))


def _digest(plan_json: str, tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(plan_json.encode())
    ranges = memory.file_mapped_ranges()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{_dtype_name(t.dtype)}\0{tuple(t.shape)}\0".encode())
        for piece in safetensors_writer.tensor_bytes(t, ranges):  # in place, no copy
            h.update(piece.numpy().data)
    return h.hexdigest()


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


def _used_artifacts(groups: list[_Group]) -> dict[int, list[artifacts.Artifact]]:
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
    model = _unwrap(model)
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

    unique = _unique(_groups(model))
    used = _used_artifacts(unique)
    for g in unique:
        entry = {
            "kind": g.kind,
            "shape": list(g.tensor.shape),
            "dtype": _dtype_name(g.tensor.dtype),
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
            or (g.experts and not artifacts.covers_experts(g.tensor))
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
                "meta": _clean(art.meta),
                "sites": sorted(art.sites),
                "tensors": {
                    role: put(f"q/{g.name}/{i}/{role}", t, share=True)
                    for role, t in sorted(artifacts.products(art).items())
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
        "config": _config_dict(model),
        "recipes": recipes,
        "fp": fp_plan,
        "quantized": q_plan,
        "plans": plans,
        "tensors": {
            n: {"shape": list(t.shape), "dtype": _dtype_name(t.dtype)} for n, t in tensors.items()
        },
        "data_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
    }
    plan_json = json.dumps(plan, sort_keys=True)
    metadata = {"lowbit": plan_json, "lowbit_sha256": _digest(plan_json, tensors)}
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        safetensors_writer.write(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def weights_file(path: str | os.PathLike) -> str:
    """The lowbit file of ``path``: the path itself, or a model folder's ``WEIGHTS_NAME``."""
    path = os.fspath(path)
    return os.path.join(path, WEIGHTS_NAME) if os.path.isdir(path) else path


def read(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The plan (JSON) and tensors of a lowbit file or model folder, checksum verified."""
    return _read(weights_file(path))


def read_plan(path: str | os.PathLike) -> dict:
    """The plan of a lowbit file or model folder, from the file's header (no tensor read;
    ``load`` verifies the rest)."""
    return _read_header(weights_file(path))[0]


def _plan_summary(art: artifacts.Artifact) -> dict:
    """A transform plan as the file's ``plans`` section lists it (readable, not used)."""
    m = _clean(art.meta)
    keys = ("transform", "members", "in_features", "block_size", "smooth_into", "perm_into")
    out = {k: m.get(k) for k in keys}
    out["duquant"] = art.key.get("duquant")
    out["act_dtype"] = art.key.get("act_dtype")
    out["notes"] = m.get("notes")
    out["online_reason"] = m.get("online_reason")
    return out


# load -------------------------------------------------------------------------------


def _bad(path: str, what: str) -> ValueError:
    return ValueError(f"lowbit.load: {path!r}: {what}")


def _read_header(path: str) -> tuple[dict, dict, int]:
    """The plan, the safetensors metadata and the data size of a lowbit model file, from
    its header alone (sizes, format, version and plan sections checked)."""
    if not os.path.isfile(path):
        raise _bad(path, "no such file")
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _bad(path, f"truncated ({size} bytes): not a safetensors file")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise _bad(path, f"truncated: the header needs {n} bytes, the file has {size - 8}")
            header = json.loads(f.read(n))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"] or [0]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, ValueError) and str(e).startswith("lowbit.load"):
            raise
        raise _bad(path, f"corrupt safetensors header ({e})") from None
    expected = 8 + n + max(ends)
    if size < expected:
        raise _bad(path, f"truncated: {size} bytes, the header describes {expected}")
    if size > expected:
        raise _bad(path, f"corrupt: {size - expected} unexpected bytes after the tensor data")
    meta = header.get("__metadata__") or {}
    if "lowbit" not in meta or "lowbit_sha256" not in meta:
        raise _bad(
            path, "not a lowbit model file (no lowbit metadata; write it with qcompile.save)"
        )
    try:
        plan = json.loads(meta["lowbit"])
    except json.JSONDecodeError as e:
        raise _bad(path, f"corrupt plan metadata ({e})") from None
    if not isinstance(plan, dict) or plan.get("format") != FORMAT:
        raise _bad(path, f"not a lowbit model file (format {plan.get('format')!r})")
    if plan.get("version") not in READABLE_VERSIONS:
        raise _bad(
            path,
            f"format version {plan.get('version')!r} is not supported (this reads "
            f"{', '.join(map(str, READABLE_VERSIONS))})",
        )
    try:
        for section in ("fp", "quantized"):
            if not isinstance(plan[section], dict):
                raise _bad(path, f"bad plan section {section!r}")
        if not isinstance(plan.setdefault("plans", {}), dict):
            raise _bad(path, "bad plan section 'plans'")
    except (KeyError, TypeError) as e:
        raise _bad(path, f"incomplete plan (missing {e})") from None
    return plan, meta, max(ends)


def _read(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """The plan and tensors of a lowbit model file; ``ValueError`` for anything wrong."""
    plan, meta, data_bytes = _read_header(path)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise _bad(path, f"cannot read the tensors ({e})") from None
    if _digest(meta["lowbit"], tensors) != meta["lowbit_sha256"]:
        raise _bad(path, "checksum mismatch: the file is corrupt")
    try:
        listed = plan["tensors"]
        if set(listed) != set(tensors) or plan["data_bytes"] != data_bytes:
            raise _bad(path, "the plan does not describe the file's tensors")
        for name, spec in listed.items():
            t = tensors[name]
            if list(t.shape) != spec["shape"] or _dtype_name(t.dtype) != spec["dtype"]:
                raise _bad(path, f"tensor {name} does not match the plan")
    except (KeyError, TypeError) as e:
        raise _bad(path, f"incomplete plan (missing {e})") from None
    return plan, tensors


_VOLATILE_CONFIG = (
    "_name_or_path",
    "transformers_version",
    "architectures",
    "dtype",
    "torch_dtype",
)


def _config_hint(plan: dict, model) -> str:
    """`` (config differs: hidden_size 32 in the file, 48 in the model)`` or ``''``."""
    saved, now = plan.get("config"), _config_dict(model)
    if not isinstance(saved, dict) or now is None:
        return ""
    diff = [
        f"{k} {saved.get(k)!r} in the file, {now.get(k)!r} in the model"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k) and k not in _VOLATILE_CONFIG and not k.startswith("_")
    ]
    return f" (config differs: {'; '.join(diff[:4])})" if diff else ""


def _validate(path: str, plan: dict, tensors: dict, model, groups: dict[str, _Group]) -> None:
    cls = type(model).__name__
    if plan.get("model_class") != cls:
        raise _bad(path, f"written for a {plan.get('model_class')}, not this {cls}")
    try:
        _check_entries(path, plan, tensors, groups)
    except ValueError as e:
        raise ValueError(str(e) + _config_hint(plan, model)) from None


def _check_entries(path: str, plan: dict, tensors: dict, groups: dict[str, _Group]) -> None:
    covered: set[int] = set()
    found_plans: dict[str, tuple] = {}  # plan id -> (tensor names, first holder)
    named_plans: dict[str, str] = {}  # plan id -> a product that names it
    for section in ("fp", "quantized"):
        for name, e in plan[section].items():
            try:
                kind, shape, dtype, aliases = e["kind"], e["shape"], e["dtype"], e["aliases"]
            except KeyError as err:
                raise _bad(path, f"incomplete plan entry for {name} (missing {err})") from None
            g = groups.get(name)
            if g is None:
                raise _bad(path, f"the model has no {kind} {name} (another architecture?)")
            if g.kind != kind:
                raise _bad(path, f"{name} is a {g.kind} of the model, the file has a {kind}")
            if sorted(g.aliases) != sorted(aliases):
                raise _bad(
                    path,
                    f"{name} is shared by {sorted(aliases)} in the file but by "
                    f"{sorted(g.aliases)} in the model (tied weights differ)",
                )
            if list(g.tensor.shape) != shape or _dtype_name(g.tensor.dtype) != dtype:
                raise _bad(
                    path,
                    f"{name} is {dtype}{shape} in the file but {_dtype_name(g.tensor.dtype)}"
                    f"{list(g.tensor.shape)} in the model (another configuration or dtype?)",
                )
            if id(g) in covered:
                raise _bad(path, f"{name} appears twice in the plan")
            covered.add(id(g))
            if e.get("tensor") is not None and e["tensor"] not in tensors:
                raise _bad(path, f"the tensor of {name} is missing")
            if section == "fp":
                continue
            if not e.get("keep_fp") and not g.linear_only:
                raise _bad(
                    path,
                    f"{name} is quantized in the file but not only an nn.Linear / Conv1D weight",
                )
            if e.get("keep_fp") and e.get("tensor") is None:
                raise _bad(path, f"the full-precision tensor of {name} is missing")
            for art in e.get("artifacts") or []:
                if art["key"].get("weight_shape") != shape or any(
                    t not in tensors for t in art["tensors"].values()
                ):
                    raise _bad(path, f"the products of {name} are incomplete or inconsistent")
            if not e.get("artifacts"):
                raise _bad(path, f"no products recorded for {name}")
            try:
                _check_products(path, name, e, tensors, found_plans, named_plans)
            except (KeyError, TypeError, AttributeError) as err:
                raise _bad(path, f"the products of {name} are malformed ({err!r})") from None
    _check_plan_references(path, plan, found_plans, named_plans)
    missing = [g.name for g in _unique(groups) if id(g) not in covered]
    if missing:
        raise _bad(
            path,
            f"the model has {len(missing)} parameter(s)/buffer(s) the file does not, e.g. "
            f"{missing[:3]} (another architecture or configuration?)",
        )


def _check_products(path, name, entry, tensors, found_plans, named_plans) -> None:
    """Shapes, dtypes and value ranges of one parameter's products (any recipe)."""
    for art in entry["artifacts"]:
        key, meta = art["key"], art["meta"]
        t = {role: tensors[n] for role, n in art["tensors"].items()}
        kind = key.get("kind", "site")
        if kind == "site":
            _check_site(path, name, artifacts.product_shape(key), key, meta, t)
            for i in [meta.get("plan"), *(meta.get("row_plans") or [])]:
                if i not in (None, NO_GROUP):
                    named_plans.setdefault(i, name)
        elif kind == "plan":
            _check_plan(path, name, artifacts.product_shape(key), key, t)
            pid = meta["id"]
            names = dict(sorted(art["tensors"].items()))
            if pid in found_plans and found_plans[pid][0] != names:
                raise _bad(
                    path,
                    f"the transform plan {pid} differs between {found_plans[pid][1]} and {name}",
                )
            found_plans.setdefault(pid, (names, name))
        elif kind == "folded":
            value = t.get("value", t.get("weight"))
            if (
                value is None
                or list(value.shape) != artifacts.product_shape(key)
                or (_dtype_name(value.dtype) != key["value_dtype"])
            ):
                raise _bad(path, f"the folded copy of {name} does not match its shape or dtype")
            _finite(path, name, "folded copy", value)
            for i in key["plans"]:
                if i != NO_GROUP:
                    named_plans.setdefault(i, name)
        else:
            raise _bad(path, f"unknown product kind {kind!r} for {name}")


def _finite(path, name, what, t: torch.Tensor) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise _bad(path, f"the {what} of {name} holds non-finite values")


def _check_site(path, name, shape, key, meta, t) -> None:
    recipe = RECIPES.get(key.get("scheme"))
    if recipe is None:
        raise _bad(path, f"{name} was quantized with an unknown recipe {key.get('scheme')!r}")
    if "w_q" in t or artifacts.low_bit(recipe):
        w_q, w_scale = t.get("w_q"), t.get("w_scale")
        if w_q is None or w_scale is None:
            raise _bad(path, f"the quantized weight or scales of {name} are missing")
        if w_q.dtype != torch.int8 or list(w_q.shape) != shape:
            raise _bad(
                path,
                f"the quantized weight of {name} is {_dtype_name(w_q.dtype)}"
                f"{list(w_q.shape)}, expected int8{shape}",
            )
        if list(w_scale.shape) != shape[:1]:
            raise _bad(path, f"the scales of {name} have shape {list(w_scale.shape)}")
        _finite(path, name, "scales", w_scale)
    if not artifacts.low_bit(recipe):
        return
    qmax = 2 ** (recipe.weight_bits - 1) - 1
    if meta.get("bits") != recipe.weight_bits or int(w_q.abs().max()) > qmax:
        raise _bad(path, f"the quantized weight of {name} is not {recipe.weight_bits}-bit")
    clip = t.get("clip_ratios")
    if clip is not None and (
        list(clip.shape) != shape[:1] or not bool(((clip > 0) & (clip <= 1)).all())
    ):
        raise _bad(path, f"the clip ratios of {name} are malformed")
    plan, rows = meta.get("plan"), meta.get("row_plans", [])
    if not (plan is None or isinstance(plan, str)) or not (
        isinstance(rows, list) and all(isinstance(r, str) for r in rows)
    ):
        raise _bad(path, f"the transform plans named by {name}'s products are malformed")


def _check_plan(path, name, shape, key, t) -> None:
    k = key["in_features"]
    if shape[-1] != k:
        raise _bad(path, f"the transform plan of {name} is for {k} input channels, not {shape[-1]}")
    for stage in ("r1", "r2"):
        blocks, tail = t.get(stage), t.get(f"{stage}_tail")
        if stage == "r2" and blocks is None and tail is None:
            continue
        size = 0
        if blocks is not None:
            if blocks.dim() != 3 or blocks.shape[1] != blocks.shape[2]:
                raise _bad(path, f"the {stage} blocks of {name}'s plan are not square")
            size += blocks.shape[0] * blocks.shape[1]
        if tail is not None:
            if tail.dim() != 2 or tail.shape[0] != tail.shape[1]:
                raise _bad(path, f"the {stage} remainder block of {name}'s plan is not square")
            size += tail.shape[0]
        if size != k:
            raise _bad(path, f"the {stage} blocks of {name}'s plan cover {size} of {k} channels")
        for m in (blocks, tail):
            if m is not None and _dtype_name(m.dtype) != key["act_dtype"]:
                raise _bad(path, f"the {stage} blocks of {name}'s plan are not {key['act_dtype']}")
            if m is not None:
                _finite(path, name, f"{stage} blocks", m)
    for role in ("perm", "pre_perm"):
        p = t.get(role)
        if p is not None and (
            p.dtype != torch.int64
            or list(p.shape) != [k]
            or not torch.equal(p.sort().values, torch.arange(k))
        ):
            raise _bad(path, f"the {role} of {name}'s plan is not a permutation of {k} channels")
    s = t.get("smooth")
    if s is not None and (
        s.dtype != torch.float64
        or list(s.shape) != [k]
        or not bool(torch.isfinite(s).all())
        or not bool((s > 0).all())
    ):
        raise _bad(path, f"the smoothing scales of {name}'s plan are malformed")


def _check_plan_references(path, plan, found_plans, named_plans) -> None:
    for pid, holder in named_plans.items():
        if pid not in found_plans:
            raise _bad(
                path,
                f"the products of {holder} name the transform plan {pid}, which the "
                "file does not hold",
            )
    if set(plan["plans"]) != set(found_plans):
        raise _bad(path, "the 'plans' section does not list the file's transform plans")


def _model_device(model) -> torch.device:
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def _assign(g: _Group, value: torch.Tensor) -> torch.Tensor:
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
    root = _unwrap(model)
    groups = _groups(root)
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
                artifacts.guard_eager_calls(mod, mod_name)
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
