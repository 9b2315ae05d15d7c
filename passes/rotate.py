"""rotate: DuQuant block rotations / zigzag permutation (or a Hadamard) per linear input.

Precondition: ``fusion_analysis`` ran (and ``smooth``, whose scaling the group's
sample already reflects).
Rewrite, per input group (one per distinct input node: q/k/v share one, gate/up one),
with ``T`` orthogonal ``[K, K]`` built by :func:`build_plan` from the group's sample:

    linear(x, W_i)  ->  linear(block_rotate(x, ...), W_i @ T)     for every linear i

* ``"duquant"``: ``T = P0 @ R1 @ P @ R2`` (``qcompile.transforms.duquant_transform``):
  ``R1``, ``R2`` block-diagonal greedy rotations (``options["duquant"]["block_size"]``;
  a remainder block when it does not divide K, reported), ``P`` the zigzag
  permutation, the stage ``P @ R2`` kept only when it lowers the sample's per-token
  error at the recipe's activation bits. ``P0`` (only where ``fusion_analysis`` found a
  SwiGLU producer, with ``permute``): a zigzag permutation of the raw channels, which
  deals the massive-outlier channels to different blocks before ``R1``; it is folded
  into the gate/up projections' output rows, so it costs nothing at run time.
* ``"hadamard"``: ``T = transforms.hadamard_or_random(K)`` (QuaRot-style; a seeded
  random orthogonal matrix when no Hadamard order-K construction exists; the report
  says which), applied as one K x K block.

``W_i @ T`` is folded offline in float64 into copies of each weight (cast once).
``x @ T`` runs online ONCE per input node, as ``kernels.lowbit_act.block_rotate``: a
batched matmul over the blocks of ``R1`` (and of ``R2``, with the gather ``P``
between). An online smoothing ``x / s`` left by ``smooth`` is merged into ``R1``
(``diag(1/s) @ R1`` is still block-diagonal) and its ``div`` removed.
Numerical contract: exact in real arithmetic (float rounding of the folded weights and
of the online matmul; checked by ``verify`` and in float64 by the tests).
Returns the number of input groups rotated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from qcompile.context import PassContext, add_constant
from qcompile.kernels.lowbit_act import block_rotate, split_blocks
from qcompile.transforms import (
    duquant_transform,
    hadamard_or_random,
    per_token_quant_mse,
    zigzag_permutation,
)

from ._folding import drop_constant, fold_output_rows, set_weight, weight_f64
from .fusion_analysis import InputGroup, input_groups

DTYPE = torch.float64
BUILD_ROWS = 64  # sample rows (largest norms) the greedy rotations are built from


@dataclass
class Plan:
    """``T = P0 @ R1 @ P @ R2`` for one input group (float64)."""

    r1: torch.Tensor  # [K, K] block-diagonal with blocks of ``block``
    block: int
    pre_perm: torch.Tensor | None = None  # P0, folded into producers' output rows
    perm: torch.Tensor | None = None  # P (online gather)
    r2: torch.Tensor | None = None  # [K, K] block-diagonal, or None
    notes: list[str] = field(default_factory=list)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ T`` (float64), block by block."""
        y = x if self.pre_perm is None else x[:, self.pre_perm]
        y = block_rotate(y, *split_blocks(self.r1, self.block))
        if self.perm is not None:
            y = y[:, self.perm]
        return y if self.r2 is None else block_rotate(y, *split_blocks(self.r2, self.block))

    def fold(self, w: torch.Tensor) -> torch.Tensor:
        """``W @ T`` for ``W [N, K]`` (T acts on the input channels)."""
        return self.apply(w)


def rotate(gm: fx.GraphModule, ctx: PassContext) -> int:
    rewrites = 0
    for g in input_groups(ctx):
        plan = build_plan(g, ctx.options.duquant)
        _apply_plan(gm, g, plan)
        rewrites += 1
    gm.recompile()
    return rewrites


def build_plan(g: InputGroup, opts) -> Plan:
    """The transform of one group, from its (smoothed) sample. Tests may replace it."""
    k = g.in_features
    seed = 10007 * g.index
    if g.transform == "hadamard":
        h, kind = hadamard_or_random(k, seed=seed)
        return Plan(r1=h, block=k, notes=[f"{kind} {k}x{k} (online)"])
    block, steps, permute = opts["block_size"], opts["steps"], opts["permute"]
    x = g.sample if g.sample is not None else g.absmax[None, :]
    notes = []
    pre = None
    if permute and g.perm_into and k > block:
        pre = zigzag_permutation(x.abs().amax(dim=0), block)
        x = x[:, pre]
        notes.append("zigzag P0 (fused into " + ", ".join(s.fqn for s in g.perm_into) + " rows)")
    t, info = duquant_transform(
        _build_rows(x, block),
        block_size=block,
        steps=steps,
        permute=permute,
        second_rotation=permute,
        seed=seed,
        gate_bits=None,
    )
    r1, perm, r2 = info["R1"], info["perm"], info["R2"]
    nb, rem = divmod(k, min(block, k))
    shape = f"{nb}x{min(block, k)}" + (f"+{rem} (remainder block)" if rem else "")
    notes.append(f"R1 {shape} (online)")
    if permute:
        # DuQuant's second stage, gated on the FULL sample at the activation bits
        x1 = block_rotate(x, *split_blocks(r1, block))
        x2 = block_rotate(x1[:, perm], *split_blocks(r2, block))
        bits = min(g.act_bits, 8)
        if per_token_quant_mse(x2, bits) < per_token_quant_mse(x1, bits):
            notes.append("zigzag P + R2 (online)")
        else:
            perm, r2 = None, None
            notes.append(f"P + R2 rejected (no A{bits} error gain)")
    else:
        perm, r2 = None, None
    return Plan(r1=r1, block=block, pre_perm=pre, perm=perm, r2=r2, notes=notes)


def _build_rows(x: torch.Tensor, block: int) -> torch.Tensor:
    """Rows that can hold the max after an orthogonal block map: the largest block norms.

    ``max|x_b @ R| <= ||x_b||``, so rows with small norms in every block cannot decide
    the greedy rotation's objective; keeping the top rows per block makes building
    the rotations cheap without changing what they optimize (in practice).
    """
    if x.shape[0] <= BUILD_ROWS:
        return x
    keep = set()
    per_block = max(4, BUILD_ROWS // max(1, -(-x.shape[1] // block)))
    for start in range(0, x.shape[1], block):
        norms = x[:, start : start + block].norm(dim=1)
        keep.update(norms.topk(min(per_block, x.shape[0])).indices.tolist())
    keep.update(x.norm(dim=1).topk(BUILD_ROWS).indices.tolist())
    return x[sorted(keep)]


def _apply_plan(gm: fx.GraphModule, g: InputGroup, plan: Plan) -> None:
    graph = gm.graph
    if plan.pre_perm is not None:  # P0 upstream: the producers' output rows
        for site in g.perm_into:
            fold_output_rows(gm, site, perm=plan.pre_perm)
    for site in g.sites:
        set_weight(gm, site, plan.fold(weight_f64(site)))

    x = g.input
    r1 = plan.r1
    if g.online_scale is not None:  # merge an online x / s into R1 and drop the div
        s = g.online_scale if plan.pre_perm is None else g.online_scale[plan.pre_perm]
        r1 = r1 / s[:, None]
        div, x = x, x.args[0]
        s_node = div.args[1]
        for site in g.sites:
            site.node.replace_input_with(div, x)
        if not div.users:
            graph.erase_node(div)
            if not s_node.users:
                drop_constant(gm, s_node)
        for site in g.sites:
            site.transforms = [
                t.replace("(online)", "(online, merged into R1)") if t.startswith("smooth") else t
                for t in site.transforms
            ]

    val = x.meta.get("example_value")
    dtype = val.dtype if val is not None else g.sites[0].weight.dtype
    first = min((site.node for site in g.sites), key=_order(gm))
    tag = f"lowbit_rotate_{g.index}"
    consts = [None] * 5
    b1, t1 = split_blocks(r1, plan.block)
    consts[0] = _const(gm, f"{tag}_r1", b1, dtype, first)
    consts[1] = _const(gm, f"{tag}_r1_tail", t1, dtype, first)
    if plan.perm is not None:
        consts[2] = add_constant(gm, f"{tag}_perm", plan.perm.to(torch.int64), first)
    if plan.r2 is not None:
        b2, t2 = split_blocks(plan.r2, plan.block)
        consts[3] = _const(gm, f"{tag}_r2", b2, dtype, first)
        consts[4] = _const(gm, f"{tag}_r2_tail", t2, dtype, first)
    with graph.inserting_before(first):
        y = graph.call_function(block_rotate, (x, *consts))
    y.meta["example_value"] = val
    y.meta["nn_module_stack"] = first.meta.get("nn_module_stack", {})
    y.meta["lowbit.rotate"] = g.index
    for site in g.sites:
        site.node.replace_input_with(x, y)
    g.input = y

    x_before = g.sample
    if g.sample is not None:
        g.sample = plan.apply(g.sample)
    after = float(g.sample.abs().max()) if g.sample is not None else None
    g.notes += plan.notes
    for site in g.sites:
        site.transforms += plan.notes
        site.act_absmax_after = after
        if site.act_absmax_before is None and x_before is not None:
            site.act_absmax_before = float(x_before.abs().max())


def _const(gm, name, value, dtype, before):
    return None if value is None else add_constant(gm, name, value.to(dtype), before)


def _order(gm: fx.GraphModule):
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: index[n]
