"""Progress bars and elapsed-time lines for lowbit's long steps.

Shown only on a terminal (stderr is a TTY) and unless ``LOWBIT_QUIET=1``: calibration
batches, GPTQ layers, DuQuant rotation building, perplexity windows, and the inductor
hand-off's compile time.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

from tqdm.auto import tqdm


def enabled() -> bool:
    return os.environ.get("LOWBIT_QUIET", "") in ("", "0") and sys.stderr.isatty()


def bar(iterable=None, *, total: int | None = None, desc: str, show: bool = True):
    """A tqdm bar over ``iterable`` (or updated by hand), silent unless ``enabled()``."""
    return tqdm(iterable, total=total, desc=desc, disable=not (show and enabled()), leave=False)


@contextlib.contextmanager
def elapsed(what: str):
    """``lowbit: <what> ...`` before the step and its duration after, on a terminal."""
    if not enabled():
        yield
        return
    print(f"lowbit: {what} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    print(f"lowbit: {what}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
