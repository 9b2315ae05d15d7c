"""split_mixed_mm: LLM.int8()'s mixed-precision decomposition of a linear.

Precondition: ``detect_outliers`` ran.
Rewrite (static mode, per site with outlier channels O and inliers I):

    y = linear(x, W, b)
 -> y = linear(x, W_I, b) + linear(index_select(x, -1, O), W[:, O])

where ``W_I`` is ``W`` with the outlier columns zeroed. The first linear is the
site's new node (``meta["lowbit.site"]``) and will be quantized; it carries
``meta["lowbit.inlier_mask"]`` (the constant node of the bool mask over K) and
``meta["lowbit.outlier_partial"]`` / ``meta["lowbit.split_sum"]`` (the
full-precision partial and the add). The second stays in full precision.
Sites that read one input with the same outlier columns (q/k/v, gate/up) share the
``index_select`` and the mask constant, so their quantizations are one.
Numerical contract: exact in real arithmetic (float rounding of one extra add).
When the site's products are stored (``qcompile.artifacts``: same weight, recipe,
options and outlier columns, or a released weight), the stored index, mask and
outlier columns are reused, the inlier weight constant is a zero-memory
placeholder and ``quantize_weights`` uses the stored int8 weight; otherwise the
pass leaves its tensors in ``site.products`` for ``quantize_weights`` to store.
Dynamic mode: no rewrite; the site is marked ``meta["lowbit.dynamic_threshold"]``
and ``quantize_weights`` emits the run-time split op.
Returns the number of sites split (or marked dynamic).
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from qcompile import artifacts
from qcompile.context import PassContext, add_constant
from qcompile.recipes import get_recipe


def split_mixed_mm(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    shared = {}  # (input node, outlier columns) -> (inlier mask constant, gathered columns)
    for site in ctx.sites:
        recipe = get_recipe(site.scheme)
        if site.skip_reason or not (recipe.quantize and recipe.mixed):
            continue
        node = site.node
        if ctx.options.outlier_mode == "dynamic":
            node.meta["lowbit.dynamic_threshold"] = ctx.options.threshold
            rewrites += 1
            continue
        if not site.outlier_channels:
            continue
        x, _, bias = node.args[0], node.args[1], node.args[2] if len(node.args) > 2 else None
        w = site.weight.detach()
        art = site.artifact or artifacts.lookup(site, ctx, deps=list(site.outlier_channels))
        if art is not None:  # stored products: nothing is computed from the weight
            site.artifact = art
            cols, inlier_mask = art.tensors["outlier_idx"], art.tensors["inlier_mask"]
            w_outlier = art.tensors["w_outlier"]
            w_inlier = artifacts.placeholder(w.shape, w.dtype, w.device)  # int8 one is stored
        else:
            cols = torch.tensor(site.outlier_channels, dtype=torch.long, device=w.device)
            inlier_mask = torch.ones(w.shape[1], dtype=torch.bool, device=w.device)
            inlier_mask[cols] = False
            w_inlier = w.clone()
            w_inlier[:, cols] = 0
            w_outlier = w[:, cols].contiguous()
            site.products = {
                "outlier_idx": cols,
                "inlier_mask": inlier_mask,
                "w_outlier": w_outlier,
            }

        g = gm.graph
        key = (x, tuple(site.outlier_channels))
        if key not in shared:  # q/k/v (gate/up) read one input: one gather, one mask
            idx_node = add_constant(gm, f"lowbit_{site.fqn}_outlier_idx", cols, node)
            mask_node = add_constant(gm, f"lowbit_{site.fqn}_inlier_mask", inlier_mask, node)
            with g.inserting_before(node):
                x_out = g.call_function(torch.index_select, (x, -1, idx_node))
            x_out.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
            shared[key] = (mask_node, x_out)
        mask_node, x_out = shared[key]
        w_out_node = add_constant(gm, f"lowbit_{site.fqn}_w_outlier", w_outlier, node)
        w_in_node = add_constant(gm, f"lowbit_{site.fqn}_w_inlier", w_inlier, node)
        with g.inserting_before(node):
            partial = g.call_function(torch._C._nn.linear, (x_out, w_out_node))
            y_in = g.call_function(torch._C._nn.linear, (x, w_in_node, bias))
            y = g.call_function(operator.add, (y_in, partial))
        for n in (partial, y_in, y):
            n.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        for n in (partial, y_in, y):  # same shape and dtype as the original output
            n.meta["example_value"] = node.meta.get("example_value")
        y_in.meta.update(
            {
                "lowbit.site": site.fqn,
                "lowbit.outliers": list(site.outlier_channels),
                "lowbit.inlier_mask": mask_node,
                "lowbit.outlier_partial": partial,
                "lowbit.split_sum": y,
                "lowbit.weight_node": w_in_node,
            }
        )
        node.replace_all_uses_with(y)
        g.erase_node(node)
        site.node = y_in
        rewrites += 1
    gm.recompile()
    return rewrites
