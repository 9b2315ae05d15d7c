"""quantize_weight_only: group-wise low-bit weights (RTN or GPTQ), packed.

Precondition: ``collect_stats`` ran; a GPTQ recipe's sites have a Hessian.
Rewrite, per site whose recipe is weight-only (``w{bits}a16-g{G}[-gptq]``):

    linear(x, W, b)  ->  lowbit.dequant_linear(x, packed, scales, zeros, b, bits, G)

``W ≈ (q - zeros) * scales`` per group of ``G`` input channels
(``qcompile.kernels.weight_only_reference``), ``q`` packed densely along K
(``qcompile.kernels.packing``; 3 bits without padding), scales and zero points
stored in the activation dtype. GPTQ (``qcompile.gptq``) uses the calibrated
``X^T X``; the result with the lower calibration reconstruction error is kept
(GPTQ, or RTN where GPTQ did not help), and the report says which.
The packed codes, scales and zero points are stored in ``qcompile.artifacts`` and
reused instead of recomputed when they match (same weight, recipe, options and,
for GPTQ, the same calibration statistics; always for a released weight).
Numerical contract: RTN is within half a quantization step per element.
A group size that does not divide a site's ``in_features`` is a ``ValueError``
naming the site and the group sizes that would work (override the site).
Returns the number of sites quantized.
"""

from __future__ import annotations

import weakref

import torch
from torch import fx

from qcompile import artifacts, progress
from qcompile.context import PassContext
from qcompile.gptq import gptq_quantize, reconstruction_error
from qcompile.graph_utils import add_constant
from qcompile.kernels import ops  # noqa: F401  (registers torch.ops.lowbit)
from qcompile.kernels.packing import pack, packed_bits_per_weight
from qcompile.kernels.reference import sqnr_db_from_sums
from qcompile.kernels.weight_only_reference import (
    chunk_rows,
    dequantize_groupwise,
    quantize_groupwise,
)
from qcompile.lowering import derived
from qcompile.memory import drop_file_pages, release_free_pages
from qcompile.products import WeightOnlySite
from qcompile.recipes import WEIGHT_ONLY, get_recipe

GROUP_SIZES = (32, 64, 128)


def quantize_weight_only(gm: fx.GraphModule, ctx: PassContext) -> int:
    sites = ctx.sites_of(WEIGHT_ONLY)
    for site in sites:
        check_group_size(site.fqn, site.in_features, get_recipe(site.scheme))
    g = gm.graph
    gptq = any(get_recipe(s.scheme).gptq for s in sites)
    for site in progress.bar(sites, desc="lowbit GPTQ", show=gptq):
        recipe = get_recipe(site.scheme)
        node = site.node
        bits, group = recipe.weight_bits, recipe.group_size
        out_val = node.meta.get("example_value")
        act_dtype = out_val.dtype if out_val is not None else site.weight.dtype
        stats = ctx.stats.get(site.fqn) if recipe.gptq else None
        deps = weakref.ref(stats) if stats is not None else None  # GPTQ: this calibration
        art = site.artifact or artifacts.lookup(site, ctx, deps=stats)
        if art is not None:  # stored products (qcompile.artifacts): reuse, compute nothing
            # compacted codes are rebuilt for the graph
            stored = WeightOnlySite.from_tensors(derived.products(art))
            packed, scales, zeros = stored.packed, stored.scales, stored.zeros
            site.weight_sqnr_db, method = art.meta.get("weight_sqnr_db"), art.meta["method"]
        else:
            q, scales, zeros, method = quantize_site(site, ctx, bits, group, act_dtype)
            drop = ctx.options.free_weights  # mapped pages: read again only if needed
            site.weight_sqnr_db = _sqnr_db(site.weight, q, scales, zeros, group, drop)
            packed = pack(q, bits)
        site.bits_per_weight = packed_bits_per_weight(bits, group, scales.element_size())
        site.method = method
        if art is None:
            meta = {
                "bits": bits,
                "group_size": group,
                "method": method,
                "weight_sqnr_db": site.weight_sqnr_db,
                "bits_per_weight": site.bits_per_weight,
            }
            products = WeightOnlySite(packed=packed, scales=scales, zeros=zeros)
            artifacts.store(site, ctx, products, meta, deps=deps)

        packed_node = add_constant(gm, f"lowbit_{site.fqn}_packed{bits}", packed, node)
        s_node = add_constant(gm, f"lowbit_{site.fqn}_scales", scales, node)
        z_node = add_constant(gm, f"lowbit_{site.fqn}_zeros", zeros, node)
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with g.inserting_before(node):
            y = g.call_function(
                torch.ops.lowbit.dequant_linear.default,
                (node.args[0], packed_node, s_node, z_node, bias, bits, group),
            )
        y.meta.update(node.meta)
        node.replace_all_uses_with(y)
        g.erase_node(node)
        site.node = y
        if ctx.options.free_weights and site.param is not None:
            drop_file_pages(site.param)  # mapped from a checkpoint: read again only if needed
        release_free_pages()  # this site's float64 temporaries, before the next one's
    gm.recompile()
    return len(sites)


def check_group_size(fqn: str, in_features: int, recipe) -> None:
    if in_features % recipe.group_size == 0:
        return
    fits = [gs for gs in GROUP_SIZES if in_features % gs == 0]
    suggestion = (
        f"group sizes that divide it: {fits}; e.g. options['overrides'] = "
        f"{{{fqn.rsplit('.', 1)[0]!r}: 'w{recipe.weight_bits}a16-g{fits[-1]}'}}"
        if fits
        else "no supported group size divides it; override the site to 'fp'"
    )
    raise ValueError(
        f"lowbit: recipe {recipe.name!r} needs in_features divisible by {recipe.group_size}, "
        f"but {fqn} has in_features={in_features}; {suggestion}"
    )


def quantize_site(site, ctx: PassContext, bits: int, group: int, act_dtype: torch.dtype):
    """``(q uint8, scales, zeros, method)``: RTN, or GPTQ when the recipe asks and it helps."""
    w = site.weight.detach()
    if not get_recipe(site.scheme).gptq:
        drop = ctx.options.free_weights
        q, scales, zeros = quantize_groupwise(w, bits, group, act_dtype, drop_pages=drop)
        return q, scales, zeros, "rtn"
    return gptq_or_rtn(w, ctx.stats[site.fqn].hessian, bits, group, act_dtype, ctx.options.gptq)


def gptq_or_rtn(w, hessian, bits: int, group: int, act_dtype: torch.dtype, gopts) -> tuple:
    """GPTQ, unless round-to-nearest has the lower calibration reconstruction error
    ``||X W^T - X Ŵ^T||^2``: so the result is never worse than RTN on that error."""
    q, scales, zeros = quantize_groupwise(w, bits, group, scale_dtype=act_dtype)
    result = gptq_quantize(
        w,
        hessian,
        bits,
        group,
        damp=gopts["damp"],
        act_order=gopts["act_order"],
        block_size=gopts["block_size"],
        clip_search=gopts["clip_search"],
        scale_dtype=act_dtype,
    )
    rtn_error = reconstruction_error(
        w, dequantize_groupwise(q, scales, zeros, group, dtype=torch.float64), hessian
    )
    if result.error <= rtn_error:
        return result.q, result.scales, result.zeros, "gptq"
    return q, scales, zeros, "rtn (gptq did not reduce the error)"


def _sqnr_db(w, q, scales, zeros, group, drop_pages: bool = False) -> float:
    signal = noise = 0.0
    n = chunk_rows(w.shape[1])
    for rows in zip(*(t.split(n) for t in (w.detach(), q, scales, zeros))):
        wd = rows[0].double()
        deq = dequantize_groupwise(*rows[1:], group, dtype=torch.float64)
        signal += float(wd.pow(2).sum())
        noise += float((wd - deq).pow(2).sum())
        if drop_pages:
            drop_file_pages(rows[0])
    return sqnr_db_from_sums(signal, noise)
