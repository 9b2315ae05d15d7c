"""Which of a model's matmul weights lowbit quantized, left in full precision, or never saw.

Every compiled graph records (weakly, per parameter) what it did with each parameter
it read: quantized at a site, left in full precision with the reason (its recipe, an
override, a form lowbit does not rewrite), or read by something that is not a matrix
product (a norm, a position table). ``coverage(model)`` sets this against the model's
matmul-shaped parameters (2-D or more, floating point, not only an embedding or
convolution table): one never recorded was never seen by lowbit (a graph break, a part
of the model run outside the compiled function, a model not run yet).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .matmul_modules import NOT_MATMUL_OWNERS, is_matmul_module

QUANTIZED, FULL_PRECISION, NOT_A_PRODUCT = "quantized", "full precision", "not a product"
# full-precision reasons that are the user's choice or lowbit's documented default
CHOSEN = ("recipe ", "MoE router")
# parameter -> (status, reason or None, graph index); the newest graph wins, except that a
# graph reading it outside a product does not hide what another graph did at a product
SEEN: WeakIdKeyDictionary = WeakIdKeyDictionary()


def record_graph(ctx, report) -> None:
    """Note what the graph of ``ctx`` did with each parameter it reads."""
    graph = ctx.graph_index
    by_param: dict[int, tuple] = {}
    for site, row in zip(ctx.sites, report.sites):
        status = QUANTIZED if row.fp_reason is None else FULL_PRECISION
        old = by_param.get(id(site.param))
        if old is None or old[1] == QUANTIZED:  # any site in fp: the weight is kept in fp
            by_param[id(site.param)] = (site.param, status, row.fp_reason)
    for param, _, reason in ctx.unread_params:
        by_param[id(param)] = (param, FULL_PRECISION, reason)
    for param, status, reason in by_param.values():
        SEEN[param] = (status, reason, graph)
    for tensor in ctx.param_tensors:
        if id(tensor) not in by_param and tensor not in SEEN:
            SEEN[tensor] = (NOT_A_PRODUCT, None, graph)


@dataclass
class Coverage:
    """A model's matmul weights by what lowbit did with them (``(name, numel[, reason])``)."""

    quantized: list[tuple[str, int]] = field(default_factory=list)
    full_precision: list[tuple[str, int, str]] = field(default_factory=list)
    never_seen: list[tuple[str, int]] = field(default_factory=list)
    graphs: set[int] = field(default_factory=set)  # graph indices that read the model
    graph_breaks: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.quantized) + len(self.full_precision) + len(self.never_seen)

    @property
    def quantized_share(self) -> float:
        """Share of the matmul parameters (elements) that are quantized."""
        q = sum(n for _, n in self.quantized)
        everything = q + sum(n for _, n, _ in self.full_precision)
        everything += sum(n for _, n in self.never_seen)
        return q / everything if everything else 1.0

    @property
    def unexpected(self) -> list[str]:
        """Weights not quantized for a reason other than the recipe or an override."""
        out = [f"{name} ({reason})" for name, _, reason in self.full_precision
               if not reason.startswith(CHOSEN)]  # fmt: skip
        out += [f"{name} (never seen by lowbit)" for name, _ in self.never_seen]
        return out

    def as_dict(self) -> dict:
        return {
            "quantized": self.quantized,
            "full_precision": self.full_precision,
            "never_seen": self.never_seen,
            "quantized_share": self.quantized_share,
            "graph_breaks": self.graph_breaks,
        }

    def lines(self) -> list[str]:
        lines = [
            f"lowbit: quantized {len(self.quantized)} of {self.total} matmul weights, "
            f"{100 * self.quantized_share:.1f}% of matmul parameters"
        ]
        by_reason: dict[str, list[str]] = {}
        for name, _, reason in self.full_precision:
            by_reason.setdefault(reason, []).append(name)
        for reason, names in sorted(by_reason.items()):
            lines.append(f"  full precision: {len(names)} x {reason}: {_names(names)}")
        if self.never_seen:
            names = [name for name, _ in self.never_seen]
            why = (
                f" (dynamo graph breaks: {'; '.join(self.graph_breaks[:3])})"
                if self.graph_breaks
                else " (run outside the compiled function, or the model was not run yet)"
            )
            lines.append(f"  never seen by lowbit: {len(names)}: {_names(names)}{why}")
        return lines


def _names(names: list[str], shown: int = 4) -> str:
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def matmul_shaped(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` of each parameter that may be a matmul weight (first name)."""
    owners: dict[int, list[torch.nn.Module]] = {}
    for _, mod in model.named_modules(remove_duplicate=False):
        for p in mod._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(mod)
    out = []
    for name, p in model.named_parameters():
        if p.dim() < 2 or not p.is_floating_point():
            continue
        mods = owners.get(id(p), [])
        if (
            mods
            and not any(is_matmul_module(m) for m in mods)
            and all(isinstance(m, NOT_MATMUL_OWNERS) for m in mods)
        ):
            continue  # an embedding / convolution table only
        out.append((name, p))
    return out


def coverage(model: torch.nn.Module) -> Coverage:
    """What lowbit did with each of ``model``'s matmul weights, from the graphs compiled."""
    cov = Coverage()
    for name, p in matmul_shaped(model):
        seen = SEEN.get(p)
        if seen is None:
            cov.never_seen.append((name, p.numel()))
            continue
        status, reason, graph = seen
        cov.graphs.add(graph)
        if status == QUANTIZED:
            cov.quantized.append((name, p.numel()))
        elif status == FULL_PRECISION:
            cov.full_precision.append((name, p.numel(), reason))
        # NOT_A_PRODUCT: read by the graph, but not as a matrix product's weight
    for p in model.parameters():
        seen = SEEN.get(p)
        if seen is not None:
            cov.graphs.add(seen[2])
    if cov.never_seen:
        from torch._dynamo.utils import counters

        cov.graph_breaks = list(counters["graph_break"])
    return cov


class LowbitCoverageWarning(UserWarning):
    """A matmul weight of the model stays in full precision for a reason the user did not
    choose (a form lowbit does not rewrite, a graph break, a part never compiled)."""


def model_report(model: torch.nn.Module, *, warn: bool = True):
    """The merged report of the graphs lowbit compiled for ``model``, with its coverage
    (``Report.coverage``): call it after the compiled model's first call. Weights left in
    full precision for a reason other than the recipe or an override, and weights lowbit
    never saw, are a ``LowbitCoverageWarning`` (``warn=False``: not)."""
    import warnings

    from .pipeline import REPORTS
    from .report import Report

    while isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        model = model._orig_mod  # torch.compile(model) -> OptimizedModule
    cov = coverage(model)
    reports = [r for r in REPORTS if cov.graphs.intersection(r.graph_indices)]
    merged = Report.merge(reports) if reports else Report(graphs=0)
    merged.coverage = cov
    if warn and cov.unexpected:
        warnings.warn(
            "\n".join(cov.lines()) + "\n  not quantized: " + _names(cov.unexpected, 8),
            LowbitCoverageWarning,
            stacklevel=2,
        )
    return merged
