"""quantize_lowbit: low-bit weights and per-token low-bit activations (W4A4, W6A6, W4A8).

Precondition: the exact passes ran (``smooth`` / ``rotate`` may have folded the
site's weight: ``node.meta[WEIGHT_F64]`` then holds it in float64).
Rewrite, per site of the ``low-bit`` family:

    linear(x, W, b)
 -> q, s = lowbit.quantize_rows_bits(x, a_bits)            per token, [-qmax, qmax]
    lowbit.int8_linear(q, s, W_q, w_scale, b, None, dtype)  int32 accumulation

with ``W_q, w_scale`` the symmetric per-output-channel ``w_bits`` quantization of the
(folded) weight (``kernels.lowbit_reference``; ``-duquant`` recipes may clip each
output channel: ``kernels.clip_search``), values held in int8. The float64 copies left
in node meta by the exact passes are released. Products are stored with the ids of
the transform plans folded into the weight (``passes/_plans.py``) and reused when
those plans are.
Numerical contract: per element ``|W - deq(W_q)| <= w_scale / 2`` without clipping
(saturated elements excepted with it); activations within half a step per token.
Returns the number of sites quantized.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from qcompile.context import PassContext
from qcompile.graph_utils import (
    BIAS_F64,
    INPUT_GROUP,
    META_PREFIX,
    WEIGHT_F64,
    WEIGHT_NODE,
    add_constant,
    drop_constant,
)
from qcompile.kernels import ops  # noqa: F401  (registers torch.ops.lowbit)
from qcompile.kernels.clip_search import search_clip_ratios
from qcompile.kernels.lowbit_reference import quantize_weight_per_channel_bits
from qcompile.kernels.reference import sqnr_db
from qcompile.products import LowBitSite
from qcompile.recipes import LOW_BIT, get_recipe

from ._folding import weight_f64
from ._plan_store import site_products, store_site

META_RELEASED = (WEIGHT_F64, BIAS_F64, INPUT_GROUP)


def quantize_lowbit(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    g = gm.graph
    for site in ctx.sites_of(LOW_BIT):
        recipe = get_recipe(site.scheme)
        node = site.node
        group = node.meta.get(INPUT_GROUP)
        art = site_products(site, ctx)
        if art is not None:  # stored products: nothing is computed from the weight
            stored = LowBitSite.from_tensors(art.tensors)
            w_q, w_scale = stored.w_q, stored.w_scale
            site.weight_sqnr_db, site.method = art.meta.get("weight_sqnr_db"), art.meta["method"]
            for attr in ("act_absmax_before", "act_absmax_after"):
                if getattr(site, attr) is None:
                    setattr(site, attr, art.meta.get(attr))
        else:
            w = weight_f64(site)
            clip = None
            # each output channel's clipping ratio minimizes the output error on the input
            # group's calibration sample (rotated basis), or the weight error without one
            if recipe.transform == "duquant" and ctx.options.duquant["clip_search"]:
                sample = None if group is None else group.sample
                clip = search_clip_ratios(w, recipe.weight_bits, sample)
            w_q, w_scale = quantize_weight_per_channel_bits(w, recipe.weight_bits, clip)
            site.weight_sqnr_db = sqnr_db(w, w_q.double() * w_scale.double().unsqueeze(1))
            site.method = f"rtn int{recipe.weight_bits}" + (
                f" + clip search (mean ratio {float(clip.mean()):.3f})" if clip is not None else ""
            )
        site.bits_per_weight = 8 + 32 / site.in_features
        if site.act_absmax_before is None and site.fqn in ctx.stats:
            site.act_absmax_before = float(ctx.stats[site.fqn].absmax.max())
        if art is None:
            clip_ratios = clip.to(torch.float32) if clip is not None else None
            products = LowBitSite(w_q=w_q, w_scale=w_scale, clip_ratios=clip_ratios)
            meta = {
                "bits": recipe.weight_bits,
                "act_bits": recipe.act_bits,
                "method": site.method,
                "weight_sqnr_db": site.weight_sqnr_db,
                "bits_per_weight": site.bits_per_weight,
                "transforms": list(site.transforms),
                "act_absmax_before": site.act_absmax_before,
                "act_absmax_after": site.act_absmax_after,
            }
            store_site(site, ctx, products, meta)

        out_val = node.meta.get("example_value")
        out_dtype = out_val.dtype if out_val is not None else site.weight.dtype
        x = node.args[0]
        bias = node.args[2] if len(node.args) > 2 else None
        wq_node = add_constant(gm, f"lowbit_{site.fqn}_int{recipe.weight_bits}", w_q, node)
        ws_node = add_constant(gm, f"lowbit_{site.fqn}_scale", w_scale, node)
        with g.inserting_before(node):
            qs = g.call_function(torch.ops.lowbit.quantize_rows_bits.default, (x, recipe.act_bits))
            q = g.call_function(operator.getitem, (qs, 0))
            s = g.call_function(operator.getitem, (qs, 1))
            y = g.call_function(
                torch.ops.lowbit.int8_linear.default,
                (q, s, wq_node, ws_node, bias, None, out_dtype),
            )
        y.meta.update(
            {
                k: v
                for k, v in node.meta.items()
                if k.startswith(META_PREFIX) and k not in META_RELEASED
            }
        )
        y.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        y.meta["example_value"] = out_val
        node.replace_all_uses_with(y)
        g.erase_node(node)
        w_node = node.meta.get(WEIGHT_NODE)
        if w_node is not None and not w_node.users:  # the folded fp copy
            drop_constant(gm, w_node)
            y.meta.pop(WEIGHT_NODE, None)
        site.node = y
        rewrites += 1
    for n in g.nodes:  # float64 masters and samples of the exact passes
        for key in META_RELEASED:
            n.meta.pop(key, None)
    gm.recompile()
    return rewrites
