"""quantize_weights: int8 per-output-channel weights and per-token int8 activations.

Precondition: ``split_mixed_mm`` ran (sites of mixed recipes may be split).
Rewrite, per site whose recipe is int8 weights and int8 activations:

    linear(x, W, b) [+ partial]
 -> q, s = lowbit.quantize_rows(x, inlier_mask)
    lowbit.int8_linear(q, s, W_q, w_scale, b, partial, dtype)

with ``W_q, w_scale = absmax int8 of W`` (per output channel; the inlier weight
when the site was split), stored as new constants of the graph; sites reading the same
input with the same mask (q/k/v, gate/up) share one ``quantize_rows``. Sites marked for
the dynamic split become ``lowbit.int8_mixed_linear_dynamic``. The products are
stored in ``qcompile.artifacts`` (with the split's, if any) and reused instead of
recomputed when they match (same weight, recipe, options and outlier columns;
always for a released weight). The user's
parameters are never modified; full-precision copies made by earlier passes are
dropped from the graph module once replaced.
Numerical contract: within int8 absmax tolerance: per element of W,
``|W - W_q * w_scale| <= w_scale / 2``; ``site.weight_sqnr_db`` reports the
effective weight's SQNR (outlier columns count as exact).
Returns the number of sites quantized.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from qcompile import artifacts
from qcompile.context import PassContext
from qcompile.graph_utils import (
    DYNAMIC_THRESHOLD,
    INLIER_MASK,
    META_PREFIX,
    OUTLIER_PARTIAL,
    SPLIT_SUM,
    WEIGHT_NODE,
    add_constant,
)
from qcompile.kernels import ops  # noqa: F401  (registers torch.ops.lowbit)
from qcompile.kernels.reference import quantize_weight_per_channel, sqnr_db
from qcompile.memory import drop_file_pages, release_free_pages
from qcompile.products import Int8Site
from qcompile.recipes import INT8, INT8_MIXED


def quantize_weights(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    quantized = {}  # (input, inlier mask) -> the (codes, scales) nodes its sites share
    for site in ctx.sites_of(INT8, INT8_MIXED):
        node = site.node
        g = gm.graph
        x = node.args[0]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        w_node = node.meta.get(WEIGHT_NODE)
        art = site.artifact
        if art is None and not site.products:
            art = artifacts.lookup(site, ctx, deps=list(site.outlier_channels))
        if art is not None:  # stored products (qcompile.artifacts): reuse, compute nothing
            stored = Int8Site.from_tensors(art.tensors)
            w_q, w_scale = stored.w_q, stored.w_scale
            site.weight_sqnr_db = art.meta.get("weight_sqnr_db")
        else:
            w = getattr(gm, w_node.target) if w_node is not None else site.weight.detach()
            w_q, w_scale = quantize_weight_per_channel(w)
            site.weight_sqnr_db = _effective_sqnr_db(
                site.weight, w_q, w_scale, site.outlier_channels
            )
        site.method = "absmax int8" + (" + fp outliers" if site.outlier_channels else "")
        site.bits_per_weight = _bits_per_weight(
            site.in_features, len(site.outlier_channels), site.weight.element_size()
        )

        if art is None:
            meta = {
                "outlier_channels": list(site.outlier_channels),
                "outlier_rule": site.outlier_rule,
                "bits": 8,
                "method": site.method,
                "weight_sqnr_db": site.weight_sqnr_db,
                "bits_per_weight": site.bits_per_weight,
            }
            products = Int8Site(w_q=w_q, w_scale=w_scale, **site.products)
            artifacts.store(site, ctx, products, meta, deps=list(site.outlier_channels))

        out_val = node.meta.get("example_value")
        out_dtype = out_val.dtype if out_val is not None else site.weight.dtype
        replaced = node.meta.get(SPLIT_SUM, node)
        wq_node = add_constant(gm, f"lowbit_{site.fqn}_int8", w_q, node)
        ws_node = add_constant(gm, f"lowbit_{site.fqn}_scale", w_scale, node)
        with g.inserting_before(replaced):
            if DYNAMIC_THRESHOLD in node.meta:
                thr = node.meta[DYNAMIC_THRESHOLD]
                y = g.call_function(
                    torch.ops.lowbit.int8_mixed_linear_dynamic.default,
                    (x, wq_node, ws_node, bias, thr),
                )
            else:
                mask = node.meta.get(INLIER_MASK)
                partial = node.meta.get(OUTLIER_PARTIAL)
                if (x, mask) not in quantized:  # q/k/v, gate/up: one quantization
                    qs = g.call_function(torch.ops.lowbit.quantize_rows.default, (x, mask))
                    quantized[x, mask] = (
                        g.call_function(operator.getitem, (qs, 0)),
                        g.call_function(operator.getitem, (qs, 1)),
                    )
                q, s = quantized[x, mask]
                y = g.call_function(
                    torch.ops.lowbit.int8_linear.default,
                    (q, s, wq_node, ws_node, bias, partial, out_dtype),
                )
        y.meta.update({k: v for k, v in node.meta.items() if k.startswith(META_PREFIX)})
        y.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        y.meta["example_value"] = out_val
        replaced.replace_all_uses_with(y)
        g.erase_node(replaced)
        if replaced is not node:
            g.erase_node(node)
        if w_node is not None and not w_node.users:  # drop the fp inlier copy
            g.erase_node(w_node)
            delattr(gm, w_node.target)
            gm._param_name_to_source.pop(w_node.target, None)
            y.meta.pop(WEIGHT_NODE, None)
        site.node = y
        rewrites += 1
        if ctx.options.free_weights and site.param is not None:
            drop_file_pages(site.param)  # mapped from a checkpoint: read again only if needed
        release_free_pages()  # this site's temporaries, before the next one's
    gm.recompile()
    return rewrites


def _effective_sqnr_db(w: torch.Tensor, w_q, w_scale, exact_cols) -> float:
    """SQNR of the weight the site computes with (outlier columns exact)."""
    deq = w_q.double() * w_scale.double().unsqueeze(1)
    if exact_cols:
        deq[:, exact_cols] = w.detach().double()[:, exact_cols]
    return sqnr_db(w, deq)


def _bits_per_weight(k: int, n_outliers: int, fp_bytes: int) -> float:
    """int8 inliers + full-precision outlier columns + one fp32 scale per output row."""
    return (8 * (k - n_outliers) + 8 * fp_bytes * n_outliers + 32) / k
