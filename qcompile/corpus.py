"""Text of several kinds that ships with CPython, for calibration and cross-kind evaluation.

A recipe calibrated on one kind of text must hold on others, so evaluation needs text
unlike the calibration text. Every kind here is read from the Python standard library
installed with the interpreter (nothing is downloaded):

* ``reference``: ``pydoc_data.topics``, the language reference's help topics (the dev
  text of :mod:`qcompile.perplexity`);
* ``docstrings``: module, class and function docstrings of :data:`DOCSTRING_MODULES`;
* ``code``: the source of :data:`CODE_MODULES` (disjoint from the docstring modules, so
  the two kinds share no text);
* ``legal``: CPython's ``LICENSE.txt`` (about 3800 tokens: evaluation only).

Each kind is tokenized as one stream. Evaluation reads its FIRST tokens
(:func:`eval_tokens`); calibration reads from its END and never touches the first
``reserve`` tokens (:func:`calibration_batches`), so the two never overlap. The texts
depend on the Python version (docstrings and sources change between releases).
"""

from __future__ import annotations

import importlib
import inspect
import os
from functools import cache

import torch

from .perplexity import PERPLEXITY_RESERVE, _encode, dev_text

KINDS = ("reference", "docstrings", "code", "legal")
#: kinds long enough to calibrate on after the evaluation reserve
CALIBRATION_KINDS = ("reference", "docstrings", "code")

DOCSTRING_MODULES = (
    "argparse", "asyncio", "bisect", "collections", "contextlib", "csv", "dataclasses",
    "datetime", "decimal", "email", "fractions", "functools", "heapq", "http.client",
    "json", "logging", "pathlib", "queue", "random", "re", "shutil", "statistics",
    "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest",
    "zipfile",
    # appended later (the evaluation tokens, read from the start, are unchanged)
    "inspect", "pickle", "socket", "sqlite3", "urllib.parse", "urllib.request",
    "xml.etree.ElementTree", "optparse", "gettext", "locale", "smtplib", "mailbox",
    "numbers", "enum", "weakref", "tokenize", "traceback", "warnings", "base64", "hmac",
    "uuid", "sched", "selectors", "glob", "tempfile", "shlex", "cmd", "copy", "doctest",
    "pdb", "timeit", "colorsys", "ipaddress", "plistlib", "netrc", "mimetypes",
)  # fmt: skip
CODE_MODULES = ("difflib", "ast", "calendar", "pprint", "configparser", "imaplib")


def _docstrings() -> str:
    parts = []
    for name in DOCSTRING_MODULES:
        module = importlib.import_module(name)
        if module.__doc__:
            parts.append(inspect.cleandoc(module.__doc__))
        for attr, obj in sorted(vars(module).items()):
            own = getattr(obj, "__module__", None) == module.__name__
            if attr.startswith("_") or not own or not obj.__doc__:
                continue
            if inspect.isclass(obj) or inspect.isfunction(obj):
                parts.append(f"{attr}: {inspect.cleandoc(obj.__doc__)}")
    return "\n\n".join(parts)


def _code() -> str:
    return "\n\n".join(inspect.getsource(importlib.import_module(m)) for m in CODE_MODULES)


def _legal() -> str:
    path = os.path.join(os.path.dirname(os.__file__), "LICENSE.txt")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"the 'legal' text is CPython's LICENSE.txt, which this installation lacks ({path}); "
            f"use another kind: {', '.join(k for k in KINDS if k != 'legal')}"
        )
    with open(path, encoding="utf-8") as f:
        return f.read()


_SOURCES = {"reference": dev_text, "docstrings": _docstrings, "code": _code, "legal": _legal}


def text(kind: str) -> str:
    """The whole text of ``kind`` (one of :data:`KINDS`)."""
    if kind not in _SOURCES:
        raise ValueError(f"unknown text kind {kind!r}; choose one of {', '.join(KINDS)}")
    return _SOURCES[kind]()


@cache
def _tokens(tokenizer, kind: str) -> torch.Tensor:
    return torch.tensor(_encode(tokenizer, text(kind)), dtype=torch.long)


def eval_tokens(tokenizer, kind: str, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of ``kind`` as ``[1, n]`` (all of them when the
    text is shorter, as the short ``legal`` text is)."""
    if n_tokens < 2:
        raise ValueError(f"n_tokens must be at least 2, got {n_tokens}")
    return _tokens(tokenizer, kind)[:n_tokens].unsqueeze(0)


def calibration_batches(
    tokenizer,
    n_batches: int,
    seq_len: int,
    kinds: tuple[str, ...] = CALIBRATION_KINDS,
    *,
    reserve: int = PERPLEXITY_RESERVE,
) -> list[torch.Tensor]:
    """``n_batches`` LongTensors ``[1, seq_len]`` dealt round-robin over ``kinds``, each
    kind's batches consecutive and ending at the end of its text; the first ``reserve``
    tokens of every kind (its evaluation tokens) are never read."""
    if n_batches < 1 or seq_len < 1 or not kinds:
        raise ValueError(
            f"need n_batches >= 1, seq_len >= 1 and at least one kind; "
            f"got {n_batches}, {seq_len}, {kinds!r}"
        )
    per_kind = {k: (n_batches - i + len(kinds) - 1) // len(kinds) for i, k in enumerate(kinds)}
    regions = {}
    for kind, count in per_kind.items():
        ids = _tokens(tokenizer, kind)
        start = ids.numel() - count * seq_len
        if count and start < reserve:
            raise ValueError(
                f"{count} x {seq_len} calibration tokens of {kind!r} do not fit: it has "
                f"{ids.numel()} tokens and the first {reserve} are reserved for evaluation; "
                f"use fewer or shorter batches, or other kinds"
            )
        regions[kind] = ids[start:].view(count, seq_len) if count else None
    batches = []
    for i in range(max(per_kind.values())):
        for kind in kinds:
            if i < per_kind[kind]:
                batches.append(regions[kind][i].unsqueeze(0))
    return batches
