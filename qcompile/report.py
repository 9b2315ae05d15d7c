"""The explain report: one row per linear site, plus what stayed in full precision and why."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class SiteRow:
    fqn: str
    in_features: int
    out_features: int
    scheme: str  # recipe applied ("fp" when the site stays in full precision)
    outlier_channels: list[int]
    weight_sqnr_db: float | None
    fp_reason: str | None = None  # why the site is not quantized
    bits_per_weight: float | None = None  # weight storage incl. scales (None: full precision)
    method: str | None = None
    graph: int = 0
    transforms: str | None = None  # input transforms (smooth, rotate): fused or online
    act_absmax_before: float | None = None  # max |x| on the calibration sample, before them
    act_absmax_after: float | None = None  # ... and after them
    outlier_rule: str | None = None  # the limit that chose the outlier channels (int8-mixed)
    outlier_copies: list[int] = field(default_factory=list)  # int8 copies per outlier channel


@dataclass
class Report:
    sites: list[SiteRow] = field(default_factory=list)
    unsupported: list[tuple[str, str]] = field(default_factory=list)  # linear calls not bound
    pass_times: dict[str, float] = field(default_factory=dict)  # seconds, summed over graphs
    pass_rewrites: dict[str, int] = field(default_factory=dict)
    target: str = ""
    calibration: str = ""
    graphs: int = 1
    # bytes: fp_bytes_replaced (fp linear weights the graph no longer reads),
    # quantized_bytes (its quantized constants), freed_bytes (of the former, released)
    memory: dict[str, int] = field(default_factory=dict)
    # embedding lookups rewritten to read a tied, quantized weight (quantize_embedding)
    embeddings: list[str] = field(default_factory=list)
    graph_indices: list[int] = field(default_factory=list)  # the graphs merged here
    # what the passes chose for the user that a site row does not show (e.g. a MoE expert
    # no calibration token reached, quantized without statistics)
    notes: list[str] = field(default_factory=list)
    # the model's matmul weights: quantized / full precision / never seen
    # (qcompile.model_report, qcompile.explain; a qcompile.coverage.Coverage)
    coverage: Any = None

    @property
    def quantized(self) -> list[SiteRow]:
        return [r for r in self.sites if r.fp_reason is None]

    @property
    def left_in_fp(self) -> Counter:
        """Reason -> number of sites (and unbound linear calls) left in full precision."""
        c = Counter(r.fp_reason for r in self.sites if r.fp_reason is not None)
        c.update(reason for _, reason in self.unsupported)
        return c

    @property
    def pass_seconds(self) -> float:
        return sum(self.pass_times.values())

    @classmethod
    def merge(cls, reports: list[Report]) -> Report:
        out = cls(graphs=len(reports))
        for r in reports:
            out.sites += r.sites
            out.unsupported += r.unsupported
            out.embeddings += r.embeddings
            out.notes += r.notes
            out.graph_indices += r.graph_indices
            for k, v in r.pass_times.items():
                out.pass_times[k] = out.pass_times.get(k, 0.0) + v
            for k, v in r.pass_rewrites.items():
                out.pass_rewrites[k] = out.pass_rewrites.get(k, 0) + v
            for k, v in r.memory.items():
                out.memory[k] = out.memory.get(k, 0) + v
            out.target = out.target or r.target
            out.calibration = out.calibration or r.calibration
        return out

    def plot(self, folder) -> list:
        """Write charts of the per-site quantities (outlier channels, activation max |x|
        before / after the transforms, weight SQNR, bits per weight) as PNG files into
        ``folder``; return their paths. Needs matplotlib (``pip install 'lowbit[plot]'``);
        see ``qcompile.report_plot``."""
        from .report_plot import plot_report

        return plot_report(self, folder)

    def to_json(self) -> str:
        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v

        rows = [{k: clean(v) for k, v in asdict(r).items()} for r in self.sites]
        return json.dumps(
            {
                "target": self.target,
                "calibration": self.calibration,
                "graphs": self.graphs,
                "sites": rows,
                "unsupported": self.unsupported,
                "left_in_fp": dict(self.left_in_fp),
                "pass_times_s": self.pass_times,
                "pass_rewrites": self.pass_rewrites,
                "memory": self.memory,
                "embeddings": self.embeddings,
                "notes": self.notes,
                "coverage": None if self.coverage is None else self.coverage.as_dict(),
            },
            indent=1,
        )

    def summary(self) -> str:
        n, q = len(self.sites) + len(self.unsupported), len(self.quantized)
        lines = self.coverage.lines() if self.coverage is not None else []
        lines.append(f"lowbit: {q} of {n} linear sites quantized (target {self.target})")
        for reason, count in sorted(self.left_in_fp.items()):
            lines.append(f"  left in full precision: {count} x {reason}")
        for line in dict.fromkeys(self.embeddings):
            lines.append(f"  embedding: {line}")
        if self.notes:
            shown = list(dict.fromkeys(self.notes))
            lines += [f"  note: {line}" for line in shown[:4]]
            if len(shown) > 4:
                lines.append(f"  note: ... ({len(shown) - 4} more in report.notes)")
        if self.memory.get("fp_bytes_replaced"):
            m = self.memory
            lines.append(
                f"  memory: {_mib(m['fp_bytes_replaced'])} of fp linear weights replaced by "
                f"{_mib(m.get('quantized_bytes', 0))} of quantized constants; "
                f"{_mib(m.get('freed_bytes', 0))} of them released"
                + ("" if m.get("freed_bytes") else " (options['free_weights'] releases them)")
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        head = ("site", "in", "out", "scheme", "#outl", "outlier channels", "w SQNR dB")
        rules = any(r.outlier_rule for r in self.sites)
        body = []
        for r in self.sites:
            ch = ",".join(map(str, r.outlier_channels[:6])) + (
                ",…" if len(r.outlier_channels) > 6 else ""
            )
            sq = "" if r.weight_sqnr_db is None else f"{r.weight_sqnr_db:.1f}"
            scheme = r.scheme if r.fp_reason is None else f"fp ({r.fp_reason})"
            body.append(
                (r.fqn, str(r.in_features), str(r.out_features), scheme,
                 str(len(r.outlier_channels)), ch, sq)
            )  # fmt: skip
        if rules:  # int8-mixed: which limit chose the columns, how many int8 columns they add
            head += ("copies", "outlier rule")
            body = [
                row + (_copies_cell(r.outlier_copies), r.outlier_rule or "")
                for row, r in zip(body, self.sites)
            ]
        if any(r.transforms or r.act_absmax_before is not None for r in self.sites):
            head += ("max|x| before>after", "transforms")  # low-bit recipes (DuQuant, ...)
            body = [row + _transform_cells(r) for row, r in zip(body, self.sites)]
        left = [i for i, h in enumerate(head) if h in _LEFT_ALIGNED]
        widths = [max(len(x) for x in col) for col in zip(head, *body)]
        fmt = "  ".join(f"{{:{'<' if i in left else '>'}{w}}}" for i, w in enumerate(widths))
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*row) for row in body]
        lines += ["", self.summary()]
        if self.pass_times:
            lines.append(
                "  pass time: "
                + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in self.pass_times.items())
            )
        return "\n".join(lines)


def _copies_cell(copies: list[int]) -> str:
    """``+E (max m)``: the int8 columns the outlier copies add, and the most copies."""
    return f"+{sum(copies) - len(copies)} (max {max(copies)})" if copies else ""


_LEFT_ALIGNED = ("site", "scheme", "outlier channels", "transforms", "outlier rule")


def _transform_cells(r: SiteRow) -> tuple[str, str]:
    def num(v):
        return "" if v is None else f"{v:.3g}"

    mags = num(r.act_absmax_before)
    if r.act_absmax_after is not None:
        mags += f">{num(r.act_absmax_after)}"
    return mags, r.transforms or ""


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"
