"""qcompile.kernels (lives in ./kernels, mapped by pyproject's package-dir)."""

if (
    __name__ != "qcompile.kernels"
):  # pragma: no cover - guard against `import kernels` from the repo root
    raise ImportError(
        f"this folder must be imported as 'qcompile.kernels', not '{__name__}'; "
        "install the project (scripts/dev.sh) and run plain 'pytest' from the repository root"
    )
