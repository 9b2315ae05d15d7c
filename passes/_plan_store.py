"""Storing and applying transform plans (not a pass): what ``rotate``, ``smooth`` and
``quantize_lowbit`` read from and write to ``qcompile.artifacts`` once ``resolve``
(``passes/_plans.py``) has decided, per input group, what is reused.

Invariant: a plan is stored under every low-bit member's weight with one id (a digest
of its tensors and meta), and a site's products name the plans folded into its weight
(``meta["plan"]``, ``meta["row_plans"]``), so a reused site is never paired with a
plan other than the one its weight was folded with.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import fx

from qcompile import artifacts
from qcompile.context import LinearSite, PassContext
from qcompile.graph_utils import WEIGHT_NODE, add_constant
from qcompile.products import NO_GROUP, ONLINE_ROLES, FoldedCopy, TransformPlan

from ._plans import (
    folded_key,
    holds_plan,
    involved,
    own_plan_id,
    plan_deps,
    plan_key,
    row_plan_ids,
)


def stored_smooth(g) -> torch.Tensor | None:
    return TransformPlan.from_tensors(g.stored.tensors).smooth if g.stored is not None else None


def folded_norm(g, param: torch.Tensor, fqn: str, s: torch.Tensor):
    """The norm weight ``param / s`` of a stored plan: stored, or recomputed from the norm
    (never released) and the stored float64 ``s``; None for a plan computed now."""
    if g.stored is None:
        return None
    key = folded_key(param, "norm", [g.plan_id], param.dtype)
    art = artifacts.find(param, key)
    if art is not None and art.fingerprint == artifacts.fingerprint(param):
        art.touch(fqn)
        return FoldedCopy.from_tensors(art.tensors).value
    value = (param.detach().to(torch.float64) / s).to(param.dtype)
    artifacts.store_for(param, key, fqn, FoldedCopy(value), {"plan": g.plan_id})
    return value


# rotate -------------------------------------------------------------------------------


def stored_plan(g, plan_cls):
    """The stored plan of ``g`` as a ``rotate.Plan`` whose operands are the graph's (in the
    activation dtype, an online smoothing merged in), or None."""
    if g.stored is None:
        return None
    t = TransformPlan.from_tensors(g.stored.tensors)
    r2 = (t.r2, t.r2_tail)
    return plan_cls(
        r1=(t.r1, t.r1_tail),
        pre_perm=t.pre_perm,
        perm=t.perm,
        r2=r2 if any(x is not None for x in r2) else None,
        notes=list(g.stored.meta.get("notes", [])),
    )


def remember(gm: fx.GraphModule, ctx: PassContext, g, plan) -> None:
    """After rotate applied ``plan`` to ``g``: store a plan computed now (under every
    low-bit member's weight), or restore a stored one's report fields."""
    if g.stored is not None:
        meta = g.stored.meta
        for site in g.sites:
            site.transforms = list(meta.get("transforms", site.transforms))
            site.act_absmax_before = meta.get("act_absmax_before")
            site.act_absmax_after = meta.get("act_absmax_after")
        return
    holders = [s for s in g.sites if holds_plan(s)]
    if not holders:
        return
    online = {}
    for role, arg in zip(ONLINE_ROLES, g.input.args[1:]):
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            online[role] = getattr(gm, arg.target)
    stored = TransformPlan(
        **online,
        pre_perm=plan.pre_perm.to(torch.int64) if plan.pre_perm is not None else None,
        smooth=g.smooth_scale.to(torch.float64) if g.smooth_scale is not None else None,
    )
    tensors = stored.tensors()
    first = g.sites[0]
    meta = {
        "transform": g.transform,
        "members": [s.fqn for s in g.sites],
        "in_features": g.in_features,
        "block_size": stored.block_size,
        "notes": list(plan.notes),
        "transforms": list(first.transforms),
        "smooth_into": _describe_into(g, ctx),
        "perm_into": [s.fqn for s in g.perm_into or []],
        "online_reason": g.online_reason,
        "act_absmax_before": first.act_absmax_before,
        "act_absmax_after": first.act_absmax_after,
    }
    meta["id"] = plan_id(tensors, meta)
    g.plan_id = meta["id"]
    deps = plan_deps(g, ctx)
    for s in holders:
        artifacts.store_for(s.param, plan_key(g, ctx, s), s.fqn, stored, meta, deps)
    if g.norm_fold is not None:  # the norm weight divided by s, as the graph reads it
        param, fqn, const = g.norm_fold
        key = folded_key(param, "norm", [g.plan_id], param.dtype)
        value = getattr(gm, const.target)
        artifacts.store_for(param, key, fqn, FoldedCopy(value), {"plan": g.plan_id})


def _describe_into(g, ctx: PassContext) -> str:
    if g.scale_into is None:
        return "online"
    if g.scale_into[0] == "norm":
        if g.norm_fold is not None:
            return "norm:" + g.norm_fold[1]
        mul, i = g.scale_into[1], g.scale_into[2]
        return "norm:" + ctx.param_fqns.get(mul.args[i].name, mul.args[i].name)
    return "rows:" + g.scale_into[1].fqn


def plan_id(tensors: dict, meta: dict) -> str:
    """A digest of a plan's tensors and description (equal plans, equal ids)."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for role in sorted(tensors):
        t = tensors[role].detach().cpu().contiguous()
        h.update(f"\0{role}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def finish_rotate(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Folded weights of the linears that are not low-bit quantized (an fp or int8 layer
    sharing a transformed input, a producer): install the stored ones, store new ones."""
    state = ctx.plans
    if state is None:
        return
    for site in ctx.sites:
        if holds_plan(site) or not involved(ctx, site) or site.skip_reason:
            continue
        art = state.folded.get(id(site))
        if art is not None:
            node = site.node
            value = FoldedCopy.from_tensors(art.tensors).value
            const = add_constant(gm, f"lowbit_{site.fqn}_folded", value, node)
            node.args = (node.args[0], const, *node.args[2:])
            node.meta[WEIGHT_NODE] = const
            site.weight = getattr(gm, const.target)
            art.touch(site.fqn)
            continue
        if site.unfolded or not isinstance(site.param, torch.nn.Parameter):
            continue
        rows, own = row_plan_ids(ctx, site), own_plan_id(site)
        if rows is None or own is None:
            continue
        key = folded_key(
            site.param, "weight", [own, *rows], site.weight.dtype, site.layout, site.expert
        )
        artifacts.store_for(site.param, key, site.fqn, FoldedCopy(site.weight, "weight"), {})


# quantize_lowbit ------------------------------------------------------------------------


def site_products(site: LinearSite, ctx: PassContext):
    """The stored products ``quantize_lowbit`` uses for ``site``, or None (compute)."""
    if site.artifact is not None and involved(ctx, site):
        return site.artifact  # matched its plans in resolve
    if involved(ctx, site):
        return None
    art = site.artifact or artifacts.lookup(site, ctx)
    if art is not None and (
        art.meta.get("plan") not in (None, NO_GROUP) or art.meta.get("row_plans")
    ):
        if artifacts.is_freed(site.param) or site.artifact is not None:
            raise ValueError(
                f"lowbit: the stored products of {site.fqn} were built with transforms folded "
                "into it that this compile does not apply (other recipes for the layers "
                "around it); compile with the recipes and options it was quantized with"
            )
        return None
    return art


def store_site(site: LinearSite, ctx: PassContext, tensors: dict, meta: dict) -> None:
    if not artifacts.tracked(site):
        return
    rows = row_plan_ids(ctx, site)
    own = own_plan_id(site)
    if rows is None or own is None:
        return  # a plan it depends on was not stored
    meta = {**meta, "plan": None if own == NO_GROUP else own, "row_plans": rows}
    artifacts.store_for(site.param, artifacts.site_key(site, ctx), site.fqn, tensors, meta)
