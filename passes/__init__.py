"""qcompile.passes (lives in ./passes, mapped by pyproject's package-dir)."""

if (
    __name__ != "qcompile.passes"
):  # pragma: no cover - guard against `import passes` from the repo root
    raise ImportError(
        f"this folder must be imported as 'qcompile.passes', not '{__name__}'; "
        "install the project (scripts/dev.sh) and run plain 'pytest' from the repository root"
    )
