"""What the process holds, and why: resident memory by owner (``qcompile.memory_report``).

Invariant: every CPU tensor storage is counted once, under the first owner that holds it
in this order: the model's parameters and buffers (split into those in the process's own
memory and those still mapped from a checkpoint file), lowbit's stored products
(``qcompile.artifacts``), the layouts lowerings derived from them (prepacked kernels'
operands), the constants of the graphs lowbit compiled, calibration statistics, and any
other tensor Python can reach. What the live RSS holds beyond these (Python objects,
compiled code, libraries loaded after the baseline, allocator slack) is the stated
remainder. Linux gives the exact figures (``/proc/self``); elsewhere RSS is not read.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import gc
import resource
import sys
import weakref
from dataclasses import dataclass, field

import torch

# graphs the backend handed back, for their constants (``backend.lowbit_backend`` adds)
GRAPHS: weakref.WeakSet = weakref.WeakSet()
_LINUX = sys.platform.startswith("linux")


def _status(field_name: str) -> int | None:
    if not _LINUX:
        return None
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    return None


def _glibc():
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # not glibc
        return None


_LIBC = _glibc() if _LINUX else None  # malloc_trim, madvise


def release_free_pages() -> None:
    """Hand the allocator's free pages back to the system (glibc's ``malloc_trim``): the
    passes call it between sites, so memory freed by one site's temporaries does not stay
    resident while the next site allocates differently sized ones."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def trim() -> None:
    """Collect garbage, then :func:`release_free_pages`."""
    gc.collect()
    release_free_pages()


def live_rss() -> int | None:
    """Resident bytes after :func:`trim` (None where the platform does not say)."""
    trim()
    return _status("VmRSS")


def peak_rss() -> int:
    """The process's peak resident bytes since start or the last :func:`reset_peak`."""
    hwm = _status("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Restart the peak at the current RSS (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# RSS when qcompile was imported: memory_report's default baseline
BASELINE_RSS = live_rss()


def file_mapped_ranges() -> list[tuple[int, int, str]]:
    """``(start, end, path)`` of the process's mappings of regular files (Linux)."""
    if not _LINUX:
        return []
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or not parts[5].startswith("/"):
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end, parts[5].strip()))
    return out


def in_ranges(t: torch.Tensor, ranges) -> bool:
    """Whether ``t``'s first element lies in one of the ``ranges``."""
    if t.device.type != "cpu" or t.numel() == 0:
        return False
    return any(a <= t.data_ptr() < b for a, b, _ in ranges)


_KEEP_MAPPED = contextvars.ContextVar("lowbit_keep_mapped", default=False)


@contextlib.contextmanager
def keep_file_mappings():
    """Within it, ``release_file_mappings`` copies nothing: the caller keeps reading the
    file and gives pages back itself (``quantize_sequential``'s checkpoint)."""
    token = _KEEP_MAPPED.set(True)
    try:
        yield
    finally:
        _KEEP_MAPPED.reset(token)


def release_file_mappings(module: torch.nn.Module) -> int:
    """Copy every parameter and buffer of ``module`` that still lives in a mapped file
    (a checkpoint ``from_pretrained`` mapped) into the process's own memory, so the
    mapping closes once the released weights were its other users; returns the bytes
    copied. Values, dtypes, shapes and parameter identity are unchanged."""
    ranges = file_mapped_ranges() if not _KEEP_MAPPED.get() else []
    if not ranges:
        return 0
    from . import artifacts

    copied = 0
    for t in [*module.parameters(), *module.buffers()]:
        if in_ranges(t, ranges):
            before = artifacts.fingerprint(t)
            t.data = t.data.clone()
            for art in artifacts.artifacts_of(t):  # same values: its products still hold
                if art.fingerprint == before:
                    art.fingerprint = artifacts.fingerprint(t)
            copied += t.untyped_storage().nbytes()
    return copied


_MADV_PAGEOUT = 21  # Linux >= 5.4: reclaim the pages now (clean file pages are dropped)
_PAGE = 4096


def drop_file_pages(t: torch.Tensor, ranges=None) -> int:
    """Ask the kernel to reclaim the resident pages of ``t`` where it lies in a mapped
    file (a checkpoint's weight once quantized, with ``free_weights``): a clean page is
    read from the file again if anything reads it, a page the process wrote is kept.
    Returns the bytes advised (0 where ``t`` is not file-mapped or the call fails).
    ``ranges``: ``file_mapped_ranges()`` when the caller read them once for many."""
    if _LIBC is None or not t.is_contiguous():
        return 0
    if not in_ranges(t, file_mapped_ranges() if ranges is None else ranges):
        return 0
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    first, last = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE  # whole pages inside
    if last <= first:
        return 0
    ok = _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_PAGEOUT)
    return last - first if ok == 0 else 0


# the report --------------------------------------------------------------------------


@dataclass
class MemoryReport:
    """Bytes by owner (``rows``: owner -> (bytes, tensors)), the live RSS above the
    baseline, and what the rows do not explain (``remainder``)."""

    rows: dict[str, tuple[int, int]] = field(default_factory=dict)
    rss_above_baseline: int | None = None
    baseline: int | None = None

    @property
    def counted(self) -> int:
        return sum(b for b, _ in self.rows.values())

    @property
    def remainder(self) -> int | None:
        if self.rss_above_baseline is None:
            return None
        return self.rss_above_baseline - self.counted

    def summary(self) -> str:
        mib = 2**20
        lines = ["lowbit memory (MiB)"]
        for owner, (nbytes, count) in self.rows.items():
            lines.append(f"  {owner:<52} {nbytes / mib:9.2f}  ({count} tensors)")
        lines.append(f"  {'counted':<52} {self.counted / mib:9.2f}")
        if self.rss_above_baseline is not None:
            lines.append(
                f"  {'live RSS above the baseline':<52} {self.rss_above_baseline / mib:9.2f}"
            )
            lines.append(
                f"  {'remainder (Python objects, code, libraries, slack)':<52} "
                f"{self.remainder / mib:9.2f}"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


OWNERS = (
    "model parameters and buffers",
    "model parameters mapped from a file (resident where read)",
    "lowbit stored products",
    "lowbit derived kernel layouts",
    "compiled graph constants",
    "calibration statistics",
    "other tensors",
)


def memory_report(model: torch.nn.Module | None = None, baseline: int | None = None):
    """Where the live memory goes: see the module docstring. ``baseline``: RSS bytes to
    measure from (default: the RSS when qcompile was imported)."""
    from qcompile import artifacts
    from qcompile.calibration import Calibration
    from qcompile.lowering import derived

    ranges = file_mapped_ranges()
    seen: set[int] = set()
    rows = {owner: [0, 0] for owner in OWNERS}

    def count(owner: str, tensors) -> None:
        for t in tensors:
            storage = _cpu_storage(t)
            if storage is None or storage.data_ptr() in seen:
                continue
            seen.add(storage.data_ptr())
            rows[owner][0] += storage.nbytes()
            rows[owner][1] += 1

    if model is not None:
        tensors = [*model.parameters(), *model.buffers()]
        if ranges:
            count(OWNERS[1], (t for t in tensors if in_ranges(t, ranges)))
        count(OWNERS[0], tensors)
    arts = [a for per_param in list(artifacts.REGISTRY.values()) for a in per_param.values()]
    count(OWNERS[2], (t for a in arts for t in a.tensors.values()))
    layouts = [d for a in arts for d in derived.layouts(a).values()]
    count(OWNERS[3], (t for d in layouts for t in _tensors(d)))
    count(OWNERS[4], (t for gm in list(GRAPHS) for t in gm.buffers()))
    gc.collect()
    objects = gc.get_objects()
    calibrations = [o for o in objects if issubclass(type(o), Calibration)]
    count(OWNERS[5], (t for c in calibrations for s in c.stats.values() for t in _tensors(s)))
    count(OWNERS[6], (o for o in objects if issubclass(type(o), torch.Tensor)))
    base = BASELINE_RSS if baseline is None else baseline
    rss = live_rss()
    return MemoryReport(
        rows={k: (v[0], v[1]) for k, v in rows.items()},
        rss_above_baseline=None if rss is None or base is None else rss - base,
        baseline=base,
    )


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from _tensors(getattr(obj, name, None))


def _cpu_storage(t: torch.Tensor):
    """``t``'s CPU storage holding memory, or None (other devices, fake or meta tensors,
    and tensors without a storage: sparse layouts raise NotImplementedError, wrapper
    subclasses such as functional tensors RuntimeError)."""
    try:
        if t.device.type != "cpu" or t.is_meta or type(t).__name__ == "FakeTensor":
            return None
        storage = t.untyped_storage()
        return storage if storage.nbytes() else None
    except (RuntimeError, NotImplementedError):
        return None
