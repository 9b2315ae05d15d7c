"""Per-pass graph dumps for debugging (``options["debug_dir"]`` or ``LOWBIT_DEBUG_DIR``).

Layout: ``<debug_dir>/graph_<N>/<step>_<pass>.before.py`` and ``.after.py``
(readable FX code), ``passes.log`` (one line per pass: rewrites, time, nodes
added / removed / changed (retargeted, or given new ``lowbit.`` annotations), with the
linear site each belongs to) and
``report.txt`` / ``report.json`` (the explain report of this graph), and with
matplotlib installed (``pip install 'lowbit[plot]'``) its charts under ``plots/``
(``Report.plot``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from torch import fx

from qcompile.graph_utils import META_PREFIX, SITE

from .memory import release_free_pages

log = logging.getLogger("qcompile")


def _snapshot(gm: fx.GraphModule) -> dict[str, tuple]:
    """Per node: op, target, args, its site and which ``lowbit.`` annotations it carries."""
    return {
        n.name: (n.op, _target(n), repr(n.args), n.meta.get(SITE), _annotations(n))
        for n in gm.graph.nodes
    }


def _annotations(n: fx.Node) -> tuple[str, ...]:
    return tuple(sorted(k for k in n.meta if k.startswith(META_PREFIX)))


def _target(n: fx.Node) -> str:
    t = n.target
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)


def _code(gm: fx.GraphModule) -> str:
    return gm.print_readable(print_output=False, include_stride=False, include_device=False)


class PassRunner:
    """Runs passes in order, timing each and, with a debug dir, dumping each graph."""

    def __init__(self, debug_dir: str | None, graph_index: int) -> None:
        self.dir = Path(debug_dir) / f"graph_{graph_index:03d}" if debug_dir else None
        self.step = 0
        self.times: dict[str, float] = {}
        self.rewrites: dict[str, int] = {}
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "passes.log").write_text("")

    def run(self, name: str, fn, gm: fx.GraphModule, *args) -> int:
        before = _snapshot(gm) if self.dir else None
        code_before = _code(gm) if self.dir else None
        t0 = time.perf_counter()
        count = fn(gm, *args)
        self.times[name] = time.perf_counter() - t0
        release_free_pages()  # the pass's temporaries, before the next pass allocates
        self.rewrites[name] = count
        if self.dir is not None:
            self.step += 1
            stem = f"{self.step:02d}_{name}"
            (self.dir / f"{stem}.before.py").write_text(code_before)
            (self.dir / f"{stem}.after.py").write_text(_code(gm))
            with open(self.dir / "passes.log", "a") as f:
                f.write(self._describe(name, count, before, gm) + "\n")
        return count

    def _describe(self, name, count, before, gm) -> str:
        after = _snapshot(gm)
        added = [k for k in after if k not in before]
        removed = [k for k in before if k not in after]
        changed = [k for k in after if k in before and after[k] != before[k]]

        def fmt(names, snap):
            parts = []
            for k in names:
                s = f"{k}={snap[k][1]}"
                if snap[k][3]:
                    s += f"[{snap[k][3]}]"
                parts.append(s)
            return "[" + ", ".join(parts) + "]"

        return (
            f"{self.step:02d} {name}: {count} rewrites in {self.times[name] * 1e3:.1f} ms; "
            f"added {fmt(added, after)}; removed {fmt(removed, before)}; "
            f"changed {fmt(changed, after)}"
        )

    def write_report(self, report) -> None:
        if self.dir is not None:
            (self.dir / "report.txt").write_text(str(report) + "\n")
            (self.dir / "report.json").write_text(report.to_json() + "\n")
            _plot(report, self.dir / "plots")


def _plot(report, folder: Path) -> None:
    """The report's charts, where matplotlib is installed; a debug dump never fails on them."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    try:
        report.plot(folder)
    except Exception as e:  # noqa: BLE001 - the graphs and reports above are what matter
        log.warning("lowbit: debug_dir: the report's plots failed: %r", e)
