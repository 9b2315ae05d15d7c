"""Report.plot: one PNG per quantity, readable layouts, and matplotlib as an optional extra."""

from __future__ import annotations

import sys

import pytest
from helpers import TinySpec, build_model, input_ids, run_lowbit

import qcompile
from qcompile.report import Report, SiteRow
from qcompile.report_plot import FILES, INSTALL_HINT, _layout, _split

PNG = b"\x89PNG\r\n\x1a\n"


def row(fqn, scheme="w4a4-duquant", **kw) -> SiteRow:
    base = dict(in_features=8, out_features=8, outlier_channels=[], weight_sqnr_db=20.0,
                bits_per_weight=4.5, act_absmax_before=30.0, act_absmax_after=2.0)  # fmt: skip
    base.update(kw)
    return SiteRow(fqn=fqn, scheme=scheme, **base)


def assert_pngs(paths, folder):
    assert [p.name for p in paths] == [f"{name}.png" for name in FILES]
    for p in paths:
        assert p.parent == folder and p.is_file(), p
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 2000, p


def test_fqn_split_and_layer_layout():
    assert _split("model.layers.7.self_attn.q_proj.weight") == (
        "model.layers",
        7,
        "self_attn.q_proj",
    )
    assert _split("model.layers.0.mlp.experts.down_proj[3]") == (
        "model.layers",
        0,
        "mlp.experts.down_proj",
    )
    assert _split("lm_head.weight") == ("", None, "lm_head")
    sites = [row(f"model.layers.{i}.{k}.weight") for i in range(3)
             for k in ("self_attn.q_proj", "mlp.down_proj")] + [row("lm_head.weight")]  # fmt: skip
    lay = _layout(sites)
    assert lay.xlabel == "layer"
    assert lay.x == [0, 0, 1, 1, 2, 2, 3]  # lm_head after the last layer
    assert lay.series == ["q_proj", "down_proj"] * 3 + ["lm_head"]
    assert lay.ticklabels[-1] == "lm_head"
    # the same last component under two parents keeps the parent in its name
    lay = _layout([row("m.layers.0.attn.proj.weight"), row("m.layers.0.mlp.proj.weight")])
    assert lay.series == ["attn.proj", "mlp.proj"]
    # no layer numbers: graph order
    lay = _layout([row("encoder.a.weight"), row("decoder.b.weight"), row("head.weight")])
    assert lay.xlabel == "site (graph order)" and lay.x == [0, 1, 2]


def test_plot_of_a_compiled_tiny_model(tmp_path, fresh_dynamo):
    pytest.importorskip("matplotlib")
    spec = TinySpec(layers=2)
    model, ids = build_model(spec), input_ids(spec)
    report = qcompile.explain(model, ids, options={
        "threshold": 1.0, "outlier_ratio": 0, "overrides": {"model.layers.1.mlp.*": "fp"}})  # fmt: skip
    assert any(r.outlier_channels for r in report.sites) and report.left_in_fp
    assert_pngs(report.plot(tmp_path / "plots"), tmp_path / "plots")


def test_plot_of_missing_values_experts_and_empty_reports(tmp_path):
    pytest.importorskip("matplotlib")
    sites = []
    for i in range(4):
        sites += [
            row(f"model.layers.{i}.self_attn.q_proj.weight", outlier_channels=[1, 2]),
            row(
                f"model.layers.{i}.self_attn.o_proj.weight",
                weight_sqnr_db=None,
                act_absmax_before=None,
                act_absmax_after=float("nan"),
            ),  # fmt: skip
            row(
                f"model.layers.{i}.mlp.gate.weight",
                scheme="fp",
                weight_sqnr_db=None,
                bits_per_weight=None,
                fp_reason="MoE router",
            ),  # fmt: skip
        ]
        sites += [row(f"model.layers.{i}.mlp.experts.down_proj[{e}]", weight_sqnr_db=19 + e)
                  for e in range(3)]  # fmt: skip
    sites.append(row("lm_head.weight", act_absmax_after=0.0))  # not drawable on a log scale
    assert_pngs(Report(sites=sites).plot(tmp_path / "a"), tmp_path / "a")
    assert_pngs(Report().plot(tmp_path / "empty"), tmp_path / "empty")
    none = [row(f"x{i}", act_absmax_before=None, act_absmax_after=None, weight_sqnr_db=None,
                bits_per_weight=None) for i in range(3)]  # fmt: skip
    assert_pngs(Report(sites=none).plot(tmp_path / "none"), tmp_path / "none")


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"lowbit\[plot\]") as e:
        Report(sites=[row("lm_head.weight")]).plot(tmp_path)
    assert str(e.value) == INSTALL_HINT
    assert not list(tmp_path.iterdir())


def test_debug_dir_gets_the_plots(tmp_path, fresh_dynamo):
    pytest.importorskip("matplotlib")
    spec = TinySpec()
    run_lowbit(build_model(spec), input_ids(spec), {"debug_dir": str(tmp_path)})
    (graph,) = tmp_path.glob("graph_*")
    assert_pngs(sorted((graph / "plots").glob("*.png"), key=lambda p: FILES.index(p.stem)),
                graph / "plots")  # fmt: skip


def test_debug_dir_without_matplotlib_has_no_plots(tmp_path, fresh_dynamo, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    spec = TinySpec()
    run_lowbit(build_model(spec), input_ids(spec), {"debug_dir": str(tmp_path)})
    (graph,) = tmp_path.glob("graph_*")
    assert (graph / "report.json").is_file() and not (graph / "plots").exists()
