"""split_mixed_mm: LLM.int8()'s mixed-precision decomposition of a linear.

Precondition: ``detect_outliers`` ran.
Rewrite (static mode, per site with outlier channels O and inliers I):

    y = linear(x, W, b)
 -> y = linear(x, W_I, b) + linear(index_select(x, -1, O), W[:, O])

where ``W_I`` is ``W`` with the outlier columns zeroed. The first linear is the
site's new node (``meta[SITE]``) and will be quantized; it carries
``meta[INLIER_MASK]`` (the constant node of the bool mask over K) and
``meta[OUTLIER_PARTIAL]`` / ``meta[SPLIT_SUM]`` (the
full-precision partial and the add). The second stays in full precision.
Sites that read one input with the same outlier columns (q/k/v, gate/up) share the
``index_select``, the mask (so their quantizations are one) and one full-precision GEMM
over their stacked outlier weights, each reading its ``narrow`` slice as its partial.
Numerical contract: exact in real arithmetic (float rounding of one extra add).
When the site's products are stored (``qcompile.artifacts``: same weight, recipe,
options and outlier columns, or a released weight), the stored index, mask and
outlier columns are reused, the inlier weight constant is a zero-memory
placeholder and ``quantize_weights`` uses the stored int8 weight; otherwise the
pass leaves its tensors in ``site.products`` for ``quantize_weights`` to store.
Dynamic mode: no rewrite; the site is marked ``meta[DYNAMIC_THRESHOLD]``
and ``quantize_weights`` emits the run-time split op.
Returns the number of sites split (or marked dynamic).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from qcompile import artifacts
from qcompile.context import LinearSite, PassContext
from qcompile.graph_utils import (
    DYNAMIC_THRESHOLD,
    INLIER_MASK,
    OUTLIER_PARTIAL,
    OUTLIERS,
    SITE,
    SPLIT_SUM,
    WEIGHT_NODE,
    add_constant,
)
from qcompile.products import Int8Site
from qcompile.recipes import INT8_MIXED


def split_mixed_mm(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    groups: dict[tuple, list[_Split]] = {}  # (input node, outlier columns) -> its sites
    for site in ctx.sites_of(INT8_MIXED):
        if ctx.options.outlier_mode == "dynamic":
            site.node.meta[DYNAMIC_THRESHOLD] = ctx.options.threshold
            rewrites += 1
        elif site.outlier_channels:
            split = _products(site, ctx)
            groups.setdefault((split.x, tuple(site.outlier_channels)), []).append(split)
    for splits in groups.values():
        _rewrite_group(gm, splits)
        rewrites += len(splits)
    gm.recompile()
    return rewrites


@dataclass
class _Split:
    site: LinearSite
    x: fx.Node
    bias: fx.Node | None
    cols: torch.Tensor
    inlier_mask: torch.Tensor
    w_outlier: torch.Tensor
    w_inlier: torch.Tensor


def _products(site: LinearSite, ctx: PassContext) -> _Split:
    """The site's outlier index, inlier mask and weight halves (stored ones if any)."""
    node = site.node
    x, bias = node.args[0], node.args[2] if len(node.args) > 2 else None
    w = site.weight.detach()
    art = site.artifact or artifacts.lookup(site, ctx, deps=list(site.outlier_channels))
    if art is not None:  # stored products: nothing is computed from the weight
        site.artifact = art
        stored = Int8Site.from_tensors(art.tensors)
        return _Split(
            site,
            x,
            bias,
            stored.outlier_idx,
            stored.inlier_mask,
            stored.w_outlier,
            artifacts.placeholder(w.shape, w.dtype, w.device),
        )  # fmt: skip  (the inlier weight: its int8 form is stored)
    cols = torch.tensor(site.outlier_channels, dtype=torch.long, device=w.device)
    inlier_mask = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
    inlier_mask[cols] = False
    w_inlier = w.clone()
    w_inlier[:, cols] = 0
    w_outlier = w[:, cols].contiguous()
    site.products = {"outlier_idx": cols, "inlier_mask": inlier_mask, "w_outlier": w_outlier}
    return _Split(site, x, bias, cols, inlier_mask, w_outlier, w_inlier)


def _rewrite_group(gm: fx.GraphModule, splits: list[_Split]) -> None:
    """Split the linears of one input that share their outlier columns: one gather, one
    mask and one full-precision GEMM for all of them (their outlier weights stacked),
    each taking its slice of the partial product."""
    g, first = gm.graph, splits[0]
    head = first.site.node
    tag = f"lowbit_{first.site.fqn}"
    idx_node = add_constant(gm, f"{tag}_outlier_idx", first.cols, head)
    mask_node = add_constant(gm, f"{tag}_inlier_mask", first.inlier_mask, head)
    stacked = torch.cat([s.w_outlier for s in splits]) if len(splits) > 1 else first.w_outlier
    w_out_node = add_constant(gm, f"{tag}_w_outlier", stacked, head)
    with g.inserting_before(head):
        x_out = g.call_function(torch.index_select, (first.x, -1, idx_node))
        partials = g.call_function(torch._C._nn.linear, (x_out, w_out_node))
    for n in (x_out, partials):
        n.meta["nn_module_stack"] = head.meta.get("nn_module_stack", {})
    offset = 0
    for split in splits:
        site, node = split.site, split.site.node
        n_out = split.w_outlier.shape[0]
        w_in_node = add_constant(gm, f"lowbit_{site.fqn}_w_inlier", split.w_inlier, node)
        with g.inserting_before(node):
            partial = partials
            if len(splits) > 1:
                partial = g.call_function(torch.narrow, (partials, -1, offset, n_out))
            y_in = g.call_function(torch._C._nn.linear, (split.x, w_in_node, split.bias))
            y = g.call_function(operator.add, (y_in, partial))
        offset += n_out
        for n in (partial, y_in, y):  # same shape and dtype as the original output
            n.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
            n.meta["example_value"] = node.meta.get("example_value")
        y_in.meta.update(
            {
                SITE: site.fqn,
                OUTLIERS: list(site.outlier_channels),
                INLIER_MASK: mask_node,
                OUTLIER_PARTIAL: partial,
                SPLIT_SUM: y,
                WEIGHT_NODE: w_in_node,
            }
        )
        node.replace_all_uses_with(y)
        g.erase_node(node)
        site.node = y_in
