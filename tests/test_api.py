"""The user-facing API: options, calibration files, explain(), debug dumps,
logging, backend registration and the inductor hand-off."""

import dataclasses
import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import TinySpec, build_model, eager_logits, input_ids, rel_err, run_lowbit
from safetensors.torch import save_file

import qcompile
from qcompile import Calibration, Options, calibrate, explain
from qcompile.recipes import RECIPES

pytestmark = pytest.mark.usefixtures("fresh_dynamo")
OPTION_KEYS = ["recipe", "calibration", "target", "debug_dir", "overrides", "threshold"]
WARNING = "calibrating on this graph's example inputs"


def recipe_names_listed(msg: str) -> bool:
    return all(name in msg for name in RECIPES)


@pytest.fixture(scope="module")
def tiny():
    spec = TinySpec(tied=True)
    return spec, build_model(spec), input_ids(spec)


# Options.parse ---------------------------------------------------------------


def test_unknown_option_lists_valid_keys():
    with pytest.raises(ValueError, match="unknown lowbit option") as ei:
        Options.parse({"recipe": "w8a8", "bits": 4})
    msg = str(ei.value)
    assert "'bits'" in msg
    assert all(key in msg for key in OPTION_KEYS + ["outlier_mode", "handoff"])


@pytest.mark.parametrize(
    "options",
    [{"recipe": "int4"}, {"overrides": {"lm_head": "int4"}}, {"recipe": None}],
    ids=["top-level", "override", "none"],
)
def test_unknown_recipe_lists_valid_recipes(options):
    with pytest.raises(ValueError, match="unknown lowbit recipe") as ei:
        Options.parse(options)
    assert recipe_names_listed(str(ei.value))


@pytest.mark.parametrize(
    "options, words",
    [
        ({"target": "gpu"}, ["target", "'gpu'", "auto", "cpu", "triton"]),
        ({"outlier_mode": "runtime"}, ["outlier_mode", "static", "dynamic"]),
        ({"handoff": "aot"}, ["handoff", "inductor", "eager"]),
        (
            {"cpu_transform_dtype": "fp16"},
            ["cpu_transform_dtype", "auto", "activation", "bfloat16"],
        ),
        ({"threshold": -1}, ["threshold"]),
        ({"threshold": float("nan")}, ["threshold"]),
        ({"threshold": "6"}, ["threshold"]),
        ({"outlier_ratio": -2}, ["outlier_ratio", "threshold"]),
        ({"outlier_ratio": float("nan")}, ["outlier_ratio"]),
        ({"overrides": ["lm_head"]}, ["overrides"]),
        ({"overrides": {1: "fp"}}, ["override"]),
        ({"calibration": 3}, ["calibration", "Calibration.save"]),
    ],
)
def test_bad_values_raise_value_error(options, words):
    with pytest.raises(ValueError) as ei:
        Options.parse(options)
    for word in words:
        assert word in str(ei.value)


def test_defaults_and_frozen():
    opts = Options.parse(None)
    assert (opts.recipe, opts.target, opts.threshold, opts.handoff) == (
        "int8-mixed",
        "auto",
        6.0,
        "inductor",
    )
    assert Options.parse({"threshold": 0}).threshold == 0.0
    # the static columns: a ratio to the site's median by default, LLM.int8()'s absolute
    # threshold when the user gives one (and no ratio)
    assert opts.outlier_ratio == 3.0
    assert Options.parse({"threshold": 6.0}).outlier_ratio == 0.0
    assert Options.parse({"threshold": 6.0, "outlier_ratio": 2}).outlier_ratio == 2.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.recipe = "fp"
    parsed = Options.parse({"overrides": {"lm_head": "fp"}})
    with pytest.raises(TypeError):
        parsed.overrides["x"] = "fp"


# errors through torch.compile --------------------------------------------------


def compile_error(model, ids, **compile_kwargs) -> tuple[BaseException, ValueError]:
    """The exception torch.compile surfaces, and the backend's ValueError inside it.

    Dynamo wraps backend exceptions in ``BackendCompilerFailed`` (the original is
    ``.inner_exception``; ``__cause__`` is None in torch 2.13).
    """
    with pytest.raises(Exception) as ei, torch.no_grad():
        torch.compile(model, backend="lowbit", **compile_kwargs)(ids)
    outer, seen, e = ei.value, [], ei.value
    while e is not None and not isinstance(e, ValueError) and e not in seen:
        seen.append(e)
        e = getattr(e, "inner_exception", None) or e.__cause__ or e.__context__
    assert isinstance(e, ValueError), f"no ValueError in {outer!r}"
    assert isinstance(outer, (ValueError, torch._dynamo.exc.BackendCompilerFailed))
    assert str(e) in str(outer), "the backend's message must reach the user unchanged"
    assert "lowbit" in str(outer)
    return outer, e


@pytest.mark.parametrize(
    "options, must_contain",
    [
        ({"bogus": 1, "handoff": "eager"}, OPTION_KEYS),
        ({"recipe": "int4", "handoff": "eager"}, list(RECIPES)),
        ({"overrides": {"lm_head": "nope"}, "handoff": "eager"}, list(RECIPES)),
        ({"target": "gpu", "handoff": "eager"}, ["auto", "cpu", "triton"]),
    ],
    ids=["unknown-key", "unknown-recipe", "unknown-override-recipe", "bad-target"],
)
def test_option_errors_surface_through_torch_compile(tiny, options, must_contain):
    torch._dynamo.reset()
    _, model, ids = tiny
    outer, err = compile_error(model, ids, options=options)
    for word in must_contain:
        assert word in str(err)


def test_mode_is_rejected(tiny):
    torch._dynamo.reset()
    _, model, ids = tiny
    _, err = compile_error(model, ids, mode="max-autotune")
    assert "mode" in str(err) and "options" in str(err)


# calibration -------------------------------------------------------------------


def assert_same_stats(a: Calibration, b: Calibration):
    assert sorted(a.stats) == sorted(b.stats)
    for fqn in a.stats:
        sa, sb = a[fqn], b[fqn]
        assert torch.equal(sa.absmax, sb.absmax), fqn
        assert torch.equal(sa.over_threshold, sb.over_threshold), fqn
        assert (sa.rows, sa.threshold) == (sb.rows, sb.threshold), fqn
        assert (sa.hessian is None) == (sb.hessian is None)
        if sa.hessian is not None:
            assert torch.equal(sa.hessian, sb.hessian), fqn


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("hessian", [False, True])
def test_calibration_save_load_round_trip(tmp_path, tied, hessian):
    spec = TinySpec(tied=tied, layers=2, hidden=40)
    model = build_model(spec)
    batches = [input_ids(spec, seed=s) for s in range(3)]
    cal = calibrate(model, batches, threshold=1.5, hessian=hessian)
    fqns = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert fqns <= set(cal.stats)
    for fqn in fqns:
        s = cal[fqn]
        assert s.rows == 3 * batches[0].numel()
        assert s.absmax.shape == (s.absmax.numel(),) and s.absmax.dtype == torch.float32
        assert s.threshold == 1.5
        assert int(s.over_threshold.max()) <= s.rows
    path = tmp_path / "cal.safetensors"
    cal.save(path)
    loaded = Calibration.load(path)
    assert_same_stats(cal, loaded)
    assert loaded.source == cal.source
    assert len(loaded) == len(cal) and "lm_head.weight" in loaded
    assert Calibration.load(str(path)).stats.keys() == cal.stats.keys()


def test_calibration_of_tied_model_stores_both_names(tmp_path):
    """Docstring of qcompile.calibration: a tied weight is stored under
    ``lm_head.weight`` and ``model.embed_tokens.weight``."""
    spec = TinySpec(tied=True)
    model = build_model(spec)
    cal = calibrate(model, [input_ids(spec)])
    assert "lm_head.weight" in cal
    assert "model.embed_tokens.weight" in cal
    assert torch.equal(cal["lm_head.weight"].absmax, cal["model.embed_tokens.weight"].absmax)
    cal.save(tmp_path / "c.safetensors")
    loaded = Calibration.load(tmp_path / "c.safetensors")
    assert "lm_head.weight" in loaded and "model.embed_tokens.weight" in loaded


def test_calibrate_rejects_bad_input(tiny):
    _, model, ids = tiny
    with pytest.raises(ValueError, match="no batches"):
        calibrate(model, [])
    with pytest.raises(ValueError, match="batch"):
        calibrate(model, [3])
    with pytest.raises(ValueError, match="nn.Linear"):
        calibrate(torch.nn.ReLU(), [ids])


def corrupt_files(tmp_path, good: bytes):
    def meta_file(name, metadata, tensors=None):
        path = tmp_path / name
        save_file(tensors or {"a::absmax": torch.zeros(2)}, str(path), metadata=metadata)
        return path

    def raw(name, data):
        path = tmp_path / name
        path.write_bytes(data)
        return path

    header = {"format": "lowbit.calibration", "version": 1, "source": ""}
    return {
        "truncated-half": lambda: raw("half", good[: len(good) // 2]),
        "truncated-tail": lambda: raw("tail", good[:-3]),
        "eight-bytes": lambda: raw("eight", good[:8]),
        "empty": lambda: raw("empty", b""),
        "garbage": lambda: raw("garbage", b"not a safetensors file " * 20),
        "foreign-safetensors": lambda: meta_file("foreign", None),
        "metadata-not-json": lambda: meta_file("notjson", {"lowbit": "{oops"}),
        "metadata-json-not-object": lambda: meta_file("list", {"lowbit": "[1, 2]"}),
        "metadata-without-sites": lambda: meta_file("nosites", {"lowbit": json.dumps(header)}),
        "missing-tensor": lambda: meta_file(
            "missing",
            {"lowbit": json.dumps({**header, "sites": {"b": {"rows": 1, "threshold": 6.0}}})},
        ),
        "wrong-format": lambda: meta_file(
            "format", {"lowbit": json.dumps({**header, "format": "x", "sites": {}})}
        ),
        "directory": lambda: tmp_path,
        "does-not-exist": lambda: tmp_path / "nope.safetensors",
    }


CORRUPT_CASES = [
    "truncated-half",
    "truncated-tail",
    "eight-bytes",
    "empty",
    "garbage",
    "foreign-safetensors",
    "metadata-not-json",
    "metadata-json-not-object",
    "metadata-without-sites",
    "missing-tensor",
    "wrong-format",
    "directory",
    "does-not-exist",
]


@pytest.mark.parametrize("case", CORRUPT_CASES)
def test_corrupt_calibration_file_raises_value_error(tmp_path, tiny, case):
    spec, model, ids = tiny
    good_path = tmp_path / "good.safetensors"
    calibrate(model, [ids]).save(good_path)
    path = corrupt_files(tmp_path, good_path.read_bytes())[case]()
    with pytest.raises(ValueError) as ei:
        Calibration.load(path)
    assert str(path) in str(ei.value) or os.fspath(path) in str(ei.value)
    with pytest.raises(ValueError):
        Options.parse({"calibration": str(path)})


def test_calibration_path_string_works_and_silences_warning(tmp_path, tiny, caplog):
    spec, model, ids = tiny
    cal = calibrate(model, [ids, input_ids(spec, seed=5)], threshold=1.0)
    path = tmp_path / "cal.safetensors"
    cal.save(path)
    opts = {"threshold": 1.0}
    with caplog.at_level(logging.WARNING, logger="qcompile"):
        by_object = run_lowbit(model, ids, {**opts, "calibration": cal})
        by_path = run_lowbit(model, ids, {**opts, "calibration": str(path)})
    assert WARNING not in caplog.text
    assert torch.equal(by_object, by_path)
    report = qcompile.compiled_reports()[-1]
    assert report.calibration == cal.source
    assert any(r.outlier_channels for r in report.sites)


def test_missing_calibration_warns(tiny, caplog):
    spec, model, ids = tiny
    with caplog.at_level(logging.WARNING, logger="qcompile"):
        run_lowbit(model, ids, {"recipe": "int8-mixed"})
    records = [r for r in caplog.records if WARNING in r.getMessage()]
    assert len(records) == 1
    assert records[0].name == "qcompile" and records[0].levelno == logging.WARNING
    assert "qcompile.calibrate" in records[0].getMessage()


@pytest.mark.parametrize("recipe", ["fp", "w8a8", "w4a4-rtn", "w4a4-hadamard"])
def test_recipes_that_do_not_calibrate_do_not_warn(tiny, caplog, recipe):
    spec, model, ids = tiny
    with caplog.at_level(logging.WARNING, logger="qcompile"):
        run_lowbit(model, ids, {"recipe": recipe})
    assert WARNING not in caplog.text


def test_calibration_of_another_model_is_rejected(tiny):
    spec, model, ids = tiny
    other = build_model(TinySpec(hidden=40, heads=4, kv_heads=2))
    cal = calibrate(other, [input_ids(TinySpec())])
    torch._dynamo.reset()
    _, err = compile_error(model, ids, options={"calibration": cal, "handoff": "eager"})
    assert "input channels" in str(err)


# explain -----------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_explain_report(tied):
    spec = TinySpec(tied=tied, layers=2, attention_bias=True)
    model = build_model(spec)
    ids = input_ids(spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    overrides = {"lm_head": "fp", "model.layers.1.mlp.*": "fp"}
    report = explain(model, ids, options={"overrides": overrides, "threshold": 1.0})
    assert isinstance(report, qcompile.Report)
    linears = {
        f"{name}.weight": m
        for name, m in model.named_modules(remove_duplicate=False)
        if isinstance(m, torch.nn.Linear)
    }
    rows = {r.fqn: r for r in report.sites}
    assert set(rows) == set(linears)
    for fqn, row in rows.items():
        mod = linears[fqn]
        assert (row.in_features, row.out_features) == (mod.in_features, mod.out_features)
        overridden = fqn == "lm_head.weight" or fqn.startswith("model.layers.1.mlp.")
        assert row.scheme == ("fp" if overridden else "int8-mixed")
        assert isinstance(row.outlier_channels, list)
        assert all(0 <= c < row.in_features for c in row.outlier_channels)
        if overridden:
            assert row.fp_reason is not None and row.weight_sqnr_db is None
        else:
            assert row.fp_reason is None and row.weight_sqnr_db > 30
    assert report.left_in_fp == {"recipe 'fp' (override)": 4}
    assert len(report.quantized) == len(rows) - 4
    assert any(r.outlier_channels for r in report.sites)
    text = str(report)
    for fqn in rows:
        assert fqn in text
    assert "4 x recipe 'fp' (override)" in text
    json.loads(report.to_json())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_outlier_columns_by_ratio_to_the_median_and_the_report_says_why():
    spec = TinySpec(hidden=40, intermediate=56, layers=1, tied=False)
    model = build_model(spec)
    with torch.no_grad():  # two residual-stream channels far above the rest
        model.model.layers[0].input_layernorm.weight[[7, 21]] *= 40
    ids = input_ids(spec, batch=2, seq=16)
    cal = calibrate(model, [ids])
    q = "model.layers.0.self_attn.q_proj.weight"
    absmax = cal[q].absmax
    for ratio in (3.0, 8.0):
        report = explain(model, ids, options={"calibration": cal, "outlier_ratio": ratio})
        row = next(r for r in report.sites if r.fqn == q)
        limit = ratio * absmax.median().item()
        assert row.outlier_channels == (absmax >= limit).nonzero().flatten().tolist()
        assert {7, 21} <= set(row.outlier_channels)
        assert row.outlier_rule == f"max|x| >= {ratio:g} x median {limit / ratio:.3g}"
        assert "outlier rule" in str(report) and row.outlier_rule in str(report)
    absolute = explain(model, ids, options={"calibration": cal, "threshold": 2.5})
    row = next(r for r in absolute.sites if r.fqn == q)
    assert row.outlier_channels == (absmax >= 2.5).nonzero().flatten().tolist()
    assert row.outlier_rule == "max|x| >= 2.5"


# debug dumps -------------------------------------------------------------------


REQUIRED_PASSES = ["bind", "collect_stats", "detect_outliers", "split_mixed_mm", "quantize_weights"]


def check_debug_dir(root):
    """One graph folder; a before/after dump per pass named in passes.log, in order."""
    graphs = sorted(root.glob("graph_*"))
    assert len(graphs) == 1, graphs
    g = graphs[0]
    log = (g / "passes.log").read_text().splitlines()
    steps = [line.split(":", 1)[0].split(" ", 1) for line in log]
    names = [name for _, name in steps]
    assert [int(n) for n, _ in steps] == list(range(1, len(steps) + 1))
    assert [n for n in names if n in REQUIRED_PASSES] == REQUIRED_PASSES, names
    assert names[-1] == "lower", names
    for step, name in steps:
        for side in ("before", "after"):
            f = g / f"{step}_{name}.{side}.py"
            assert f.is_file() and f.read_text().strip(), f
    dumps = {p.name for p in g.glob("*.py")}
    assert len(dumps) == 2 * len(steps), sorted(dumps)
    report = (g / "report.txt").read_text()
    json.loads((g / "report.json").read_text())
    return g, log, report


def test_debug_dir_dumps_every_pass(tmp_path, tiny):
    spec, model, ids = tiny
    run_lowbit(model, ids, {"debug_dir": str(tmp_path), "threshold": 1.0})
    g, log, report = check_debug_dir(tmp_path)
    sites = qcompile.compiled_reports()[-1].sites
    split = [r.fqn for r in sites if r.outlier_channels]
    assert split, "threshold 1.0 should split some sites"
    split_line = next(line for line in log if " split_mixed_mm:" in line)
    quant_line = next(line for line in log if " quantize_weights:" in line)
    for fqn in split:
        assert f"[{fqn}]" in split_line, fqn
    for r in sites:
        assert f"[{r.fqn}]" in quant_line, r.fqn
        assert r.fqn in report
    (after,) = g.glob("*_quantize_weights.after.py")
    (before,) = g.glob("*_quantize_weights.before.py")
    assert "int8_linear" in after.read_text() and "int8_linear" not in before.read_text()


def test_debug_dir_from_environment(tmp_path, tiny, monkeypatch):
    spec, model, ids = tiny
    monkeypatch.setenv("LOWBIT_DEBUG_DIR", str(tmp_path / "env"))
    run_lowbit(model, ids, {"recipe": "w8a8"})
    check_debug_dir(tmp_path / "env")


# the user's model is left alone ------------------------------------------------


@pytest.mark.parametrize("recipe", ["int8-mixed", "w8a8"])
def test_parameters_unchanged(recipe):
    spec = TinySpec(tied=True, attention_bias=True, mlp_bias=True, layers=2)
    model = build_model(spec)
    ids = input_ids(spec)
    params = dict(model.named_parameters(remove_duplicate=False))
    clones = {k: (p.detach().clone(), p.requires_grad, p.data_ptr()) for k, p in params.items()}
    ref = eager_logits(model, ids)
    with torch.no_grad():
        compiled = torch.compile(
            model,
            backend="lowbit",
            options={"recipe": recipe, "threshold": 1.0, "handoff": "eager"},
        )
        out1, out2 = compiled(ids).logits, compiled(ids).logits
    assert torch.equal(out1, out2)
    assert not torch.equal(out1, ref), "the compiled model should be quantized"
    now = dict(model.named_parameters(remove_duplicate=False))
    assert now.keys() == params.keys()
    for k, p in now.items():
        value, requires_grad, ptr = clones[k]
        assert p is params[k]
        assert torch.equal(p, value), k
        assert p.dtype == value.dtype and p.requires_grad == requires_grad and p.data_ptr() == ptr
    assert torch.equal(eager_logits(model, ids), ref)


# registration ------------------------------------------------------------------


def test_import_twice_and_lookup():
    import importlib

    from torch._dynamo.backends.registry import lookup_backend

    importlib.reload(qcompile)
    qcompile._register_if_not_installed()
    import qcompile as again

    assert again is qcompile
    assert "lowbit" in torch._dynamo.list_backends(exclude_tags=())
    assert lookup_backend("lowbit") is qcompile.lowbit_backend


ENTRY_POINT_SCRIPT = textwrap.dedent(
    """
    import importlib, sys
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model, x = Tiny().eval(), torch.randn(3, 16)
    opts = {"recipe": "w8a8", "handoff": "eager"}
    assert "qcompile" not in sys.modules
    with torch.no_grad():
        y = torch.compile(model, backend="lowbit", options=opts)(x)
    assert "qcompile" in sys.modules, "the entry point did not load qcompile"
    import qcompile
    [report] = qcompile.compiled_reports()
    assert [r.fqn for r in report.quantized] == ["proj.weight"], report.summary()
    assert not torch.equal(y, model(x))
    # importing (and re-importing) after the entry point registered the backend
    importlib.reload(qcompile)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="lowbit", options=opts)(x)
    print("OK", len(qcompile.compiled_reports()))
    """
)


def test_entry_point_finds_backend_without_import(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", ENTRY_POINT_SCRIPT],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith("OK")


# inductor ----------------------------------------------------------------------


def test_inductor_handoff_matches_eager_handoff():
    """The one inductor compile of the suite (about a minute on this CPU, cold)."""
    spec = TinySpec(hidden=24, intermediate=32, vocab=64, layers=1)
    model = build_model(spec)
    ids = input_ids(spec, batch=1, seq=5)
    calibration = calibrate(model, [ids])
    opts = {"recipe": "int8-mixed", "threshold": 1.5, "calibration": calibration}
    eager_handoff = run_lowbit(model, ids, opts)
    assert any(r.outlier_channels for r in qcompile.compiled_reports()[-1].sites)
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(model, backend="lowbit", options=opts)(ids).logits
    assert qcompile.compiled_reports()[-1].target == "cpu"
    assert not torch.equal(out, eager_logits(model, ids)), "inductor ran the fp model"
    assert rel_err(out, eager_handoff) < 1e-3
    torch.testing.assert_close(out, eager_handoff, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16-g32"])
def test_second_model_of_the_same_class_gets_its_own_graph(recipe):
    """Dynamo guards lifted parameters by shape only; lowbit's graphs hold one model's
    quantized weights as constants, so each model must be compiled for itself."""
    torch._dynamo.reset()
    spec = TinySpec(hidden=64, intermediate=64)
    ids = input_ids(spec)
    errors = []
    for seed in (0, 1):
        model = build_model(dataclasses.replace(spec, seed=seed))
        with torch.no_grad():
            fast = torch.compile(model, backend="lowbit", options={"recipe": recipe})
            errors.append(rel_err(fast(ids).logits, eager_logits(model, ids)))
    torch._dynamo.reset()
    assert max(errors) < 0.2, errors  # 4-bit error ~0.05; another model's weights ~1


def test_compiled_model_runs_in_grad_mode_as_inference():
    """Called without torch.no_grad() (as a plain HF forward is), the quantized graph
    still compiles and runs; its kernels have no derivatives, so it records none."""
    spec = TinySpec(hidden=64, intermediate=64)
    model, ids = build_model(spec), input_ids(spec)
    for recipe in ("w8a8", "w4a16-g32"):
        out = torch.compile(model, backend="lowbit", options={"recipe": recipe})(ids).logits
        torch._dynamo.reset()
        assert not out.requires_grad
        assert rel_err(out.detach(), eager_logits(model, ids)) < 0.2


def test_recipe_families_route_the_quantizing_passes():
    """Each recipe's family (what the quantizing passes route by) agrees with its
    fields; an unknown family is refused."""
    from qcompile import recipes

    for r in RECIPES.values():
        assert r.family in recipes.FAMILIES
        assert r.quantize == (r.family != recipes.FP)
        assert r.weight_only == (r.family == recipes.WEIGHT_ONLY) == (r.group_size is not None)
        if r.family in (recipes.INT8, recipes.INT8_MIXED):
            assert (r.weight_bits, r.act_bits) == (8, 8)
        if r.family == recipes.LOW_BIT:
            assert r.act_bits is not None and min(r.weight_bits, r.act_bits) < 8
    with pytest.raises(ValueError, match="unknown family"):
        recipes.Recipe("x", "", "int5")
