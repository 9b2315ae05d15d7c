"""quantize_weights: int8 per-output-channel weights and per-token int8 activations.

Precondition: ``split_mixed_mm`` ran (sites of mixed recipes may be split).
Rewrite, per site whose recipe is int8 weights and int8 activations:

    linear(x, W, b)
 -> q, s = lowbit.quantize_rows(x)                     (w8a8; int8-mixed without outliers)
    q, s = lowbit.quantize_rows_copies(x, copies, src, piece)     (split_mixed_mm's copies)
    lowbit.int8_linear(q, s, W_q, w_scale, b, None, dtype)

with ``W_q, w_scale = absmax int8 of W`` (per output channel; with copies ``W_q`` is
expanded to ``W_q[:, src]``), stored as new constants of the graph; sites reading the
same input with the same copies (q/k/v, gate/up) share one quantization. Sites marked for
the dynamic split become ``lowbit.int8_mixed_linear_dynamic``. The products are
stored in ``qcompile.artifacts`` (with the copies, if any) and reused instead of
recomputed when they match (same weight, recipe, options, outlier columns and copies;
always for a released weight). The user's
parameters are never modified; full-precision copies made by earlier passes are
dropped from the graph module once replaced.
Numerical contract: within int8 absmax tolerance: per element of W,
``|W - W_q * w_scale| <= w_scale / 2``; ``site.weight_sqnr_db`` reports its SQNR.
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
    META_PREFIX,
    OUTLIER_COPIES,
    WEIGHT_NODE,
    add_constant,
)
from qcompile.kernels import ops  # noqa: F401  (registers torch.ops.lowbit)
from qcompile.kernels.reference import quantize_weight_per_channel, sqnr_db
from qcompile.memory import drop_file_pages, release_free_pages
from qcompile.products import Int8Site
from qcompile.recipes import INT8, INT8_MIXED

from .split_mixed_mm import outlier_deps


def quantize_weights(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    quantized = {}  # (input, copies constants) -> the (codes, scales) nodes its sites share
    for site in ctx.sites_of(INT8, INT8_MIXED):
        node = site.node
        g = gm.graph
        x = node.args[0]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        w_node = node.meta.get(WEIGHT_NODE)
        art = site.artifact
        copies = node.meta.get(OUTLIER_COPIES)  # (copies, src, piece) constant nodes
        if art is None and not site.products:
            art = artifacts.lookup(site, ctx, deps=outlier_deps(site))
        if art is not None:  # stored products (qcompile.artifacts): reuse, compute nothing
            stored = Int8Site.from_tensors(art.tensors)
            w_q, w_scale = stored.w_q, stored.w_scale
            site.weight_sqnr_db = art.meta.get("weight_sqnr_db")
        else:
            w = getattr(gm, w_node.target) if w_node is not None else site.weight.detach()
            w_q, w_scale = quantize_weight_per_channel(w)
            site.weight_sqnr_db = sqnr_db(site.weight, w_q.double() * w_scale.double()[:, None])
            if copies is not None:  # one weight column per int8 column of the codes
                w_q = w_q.index_select(1, getattr(gm, copies[1].target)).contiguous()
        extra = sum(site.outlier_copies) - len(site.outlier_copies)
        site.method = "absmax int8" + (f" + {extra} outlier copies" if extra else "")
        site.bits_per_weight = (8 * w_q.shape[1] + 32) / site.in_features  # with the copies

        if art is None:
            meta = {
                "outlier_channels": list(site.outlier_channels),
                "outlier_rule": site.outlier_rule,
                "outlier_copies": list(site.outlier_copies),
                "bits": 8,
                "method": site.method,
                "weight_sqnr_db": site.weight_sqnr_db,
                "bits_per_weight": site.bits_per_weight,
            }
            products = Int8Site(w_q=w_q, w_scale=w_scale, **site.products)
            artifacts.store(site, ctx, products, meta, deps=outlier_deps(site))

        out_val = node.meta.get("example_value")
        out_dtype = out_val.dtype if out_val is not None else site.weight.dtype
        wq_node = add_constant(gm, f"lowbit_{site.fqn}_int8", w_q, node)
        ws_node = add_constant(gm, f"lowbit_{site.fqn}_scale", w_scale, node)
        with g.inserting_before(node):
            if DYNAMIC_THRESHOLD in node.meta:
                thr = node.meta[DYNAMIC_THRESHOLD]
                y = g.call_function(
                    torch.ops.lowbit.int8_mixed_linear_dynamic.default,
                    (x, wq_node, ws_node, bias, thr),
                )
            else:
                if (x, copies) not in quantized:  # q/k/v, gate/up: one quantization
                    qs = (
                        g.call_function(torch.ops.lowbit.quantize_rows.default, (x, None))
                        if copies is None
                        else g.call_function(
                            torch.ops.lowbit.quantize_rows_copies.default, (x, *copies)
                        )
                    )
                    quantized[x, copies] = (
                        g.call_function(operator.getitem, (qs, 0)),
                        g.call_function(operator.getitem, (qs, 1)),
                    )
                q, s = quantized[x, copies]
                y = g.call_function(
                    torch.ops.lowbit.int8_linear.default,
                    (q, s, wq_node, ws_node, bias, None, out_dtype),
                )
        y.meta.update({k: v for k, v in node.meta.items() if k.startswith(META_PREFIX)})
        y.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        y.meta["example_value"] = out_val
        node.replace_all_uses_with(y)
        g.erase_node(node)
        if w_node is not None and not w_node.users:  # drop the folded fp copy
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
