"""quantize_lowbit: low-bit weights and per-token low-bit activations (W4A4, W6A6, W4A8).

Precondition: the exact passes ran (``smooth`` / ``rotate`` may have folded the
site's weight: ``node.meta["lowbit.weight_f64"]`` then holds it in float64).
Rewrite, per site whose recipe quantizes weights and activations at widths other
than (8, 8) (those are ``quantize_weights``'):

    linear(x, W, b)
 -> q, s = lowbit.quantize_rows_bits(x, a_bits)            per token, [-qmax, qmax]
    lowbit.int8_linear(q, s, W_q, w_scale, b, None, dtype)  int32 accumulation

with ``W_q, w_scale`` the symmetric per-output-channel ``w_bits`` quantization of the
(folded) weight (``kernels.lowbit_act``), values held in int8 (not packed: storage is
8 bits per weight plus a float32 scale per row; ``bits_per_weight`` reports that).
For ``-duquant`` recipes with ``options["duquant"]["clip_search"]`` each output
channel's clipping ratio is chosen from ``lowbit_act.CLIP_RATIOS`` to minimize the
output error on the input group's calibration sample (in the rotated basis), or the
weight error without a sample. The float64 copies left in node meta by the exact
passes are released.
Stored products (``qcompile.artifacts``): ``W_q``, ``w_scale`` and the clip ratios are
stored with the ids of the transform plans folded into the weight (``passes/_plans.py``)
and reused when those plans are (``fusion_analysis`` decided: ``site.artifact``); a
site no transform touches reuses them like the other quantizing passes (same weight,
recipe and options; always for a released weight).
Numerical contract: per element ``|W - deq(W_q)| <= w_scale / 2`` without clipping
(saturated elements excepted with it); activations within half a step per token.
Returns the number of sites quantized.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import fx

from qcompile import artifacts
from qcompile.context import PassContext, add_constant
from qcompile.kernels import ops  # noqa: F401  (registers torch.ops.lowbit)
from qcompile.kernels.lowbit_act import quantize_weight_per_channel_bits, search_clip_ratios
from qcompile.recipes import get_recipe

from ._folding import drop_constant, weight_f64
from ._plans import site_products, store_site

META_RELEASED = ("lowbit.weight_f64", "lowbit.bias_f64", "lowbit.input_group")


def quantize_lowbit(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    g = gm.graph
    for site in ctx.sites:
        recipe = get_recipe(site.scheme)
        if site.skip_reason or not artifacts.low_bit(recipe):
            continue
        node = site.node
        group = node.meta.get("lowbit.input_group")
        art = site_products(site, ctx)
        if art is not None:  # stored products: nothing is computed from the weight
            w_q, w_scale = art.tensors["w_q"], art.tensors["w_scale"]
            site.weight_sqnr_db, site.method = art.meta.get("weight_sqnr_db"), art.meta["method"]
            for attr in ("act_absmax_before", "act_absmax_after"):
                if getattr(site, attr) is None:
                    setattr(site, attr, art.meta.get(attr))
        else:
            w = weight_f64(site)
            clip = None
            if recipe.transform == "duquant" and ctx.options.duquant["clip_search"]:
                sample = None if group is None else group.sample
                clip = search_clip_ratios(w, recipe.weight_bits, sample)
            w_q, w_scale = quantize_weight_per_channel_bits(w, recipe.weight_bits, clip)
            site.weight_sqnr_db = _sqnr_db(w, w_q, w_scale)
            site.method = f"rtn int{recipe.weight_bits}" + (
                f" + clip search (mean ratio {float(clip.mean()):.3f})" if clip is not None else ""
            )
        site.bits_per_weight = 8 + 32 / site.in_features
        if site.act_absmax_before is None and site.fqn in ctx.stats:
            site.act_absmax_before = float(ctx.stats[site.fqn].absmax.max())
        if art is None:
            products = {"w_q": w_q, "w_scale": w_scale}
            if clip is not None:
                products["clip_ratios"] = clip.to(torch.float32)
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
                if k.startswith("lowbit.") and k not in META_RELEASED
            }
        )
        y.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
        y.meta["example_value"] = out_val
        node.replace_all_uses_with(y)
        g.erase_node(node)
        w_node = node.meta.get("lowbit.weight_node")
        if w_node is not None and not w_node.users:  # the folded fp copy
            drop_constant(gm, w_node)
            y.meta.pop("lowbit.weight_node", None)
        site.node = y
        rewrites += 1
    for n in g.nodes:  # float64 masters and samples of the exact passes
        for key in META_RELEASED:
            n.meta.pop(key, None)
    gm.recompile()
    return rewrites


def _sqnr_db(w: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> float:
    deq = w_q.double() * w_scale.double().unsqueeze(1)
    noise = (w - deq).pow(2).sum().item()
    if noise == 0:
        return math.inf
    return 10 * math.log10(w.pow(2).sum().item() / noise)
