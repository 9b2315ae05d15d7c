"""``Report.plot(folder)``: the explain report's per-site quantities as PNG charts.

matplotlib is an optional extra (``pip install lowbit[plot]``). The charts are
drawn on ``matplotlib.figure.Figure`` objects rendered by the Agg canvas: pyplot
is never imported, so no window opens and the user's backend, open figures and
rc settings stay as they were.

One PNG per quantity, written to ``folder`` (created if needed):

- ``outlier_channels.png``: outlier channels per site (the columns int8-mixed spreads
  over int8 copies);
- ``act_absmax.png``: the calibration sample's max |x| at each site's input, before
  (dashed, hollow) and after (solid) the input transforms (smoothing, rotations), log
  scale; the recipes with low-bit activations (w4a4-, w6a6-, w4a8-...) record it;
- ``weight_sqnr.png``: weight SQNR in dB (quantized weight against the original);
- ``bits_per_weight.png``: weight storage per weight, scales and zero points included.

The x axis is the layer index when the sites' names carry one
(``model.layers.7.mlp.down_proj.weight`` -> layer 7), with one series per kind of
projection (``q_proj`` ... ``down_proj``, the name's last component); sites outside
the layers (``lm_head``) follow the last layer, labelled by name. Otherwise the x axis
is the site's index in graph order. Where a layer holds several sites of one kind
(MoE experts) the line goes through their mean; kinds whose values coincide (q/k/v read
one input) are drawn once, labelled together. Sites left in full precision are drawn as
black crosses (at the bottom edge where they have no value), a missing value leaves a
gap, and a chart with nothing to draw says why.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import Report, SiteRow

INSTALL_HINT = (
    "Report.plot needs matplotlib, an optional extra of lowbit: pip install 'lowbit[plot]'"
)

FILES = ("outlier_channels", "act_absmax", "weight_sqnr", "bits_per_weight")

_SUFFIX = re.compile(r"(\.(weight|bias))?(\[\d+\])?$")  # "...q_proj.weight", "...gate_up_proj[3]"
_MAX_SERIES = 20  # more kinds of site than this: one series, no legend per kind
_FP_STYLE = dict(marker="x", color="black", s=36, linewidths=1.4, zorder=5)


def _matplotlib():
    try:
        import matplotlib  # noqa: F401 - first: a hidden matplotlib hides its cached submodules
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    return Figure, FigureCanvasAgg, MaxNLocator


@dataclass
class _Layout:
    """Where each site sits on the x axis and which series it belongs to."""

    x: list[float]
    series: list[str]  # one label per site
    xlabel: str
    ticks: list[float] | None  # None: integer ticks chosen by matplotlib
    ticklabels: list[str] | None
    width: int  # number of x positions


def _split(fqn: str) -> tuple[str, int | None, str]:
    """``model.layers.7.self_attn.q_proj.weight`` -> ("model.layers", 7, "self_attn.q_proj")."""
    parts = _SUFFIX.sub("", fqn).split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i]), int(p), ".".join(parts[i + 1 :])
    return "", None, ".".join(parts)


def _short_names(paths: list[str]) -> dict[str, str]:
    """The last component of each path where that is unambiguous, else the whole path."""
    last = defaultdict(set)
    for p in paths:
        last[p.rsplit(".", 1)[-1]].add(p)
    return {p: (p.rsplit(".", 1)[-1] if len(last[p.rsplit(".", 1)[-1]]) == 1 else p) for p in paths}


def _layout(sites: list[SiteRow]) -> _Layout:
    split = [_split(r.fqn) for r in sites]
    layered = [s for s in split if s[1] is not None]
    stacks = list(dict.fromkeys(prefix for prefix, _, _ in layered))
    if len(layered) * 2 < len(sites) or len(stacks) > 1 or not layered:
        # few sites inside numbered layers (or several stacks of them): graph order
        names = _short_names([s[2] for s in split])
        series = [names[s[2]] for s in split]
        return _Layout(
            x=list(range(len(sites))),
            series=series if len(set(series)) <= _MAX_SERIES else ["sites"] * len(sites),
            xlabel="site (graph order)",
            ticks=None,
            ticklabels=None,
            width=len(sites),
        )
    n_layers = max(i for _, i, _ in layered) + 1
    outside = list(dict.fromkeys(s[2] for s in split if s[1] is None))  # lm_head, ...
    slot = {name: n_layers + k for k, name in enumerate(outside)}
    names = _short_names(list(dict.fromkeys(s[2] for s in split)))
    series = [names[path] for _, _, path in split]
    x = [float(i) if i is not None else float(slot[path]) for _, i, path in split]
    step = max(1, math.ceil(n_layers / 16))
    ticks = [float(i) for i in range(0, n_layers, step)] + [float(v) for v in slot.values()]
    labels = [str(i) for i in range(0, n_layers, step)] + list(slot)
    return _Layout(
        x=x,
        series=series if len(set(series)) <= _MAX_SERIES else ["sites"] * len(sites),
        xlabel="layer",
        ticks=ticks,
        ticklabels=labels,
        width=n_layers + len(outside),
    )


def _join(kinds: list[str]) -> str:
    """Labels of kinds drawn as one series, three to a line."""
    return ",\n".join(", ".join(kinds[i : i + 3]) for i in range(0, len(kinds), 3))


def _mean(vs: list[float]) -> float:
    return sum(vs) / len(vs) if vs else float("nan")


def _num(v) -> float:
    return float("nan") if v is None or not math.isfinite(float(v)) else float(v)


class _Plotter:
    def __init__(self, report: Report) -> None:
        self.Figure, self.Canvas, self.MaxNLocator = _matplotlib()
        self.report = report
        self.sites = list(report.sites)
        self.layout = _layout(self.sites) if self.sites else None
        kinds = list(dict.fromkeys(self.layout.series)) if self.layout else []
        palette = _palette(len(kinds))
        self.color = {k: palette[i] for i, k in enumerate(kinds)}
        self.kinds = kinds
        schemes = sorted({r.scheme for r in self.sites if r.fp_reason is None})
        self.subtitle = (
            f"{len(self.sites)} sites"
            + (f", {', '.join(schemes)}" if schemes else "")
            + (f", target {report.target}" if report.target else "")
        )

    def figure(self, title: str, ylabel: str):
        width = 7.5 if not self.layout else min(18.0, max(7.5, 4.5 + 0.22 * self.layout.width))
        fig = self.Figure(figsize=(width, 4.2), dpi=110, layout="constrained")
        self.Canvas(fig)
        ax = fig.add_subplot()
        ax.set_title(f"{title}\n{self.subtitle}", fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3, linewidth=0.6)
        if self.layout:
            ax.set_xlabel(self.layout.xlabel)
            if self.layout.ticks is not None:
                ax.set_xticks(self.layout.ticks, self.layout.ticklabels)
                for label in ax.get_xticklabels():
                    if not label.get_text().isdigit():
                        label.set_rotation(30)
                        label.set_horizontalalignment("right")
            else:
                ax.xaxis.set_major_locator(self.MaxNLocator(integer=True))
            ax.set_xlim(-0.6, self.layout.width - 0.4)
        return fig, ax

    def series(self, values: list[float], ax, *, style: str = "-", hollow: bool = False,
               label: bool = True) -> None:  # fmt: skip
        """One line per projection kind through its quantized sites' values (the mean
        where a layer holds several, e.g. experts), a marker per site. Kinds whose values
        coincide (q/k/v read one input) are drawn once, labelled together."""
        by_kind: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for x, kind, v, r in zip(self.layout.x, self.layout.series, values, self.sites):
            by_kind[kind].append((x, float("nan") if r.fp_reason is not None else v))
        drawn: dict[tuple, list[str]] = {}
        for kind in self.kinds:
            pts = tuple(sorted((x, v) for x, v in by_kind[kind] if not math.isnan(v)))
            if pts:
                drawn.setdefault(pts, []).append(kind)
        for pts, kinds in drawn.items():
            xs = sorted({x for x, _ in pts})
            mean = [_mean([v for px, v in pts if px == x]) for x in xs]
            # a gap where the kind has no value (a layer left in full precision)
            xs_all = sorted({x for x, _ in by_kind[kinds[0]]})
            ys_all = [mean[xs.index(x)] if x in xs else float("nan") for x in xs_all]
            c = self.color[kinds[0]]
            ax.plot(xs_all, ys_all, style, color=c, linewidth=1.2, alpha=0.9,
                    label=_join(kinds) if label else None)  # fmt: skip
            ax.scatter([x for x, _ in pts], [v for _, v in pts], s=14, zorder=3, edgecolors=c,
                       facecolors="none" if hollow else c, linewidths=1.0)  # fmt: skip

    def mark_fp(self, ax, values: list[float]) -> None:
        """Black crosses on the full-precision sites: at their value, or at the bottom edge."""
        fp = [i for i, r in enumerate(self.sites) if r.fp_reason is not None]
        if not fp:
            return
        at = [(self.layout.x[i], values[i]) for i in fp if not math.isnan(values[i])]
        edge = [self.layout.x[i] for i in fp if math.isnan(values[i])]
        reasons = sorted({self.sites[i].fp_reason for i in fp})
        label = f"full precision ({len(fp)} site{'s' if len(fp) > 1 else ''})" + (
            ":\n" + textwrap.fill(reasons[0], 40) if len(reasons) == 1 else ""
        )
        if at:
            ax.scatter(*zip(*at), label=label, **_FP_STYLE)
            label = None
        if edge:
            ax.scatter(edge, [0.02] * len(edge), transform=ax.get_xaxis_transform(),
                       clip_on=False, label=label, **_FP_STYLE)  # fmt: skip

    def finish(self, fig, ax, path: Path, empty: str | None = None) -> Path:
        if empty is not None and not self.sites:
            ax.set_xticks([])
        if empty:
            ax.set_yticks([])  # nothing drawn: a scale would only mislead
            ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center",
                    color="0.35", wrap=True)  # fmt: skip
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        fig.savefig(path)
        return path

    def simple(self, path: Path, title: str, ylabel: str, get: Callable[[SiteRow], float | None],
               *, missing: str, ymin: float | None = None, zero: str | None = None) -> Path:  # fmt: skip
        fig, ax = self.figure(title, ylabel)
        if not self.sites:
            return self.finish(fig, ax, path, "no linear sites in this report")
        values = [_num(get(r)) for r in self.sites]
        if zero is not None and not any(v for v in values if not math.isnan(v)):
            values = [float("nan")] * len(values)  # nothing to draw but the message
            missing = zero
        self.series(values, ax)
        self.mark_fp(ax, values)
        have = [v for v in values if not math.isnan(v)]
        if ymin is not None and have:
            ax.set_ylim(bottom=ymin, top=max(max(have) * 1.08, ymin + 1))
        return self.finish(fig, ax, path, None if have else missing)

    def act_absmax(self, path: Path) -> Path:
        fig, ax = self.figure(
            "Activation max |x| at the site's input,\nbefore (dashed, hollow) and after (solid)"
            " its input transforms",
            "max |x| (log scale)",
        )
        if not self.sites:
            return self.finish(fig, ax, path, "no linear sites in this report")

        def pos(v):
            v = _num(v)
            return v if v > 0 else float("nan")

        before = [pos(r.act_absmax_before) for r in self.sites]
        after = [pos(r.act_absmax_after) for r in self.sites]
        have = [v for v in before + after if not math.isnan(v)]
        if have:
            ax.set_yscale("log")
            self.series(before, ax, style="--", hollow=True, label=False)
            self.series(after, ax)
            self.mark_fp(ax, [a if not math.isnan(a) else b for a, b in zip(after, before)])
        return self.finish(
            fig, ax, path,
            None if have else "no site records activation magnitudes\n(the recipes with "
            "low-bit activations do: w4a4-, w6a6-, w4a8-...)",
        )  # fmt: skip


def _palette(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_report(report: Report, folder) -> list[Path]:
    """Write the report's charts as PNG files into ``folder``; return their paths
    (see this module's docstring for what each shows)."""
    p = _Plotter(report)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = [
        p.simple(folder / "outlier_channels.png", "Outlier channels per site", "outlier channels",
                 lambda r: len(r.outlier_channels or ()), missing="", ymin=0,
                 zero="no site has outlier channels\n(int8-mixed spreads them over int8 copies)"),
        p.act_absmax(folder / "act_absmax.png"),
        p.simple(folder / "weight_sqnr.png", "Weight SQNR (quantized against original weight)",
                 "SQNR (dB)", lambda r: r.weight_sqnr_db,
                 missing="no site records a weight SQNR"),
        p.simple(folder / "bits_per_weight.png", "Weight storage per weight (scales included)",
                 "bits per weight", lambda r: r.bits_per_weight,
                 missing="no quantized weights", ymin=0),
    ]  # fmt: skip
    return out
