"""What the passes share: the linear sites of one graph and the compile context."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
from torch import fx

from qcompile.graph_utils import SITE

from .calibration import SiteStats
from .options import Options
from .recipes import get_recipe

# dynamo source names look like L['self']._modules['model']._parameters['weight']
_SOURCE_PART = re.compile(r"\._(?:modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_]\w*)")


@dataclass
class LinearSite:
    """One ``F.linear`` call in the graph whose weight is a bound parameter."""

    node: fx.Node
    fqn: str  # weight FQN as the calling module names it (e.g. lm_head.weight)
    param_fqn: str  # FQN of the placeholder dynamo lifted (tied weights share one)
    weight: torch.Tensor
    bias: torch.Tensor | None
    scheme: str  # recipe name chosen for this site (recipe or override)
    skip_reason: str | None = None  # why the site stays in full precision
    outlier_channels: list[int] = field(default_factory=list)
    outlier_rule: str | None = None  # why those columns (detect_outliers), for the report
    outlier_copies: list[int] = field(default_factory=list)  # int8 copies per outlier column
    weight_sqnr_db: float | None = None
    bits_per_weight: float | None = None  # storage incl. scales / zero points
    method: str | None = None  # how the weight was quantized (rtn, gptq, absmax)
    artifact: Any = None  # stored products reused for this site (qcompile.artifacts)
    products: dict = field(default_factory=dict)  # tensors computed so far, to be stored
    # equivalence transforms on the input (smooth / rotate), each tagged "fused" (folded
    # upstream, no run-time cost) or "online"; max |x| on the calibration sample before
    # and after them
    transforms: list[str] = field(default_factory=list)
    act_absmax_before: float | None = None
    act_absmax_after: float | None = None
    # the model's parameter (``weight`` becomes a folded copy once smooth / rotate fold
    # into it); qcompile.artifacts keys a site's products by it
    param: torch.Tensor | None = None
    # smooth / rotate leave the weight alone: the site's final products (or its folded
    # weight) are reused from qcompile.artifacts (passes/_plans.py)
    keep_weight: bool = False
    # how ``param`` holds the weight: "out_in" (``weight`` is ``param``) or "in_out"
    # (``weight`` is ``param.t()``: GPT-2's Conv1D); qcompile.matmul_modules
    layout: str = "out_in"
    # the parameter in the [out, in] layout (``param`` or its transposed view): while
    # ``weight`` is this tensor, nothing was folded into it
    param_weight: torch.Tensor | None = None
    # a Mixture-of-Experts site: the expert's index in ``param`` ([E, ...]); ``weight``
    # is that expert's matrix (passes/_expert_sites.py)
    expert: int | None = None

    def __post_init__(self) -> None:
        if self.param is None:
            self.param = self.weight
        if self.param_weight is None:
            self.param_weight = self.weight

    @property
    def unfolded(self) -> bool:
        """The site computes with its parameter as it is (no transform folded in)."""
        return self.weight is self.param_weight

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def module_fqn(self) -> str:
        return self.fqn.rsplit(".", 1)[0] if "." in self.fqn else ""


@dataclass
class PassContext:
    """State of one backend invocation (one dynamo graph)."""

    options: Options
    graph_index: int
    sites: list[LinearSite] = field(default_factory=list)
    param_fqns: dict[str, str] = field(default_factory=dict)  # placeholder name -> FQN
    param_tensors: list = field(default_factory=list)  # every parameter the graph reads
    dataflow: nx.DiGraph = field(default_factory=nx.DiGraph)
    stats: dict[str, SiteStats] = field(default_factory=dict)  # site fqn -> stats
    stats_source: str = ""
    target: str = "cpu"
    unsupported: list[tuple[str, str]] = field(default_factory=list)  # (node or fqn, reason)
    # parameters read by a matrix product lowbit does not quantize: (tensor, FQN, reason)
    unread_params: list[tuple] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)  # tied lookups of quantized weights
    notes: list[str] = field(default_factory=list)  # choices made for the user (Report.notes)
    # options["verify"]: (example inputs, outputs of the graph before the exact passes)
    verify_reference: tuple | None = None
    # the transform passes' stored / reused plans (passes/_plans.py: PlanState)
    plans: Any = None

    def sites_of(self, *families: str) -> list[LinearSite]:
        """The sites to quantize whose recipe is of one of ``families``
        (``qcompile.recipes``): how a quantizing pass picks the sites it acts on."""
        return [
            s
            for s in self.sites
            if s.skip_reason is None and get_recipe(s.scheme).family in families
        ]

    def site_of(self, node: fx.Node) -> LinearSite | None:
        fqn = node.meta.get(SITE)
        return next((s for s in self.sites if s.fqn == fqn and s.node is node), None)


#: the frame's root module in a dynamo source name: ``L['self']``, or ``L['args'][0]``
#: when the module reaches the frame positionally (a deep-copied Hugging Face model: its
#: forward wrapper takes ``*args``); groups: the local's name, the index
SOURCE_ROOT = re.compile(r"^L\['([^']+)'\](?:\[(\d+)\])?")


def fqn_from_source(source_name: str) -> str | None:
    """``L['self']._modules['model']._parameters['weight']`` -> ``model.weight``.

    The root local may have any name (``self``, ``fn`` for a compiled ``nn.Sequential``,
    a forward whose receiver is not called ``self``) and be indexed (``L['args'][0]``).
    """
    root = SOURCE_ROOT.match(source_name)
    if root is None:
        return None
    rest = source_name[root.end() :]
    parts = []
    pos = 0
    while pos < len(rest):
        m = _SOURCE_PART.match(rest, pos)
        if m is None:
            return None
        parts.append(m.group(1) or m.group(2))
        pos = m.end()
    if parts and parts[0] == "_orig_mod":  # torch.compile(OptimizedModule) wrappers
        parts = parts[1:]
    return ".".join(parts) or None


def frame_root(source_name: str | None = None) -> torch.nn.Module | None:
    """The module the graph dynamo is compiling calls its parameters through
    (``L['self']``, or ``L['args'][0]`` for a deep-copied HF model), named by a
    parameter's source (default: ``L['self']``); None outside a dynamo compile."""
    m = SOURCE_ROOT.match(source_name or "L['self']")
    tx = _root_tx()
    root = tx.f_locals.get(m.group(1)) if (m and tx is not None) else None
    if root is not None and m.group(2) is not None:
        try:
            root = root[int(m.group(2))]
        except (IndexError, KeyError, TypeError):
            return None
    return root if isinstance(root, torch.nn.Module) else None


def frame_is_resume() -> bool:
    """Whether dynamo is compiling the rest of a function after a graph break (its
    parameters are named from the function's own module, not the model's root)."""
    tx = _root_tx()
    return tx is not None and tx.f_code.co_name.startswith("torch_dynamo_resume_in_")


def _root_tx():
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx().output.root_tx
    except Exception:  # not called by dynamo (e.g. a captured graph re-run in tests)
        return None


def module_fqn_from_stack(node: fx.Node) -> tuple[str, type] | None:
    """Innermost module of ``node.meta['nn_module_stack']`` as (fqn, class)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, cls = list(stack.values())[-1]
    root = SOURCE_ROOT.match(path)
    if root is None:
        return None
    path = path[root.end() :].lstrip(".")
    # dynamo writes nested names as attribute paths, with indices as .0 or [0]
    path = re.sub(r"\[['\"]?([^\]'\"]+)['\"]?\]", r".\1", path).lstrip(".")
    if path.startswith("_orig_mod."):
        path = path[len("_orig_mod.") :]
    return path, cls
