"""fusion_analysis: which parts of each linear input's transform can be absorbed upstream.

Precondition: ``bind`` and ``collect_stats`` ran.
Postcondition (analysis only; the graph is not changed): the sites whose recipe
transforms its input (``Recipe.transform``) are grouped by their input node (q/k/v
share one, gate/up one), every bound linear reading that node joining the group, so
the transform is applied once per input and folded into every consumer. Each
:class:`InputGroup` (in every member's ``node.meta[INPUT_GROUP]``) records where a
smoothing scale and a permutation fold upstream, why the rest stays online, the
calibration sample, and the stored plan it must or may reuse (``passes/_plans.py``).
Returns the number of input groups.
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from qcompile import artifacts
from qcompile.context import LinearSite, PassContext
from qcompile.graph_inputs import runnable_inputs
from qcompile.graph_utils import (
    ACTIVATIONS,
    FUSION,
    INPUT_GROUP,
    gated_product,
    is_mul,
    param_tensor,
    vector_factor,
)
from qcompile.recipes import get_recipe

from ._plans import resolve

log = logging.getLogger("qcompile")

SAMPLE_ROWS = 512  # rows recorded per group when the calibration has no sample


@dataclass(eq=False)
class InputGroup:
    """The linear sites that read one input node, and what can be fused upstream
    (decided on ``ctx.dataflow``, :func:`_decide_fusion`):

    * ``scale_into``: where a per-channel ``x / s`` (smoothing) is absorbed at no
      run-time cost. ``"norm"``: the input comes (through channel-preserving ops: casts,
      slices of other dims) from an RMSNorm-style ``weight * normalized`` whose every
      user is in the group, so ``s`` divides that weight; ``"rows"``: the input is
      ``act(linear_a(..)) * linear_b(..)`` (SwiGLU), so ``s`` divides ``linear_b``'s
      output rows (and bias); None: applied online;
    * ``perm_into``: SwiGLU's producers, whose output rows take a channel permutation
      for free (it passes through the elementwise ``act`` and product);
    * ``online_reason``: why the rest stays online (e.g. attention output: a per-head
      fold into v_proj would change the KV cache the graph returns);
    * ``sample``: input rows (float64) from the calibration (``calibrate(...,
      sample_rows=N)``) or, failing that, recorded from the example inputs (logged);
      ``absmax``: calibrated per-channel max |x|.
    """

    input: fx.Node  # the node the sites read (rewritten by smooth / rotate)
    sites: list[LinearSite]
    transform: str  # "duquant" or "hadamard"
    act_bits: int  # activation bits (smallest over the sites) for DuQuant's gate
    index: int  # group number in graph order (names its constants)
    scale_into: tuple | None = None  # ("norm", mul node, weight arg index) | ("rows", site)
    perm_into: list[LinearSite] | None = None  # sites whose output rows take a permutation
    online_reason: str | None = None
    sample: torch.Tensor | None = None  # [rows, K] float64 in the current input basis
    absmax: torch.Tensor | None = None  # [K] float64 calibrated max |x|, current basis
    absmax_before: float | None = None  # max |x| before any transform
    online_scale: torch.Tensor | None = None  # s of an online x / s (set by smooth)
    notes: list[str] = field(default_factory=list)
    # stored products (passes/_plans.py): the reused plan (an artifacts.Artifact) or None,
    # the plan's id (set when stored or reused), smooth's float64 scales, and the folded
    # norm weight's (parameter, FQN, constant node)
    stored: Any = None
    plan_id: str | None = None
    smooth_scale: torch.Tensor | None = None
    norm_fold: tuple | None = None

    @property
    def in_features(self) -> int:
        return self.sites[0].in_features

    def first_reader(self, gm: fx.GraphModule) -> fx.Node:
        """The group's site that comes first in the graph (online ops go before it)."""
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        return min((site.node for site in self.sites), key=order.__getitem__)

    def route_through(
        self, gm: fx.GraphModule, first: fx.Node, target, args: tuple, meta_key: str
    ) -> fx.Node:
        """Insert ``target(input, *args)`` before ``first`` and make every site of the
        group read it instead of the input (which it becomes); ``meta[meta_key]``
        names the group."""
        val = self.input.meta.get("example_value")
        with gm.graph.inserting_before(first):
            y = gm.graph.call_function(target, (self.input, *args))
        y.meta["example_value"] = val
        y.meta["nn_module_stack"] = first.meta.get("nn_module_stack", {})
        y.meta[meta_key] = self.index
        for site in self.sites:
            site.node.replace_input_with(self.input, y)
        self.input = y
        return y


def input_groups(ctx: PassContext) -> list[InputGroup]:
    """The groups annotated by ``fusion_analysis``, in graph order."""
    seen: dict[int, InputGroup] = {}
    for site in ctx.sites:
        g = site.node.meta.get(INPUT_GROUP)
        if g is not None and id(g) not in seen:
            seen[id(g)] = g
    return sorted(seen.values(), key=lambda g: g.index)


def fusion_analysis(gm: fx.GraphModule, ctx: PassContext, example_inputs) -> int:
    """Group the transformed sites by input and decide each group's folds.

    Stored products (``qcompile.artifacts``; ``passes/_plans.py``): each group's plan is
    looked up before anything is computed. A group whose weights were released (or
    loaded by ``qcompile.load``) must use its stored plan, and one built from the same
    calibration and weights reuses it (``InputGroup.stored``); such a group needs no
    sample, and ``smooth`` / ``rotate`` leave its members' weights alone
    (``site.keep_weight``). With ``options["verify"]`` the graph's outputs on the example
    inputs are recorded (``ctx.verify_reference``) for the ``verify`` checks after the
    exact passes (skipped, and logged, when stored transforms are used: they were
    checked when computed).
    """
    bound = [s for s in ctx.sites if not s.skip_reason and isinstance(s.node.args[0], fx.Node)]
    by_input: dict[fx.Node, list[LinearSite]] = {}
    for site in bound:
        by_input.setdefault(site.node.args[0], []).append(site)
    groups = []
    for inp, sites in by_input.items():
        kinds = [get_recipe(s.scheme).transform for s in sites]
        kind = next((k for k in kinds if k), None)
        if kind is None:
            continue
        bits = min(get_recipe(s.scheme).act_bits or 16 for s in sites)
        g = InputGroup(input=inp, sites=sites, transform=kind, act_bits=bits, index=len(groups))
        if len({k for k in kinds if k}) > 1:
            g.notes.append(f"recipes disagree on the transform; {kind} used for all")
        _decide_fusion(g, ctx)
        groups.append(g)
    if not groups:
        return 0
    resolve(ctx, groups)  # stored plans and products: used instead of computed
    _attach_samples(gm, ctx, groups, example_inputs)
    for g in groups:
        for site in g.sites:
            site.node.meta[INPUT_GROUP] = g
            site.act_absmax_before = g.absmax_before
        fusion = {
            "scale": _describe_scale(g, ctx),
            "perm": [s.fqn for s in g.perm_into] if g.perm_into else "online",
        }
        g.input.meta[FUSION] = fusion
    return len(groups)


# --------------------------------------------------------------------------- graph questions


def _users(ctx: PassContext, node: fx.Node) -> set[str]:
    return set(ctx.dataflow.successors(node.name)) if node.name in ctx.dataflow else set()


def _is_channel_preserving(node: fx.Node) -> bool:
    """Ops through which a per-channel scale (last dim) commutes: casts, other-dim slices."""
    if node.op == "call_method" and node.target in ("to", "contiguous", "float", "double"):
        return True  # dtype / device casts
    if node.op == "call_function" and node.target is operator.getitem:
        idx = node.args[1]
        val = node.args[0].meta.get("example_value") if isinstance(node.args[0], fx.Node) else None
        if isinstance(idx, tuple) and val is not None and len(idx) == val.dim():
            last = idx[-1]
            return isinstance(last, slice) and last == slice(None, None, None)
    return False


def _producer_chain(ctx: PassContext, inp: fx.Node, members: set[str]) -> list[fx.Node] | None:
    """``[producer, ..., inp]`` through channel-preserving ops, each private to the chain.

    None when ``inp`` has a user outside the group (then nothing may be folded upstream).
    """
    if not _users(ctx, inp) <= members:
        return None
    chain = [inp]
    node = inp
    while _is_channel_preserving(node) and isinstance(node.args[0], fx.Node):
        parent = node.args[0]
        if _users(ctx, parent) != {node.name}:
            break
        chain.insert(0, parent)
        node = parent
    return chain


def _decide_fusion(g: InputGroup, ctx: PassContext) -> None:
    members = {s.node.name for s in g.sites}
    chain = _producer_chain(ctx, g.input, members)
    if chain is None:
        g.online_reason = "the input has users outside these linears"
        return
    prod = chain[0]
    if is_mul(prod):
        # RMSNorm: weight (a lifted 1-D parameter of K channels) * normalized
        norm = vector_factor(prod, g.in_features, param_tensor)
        if norm is not None:
            g.scale_into = ("norm", prod, norm[0])
            return
        # SwiGLU: act(linear_a(x)) * linear_b(x)
        sites_by_node = {s.node: s for s in ctx.sites if not s.skip_reason}
        factors = []
        for a, act in (
            gated_product(prod, lambda n: n not in sites_by_node and _is_activation(n)) or []
        ):
            site = sites_by_node.get(a)
            if site is None or not _bias_is_foldable(site):
                break
            private = _users(ctx, a) == {(act or prod).name}
            if act is not None:
                private = private and _users(ctx, act) == {prod.name}
            if not private:
                break
            factors.append((site, act))
        if len(factors) == 2 and factors[0][0] is not factors[1][0]:
            plain = [s for s, act in factors if act is None]
            g.perm_into = [s for s, _ in factors]
            if plain:
                g.scale_into = ("rows", plain[-1])
            return
    if _reaches_attention(prod):
        g.online_reason = (
            "attention output: a per-head fold into v_proj would change the KV cache "
            "the graph returns"
        )
    else:
        g.online_reason = "no foldable producer"


def _is_activation(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False
    if node.target in ACTIVATIONS:
        return not node.kwargs.get("inplace", False)
    return False


def _bias_is_foldable(site: LinearSite) -> bool:
    b = site.node.args[2] if len(site.node.args) > 2 else None
    return b is None or site.bias is not None


def _reaches_attention(node: fx.Node, depth: int = 8) -> bool:
    for _ in range(depth):
        if node.op == "call_function" and "scaled_dot_product_attention" in str(node.target):
            return True
        if not node.args or not isinstance(node.args[0], fx.Node):
            return False
        node = node.args[0]
    return False


def _describe_scale(g: InputGroup, ctx: PassContext) -> str:
    if g.scale_into is None:
        return "online"
    if g.scale_into[0] == "norm":
        mul, i = g.scale_into[1], g.scale_into[2]
        return "norm:" + ctx.param_fqns.get(mul.args[i].name, mul.args[i].name)
    return "rows:" + g.scale_into[1].fqn


# --------------------------------------------------------------------------- samples


def _attach_samples(gm, ctx: PassContext, groups: list[InputGroup], example_inputs) -> None:
    for g in groups:
        if g.stored is not None:  # a stored plan needs no sample
            g.absmax_before = g.stored.meta.get("act_absmax_before")
    groups = [g for g in groups if g.stored is None]
    missing = []
    for g in groups:
        stats = next((ctx.stats[s.fqn] for s in g.sites if s.fqn in ctx.stats), None)
        if stats is not None:
            g.absmax = stats.absmax.to(torch.float64)
            if stats.sample is not None and stats.sample.shape[0] > 0:
                g.sample = stats.sample.to(torch.float64)
        if g.sample is None:
            missing.append(g)
    want_reference = ctx.options.verify
    if want_reference and ctx.plans is not None and ctx.plans.reused:
        log.warning(
            "lowbit: verify skipped: this graph uses %d stored transform plan(s) (released "
            "or loaded weights), which were checked when they were computed",
            ctx.plans.reused,
        )
        want_reference = False
    if missing and any(artifacts.is_freed(s.param) for s in ctx.sites):
        raise ValueError(
            f"lowbit: cannot record the inputs of {missing[0].sites[0].fqn} on this graph's "
            "example inputs: other full-precision weights of the graph were released "
            "(free_weights or qcompile.load), so they would be wrong; pass options="
            "{'calibration': qcompile.calibrate(model, batches, sample_rows=512)} recorded on "
            "the full model"
        )
    if missing or want_reference:
        recorded, outputs = _record_inputs(gm, [g.input for g in missing], example_inputs)
        for g in missing:
            g.sample = recorded[g.input]
        if want_reference:
            ctx.verify_reference = (list(example_inputs), outputs)
    if missing and ctx.options.calibration is not None:
        log.warning(
            "lowbit: the calibration has no input sample for %d transformed input(s) (e.g. "
            "%s); DuQuant/Hadamard transforms are built from this graph's example inputs. "
            "Calibrate with qcompile.calibrate(model, batches, sample_rows=512).",
            len(missing),
            missing[0].sites[0].fqn,
        )
    for g in groups:
        if g.absmax is None:
            g.absmax = g.sample.abs().amax(dim=0)
        g.absmax_before = float(g.absmax.max())


def _record_inputs(gm, nodes: list[fx.Node], example_inputs):
    """Values of ``nodes`` (reshaped ``[rows, K]``, subsampled) and the graph's outputs."""
    wanted = set(nodes)
    values: dict[fx.Node, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                values[n] = _subsample(out.detach().reshape(-1, out.shape[-1]))
            return out

    with torch.no_grad():
        outputs = Recorder(gm).run(*runnable_inputs(gm, example_inputs))
    return values, outputs


def _subsample(x: torch.Tensor, rows: int = SAMPLE_ROWS) -> torch.Tensor:
    """The quarter of ``rows`` with the largest |x| plus a seeded random rest (float64)."""
    x = x.to(torch.float64).cpu()
    if x.shape[0] <= rows:
        return x
    top = x.abs().amax(dim=1).topk(rows // 4).indices
    mask = torch.ones(x.shape[0], dtype=torch.bool)
    mask[top] = False
    rest = mask.nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(0)
    pick = rest[torch.randperm(rest.numel(), generator=gen)[: rows - top.numel()]]
    return x[torch.cat([top, pick]).sort().values]
