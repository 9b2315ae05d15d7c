"""The package-dir mapping: passes/, lowering/, kernels/ import as qcompile.*.

Auto-discovery does not follow ``package-dir``, so every (sub)package must be
listed in pyproject; a forgotten one imports in an editable install and is
missing from the wheel. The mapped folders refuse to load under a top-level
name (``import kernels`` would shadow Hugging Face's ``kernels`` package).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"qcompile": "qcompile", "passes": "qcompile.passes", "lowering": "qcompile.lowering"}
MAPPED["kernels"] = "qcompile.kernels"


def setuptools_config() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["setuptools"]


def package_folders() -> dict[str, Path]:
    """Import name -> folder, for every folder with an __init__.py under the mapped roots."""
    found = {}
    for folder, name in MAPPED.items():
        base = ROOT / folder
        assert (base / "__init__.py").is_file(), base
        for init in sorted(base.rglob("__init__.py")):
            rel = init.parent.relative_to(base)
            if "__pycache__" in rel.parts:
                continue
            found[".".join((name, *rel.parts))] = init.parent
    return found


def resolve(package: str, package_dir: dict[str, str]) -> Path:
    """Where setuptools looks for ``package`` given ``package_dir`` (longest prefix)."""
    parts = package.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in package_dir:
            return ROOT / package_dir[prefix] / Path(*parts[i:])
    if "" in package_dir:
        return ROOT / package_dir[""] / Path(*parts)
    return ROOT / Path(*parts)


def test_every_package_folder_is_listed():
    cfg = setuptools_config()
    packages, package_dir = cfg["packages"], cfg.get("package-dir", {})
    folders = package_folders()
    assert {"qcompile", "qcompile.passes", "qcompile.lowering", "qcompile.kernels"} <= set(folders)
    missing = sorted(set(folders) - set(packages))
    assert not missing, f"add to [tool.setuptools] packages: {missing}"
    for name, folder in folders.items():
        assert resolve(name, package_dir).resolve() == folder.resolve(), name


def test_every_listed_package_exists():
    cfg = setuptools_config()
    package_dir = cfg.get("package-dir", {})
    for name in cfg["packages"]:
        assert (resolve(name, package_dir) / "__init__.py").is_file(), name
    for name, folder in package_dir.items():
        assert (ROOT / folder / "__init__.py").is_file(), (name, folder)


def test_non_python_sources_are_package_data():
    """Files the code reads at run time (C++ sources) must be listed as package data, or
    a wheel install lacks them."""
    import fnmatch

    cfg = setuptools_config()
    data = cfg.get("package-data", {})
    for name, folder in package_folders().items():
        for f in folder.iterdir():
            if f.suffix in (".cpp", ".h"):
                patterns = data.get(name, [])
                assert any(fnmatch.fnmatch(f.name, p) for p in patterns), (name, f.name)


def test_installed_names_point_at_the_folders():
    import qcompile.kernels
    import qcompile.lowering
    import qcompile.passes

    for module, folder in [
        (qcompile.kernels, "kernels"),
        (qcompile.lowering, "lowering"),
        (qcompile.passes, "passes"),
    ]:
        assert Path(module.__file__).resolve().parent == (ROOT / folder).resolve()


SUBMODULE = {"kernels": "reference", "passes": "bind", "lowering": "lower"}

PROBE = """
import json, sys
sys.path.insert(0, ROOT)
out = {}
for folder, sub in SUBMODULE.items():
    r = {}
    try:
        mod = __import__(folder)
    except ImportError as e:
        r["import"] = ("ImportError", str(e))
    else:
        r["file"] = getattr(mod, "__file__", None)
        try:
            getattr(mod, sub)
        except ImportError as e:
            r["import"] = ("shell", str(e))
        else:
            r["import"] = ("usable", "")
    try:
        m = __import__(folder + "." + sub, fromlist=["_"])
    except ImportError as e:
        r["submodule"] = ("ImportError", str(e))
    else:
        r["submodule"] = ("imported", m.__name__ + " from " + str(m.__file__))
    out[folder] = r
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def top_level_imports() -> dict:
    """What importing the mapped folders under top-level names does, from the repo root
    (one fresh interpreter with the repository root first on sys.path)."""
    code = f"ROOT = {str(ROOT)!r}\nSUBMODULE = {SUBMODULE!r}\n" + PROBE
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("folder", list(SUBMODULE))
def test_top_level_import_is_refused(top_level_imports, folder):
    """``import kernels`` from the repository root either raises ImportError, or
    (the inert-shell form) yields a module every use of which raises ImportError;
    either way the message says to import it as ``qcompile.kernels``."""
    r = top_level_imports[folder]
    kind, msg = r["import"]
    assert kind in ("ImportError", "shell"), r
    assert f"qcompile.{folder}" in msg, msg
    if kind == "shell":  # a library probing for an installed package must see none
        assert r["file"] is None, r


@pytest.mark.parametrize("folder", list(SUBMODULE))
def test_top_level_submodule_import_is_refused(top_level_imports, folder):
    """``import kernels.reference`` must not load a second copy of our module under a
    top-level name (the inert shell keeps ``__path__`` pointing at the folder)."""
    r = top_level_imports[folder]
    assert r["submodule"][0] == "ImportError", r["submodule"]
