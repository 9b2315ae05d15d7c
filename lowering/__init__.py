"""qcompile.lowering (lives in ./lowering, mapped by pyproject's package-dir)."""

if __name__ != "qcompile.lowering":
    # Imported as top-level `lowering` because the repository root is on sys.path. Stay an
    # empty shell that refuses to be used: no __file__ or __version__, so a library
    # probing for an installed `lowering` package (transformers does for `kernels`) sees
    # "not installed" instead of crashing, and any attribute access fails clearly.
    __file__ = None
    __path__ = []  # no submodules either: `import lowering.x` must not load a second copy
    _WRONG_NAME = (
        f"this folder must be imported as 'qcompile.lowering', not '{__name__}'; install the "
        "project (scripts/dev.sh) and do not put the repository root on sys.path "
        "(run plain 'pytest', not 'python -m pytest')"
    )

    def __getattr__(name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        raise ImportError(_WRONG_NAME)
