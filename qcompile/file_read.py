"""Reading and validating a lowbit model file (``qcompile.read``, ``qcompile.load``).

Invariant: nothing here touches a model. A file is accepted only when its header, its
checksum, its plan and every product (``qcompile.products``: each kind's ``validate``)
check out against the model it is for; anything else is a ``ValueError`` naming the
file and the problem.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import artifacts, products
from .file_format import (
    FORMAT,
    NO_GROUP,
    READABLE_VERSIONS,
    ParamGroup,
    config_dict,
    digest,
    dtype_name,
    unique_groups,
    weights_file,
)
from .recipes import RECIPES


def read(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The plan (JSON) and tensors of a lowbit file or model folder, checksum verified."""
    return _read(weights_file(path))


def read_plan(path: str | os.PathLike) -> dict:
    """The plan of a lowbit file or model folder, from the file's header (no tensor read;
    ``load`` verifies the rest)."""
    return _read_header(weights_file(path))[0]


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
    if digest(meta["lowbit"], tensors) != meta["lowbit_sha256"]:
        raise _bad(path, "checksum mismatch: the file is corrupt")
    try:
        listed = plan["tensors"]
        if set(listed) != set(tensors) or plan["data_bytes"] != data_bytes:
            raise _bad(path, "the plan does not describe the file's tensors")
        for name, spec in listed.items():
            t = tensors[name]
            if list(t.shape) != spec["shape"] or dtype_name(t.dtype) != spec["dtype"]:
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
    saved, now = plan.get("config"), config_dict(model)
    if not isinstance(saved, dict) or now is None:
        return ""
    diff = [
        f"{k} {saved.get(k)!r} in the file, {now.get(k)!r} in the model"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k) and k not in _VOLATILE_CONFIG and not k.startswith("_")
    ]
    return f" (config differs: {'; '.join(diff[:4])})" if diff else ""


def _validate(path: str, plan: dict, tensors: dict, model, groups: dict[str, ParamGroup]) -> None:
    cls = type(model).__name__
    if plan.get("model_class") != cls:
        raise _bad(path, f"written for a {plan.get('model_class')}, not this {cls}")
    try:
        _check_entries(path, plan, tensors, groups)
    except ValueError as e:
        raise ValueError(str(e) + _config_hint(plan, model)) from None


def _check_entries(path: str, plan: dict, tensors: dict, groups: dict[str, ParamGroup]) -> None:
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
            if list(g.tensor.shape) != shape or dtype_name(g.tensor.dtype) != dtype:
                raise _bad(
                    path,
                    f"{name} is {dtype}{shape} in the file but {dtype_name(g.tensor.dtype)}"
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
    missing = [g.name for g in unique_groups(groups) if id(g) not in covered]
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
            try:
                folded = products.FoldedCopy.from_tensors(t)
                folded.validate(name, artifacts.product_shape(key), key["value_dtype"])
            except ValueError as e:
                raise _bad(path, str(e)) from None
            for i in key["plans"]:
                if i != NO_GROUP:
                    named_plans.setdefault(i, name)
        else:
            raise _bad(path, f"unknown product kind {kind!r} for {name}")


def _check_site(path, name, shape, key, meta, t) -> None:
    recipe = RECIPES.get(key.get("scheme"))
    if recipe is None:
        raise _bad(path, f"{name} was quantized with an unknown recipe {key.get('scheme')!r}")
    layout = products.site_layout(recipe)
    try:
        if layout is products.LowBitSite:
            layout.from_tensors(t).validate(name, shape, recipe.weight_bits, meta)
        else:
            layout.from_tensors(t).validate(name, shape)
    except ValueError as e:
        raise _bad(path, str(e)) from None


def _check_plan(path, name, shape, key, t) -> None:
    try:
        plan = products.TransformPlan.from_tensors(t)
        plan.validate(name, shape, key["in_features"], key.get("act_dtype"))
    except ValueError as e:
        raise _bad(path, str(e)) from None


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
