"""qcompile.lowering (lives in ./lowering, mapped by pyproject's package-dir)."""

if (
    __name__ != "qcompile.lowering"
):  # pragma: no cover - guard against `import lowering` from the repo root
    raise ImportError(
        f"this folder must be imported as 'qcompile.lowering', not '{__name__}'; "
        "install the project (scripts/dev.sh) and run plain 'pytest' from the repository root"
    )
