"""Build and load lowbit's C++ ops with inductor's C++ builder: its compiler flags for this
CPU, and its on-disk cache, so a source is compiled once per machine (about 15 s) and each
later process loads the library. Loading registers the ops' CPU kernels with the
dispatcher (their schemas and fakes are defined in Python next to the source)."""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

from .reference import EPS

_LOCAL_INCLUDE = re.compile(r'^#include "([\w.]+\.h)"$', re.MULTILINE)


def load(source: Path, probe: str) -> ctypes.CDLL:
    """The library built from ``source`` (``LOWBIT_EPS`` defined as the reference's absmax
    floor; its ``#include "name.h"`` lines of headers next to it replaced by their text, as
    the builder compiles a string elsewhere); ``probe`` names an ``extern "C" int`` function
    of it. Raises inductor's CppCompileError where it cannot be built."""
    from torch._inductor.codecache import CppCodeCache

    text = _LOCAL_INCLUDE.sub(lambda m: source.with_name(m[1]).read_text(), source.read_text())
    lib = CppCodeCache.load(f"#define LOWBIT_EPS {float(EPS)!r}f\n" + text)
    getattr(lib, probe).restype = ctypes.c_int
    return lib


def builds(library) -> bool:
    """Whether ``library()`` builds and loads here (else its caller keeps another path)."""
    try:
        library()
    except Exception:  # noqa: BLE001 - no compiler, or one that rejects the source
        return False
    return True
