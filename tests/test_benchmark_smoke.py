"""Smoke runs of benchmarks/compare.py on the tiny Wan workload and the embedded FLUX model (few steps):
every column there, values that make sense."""

import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import compare, report  # noqa: E402

STEPS = 8


def run(tmp_path, methods, workload="tiny", steps=STEPS, extra=()):
    out = tmp_path / "rows.json"
    md = tmp_path / "table.md"
    args = compare.parse_args(["--workload", workload, "--steps", str(steps), "--repeats", "1", "--device", "cpu",
                               "--backend", "eager", "--json", str(out), "--markdown", str(md), *extra,
                               "--methods", *methods])
    assert compare.main_with(args) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    return rows, md.read_text()


def test_cachepass_and_diffusers_rows(tmp_path):
    rows, table = run(tmp_path, ["cachepass:interval:compute_last=False,interval=2", "diffusers-fbcache:threshold=0.1"])
    assert "| " + " | ".join(report.COLUMNS) + " |" in table
    assert list(rows) == ["eager", "compile", "cachepass interval compute_last=False interval=2",
                          "diffusers FirstBlockCache threshold=0.1"]
    assert all(r["status"] == "ok" for r in rows.values()), rows

    eager = rows["eager"]
    assert eager["speedup"] == 1.0 and eager["psnr"] == math.inf and eager["block_work"] == 1.0
    assert eager["graph_breaks"] is None  # not compiled
    assert rows["compile"]["graph_breaks"] == 0 and rows["compile"]["psnr"] > 80

    cp = rows["cachepass interval compute_last=False interval=2"]
    assert cp["computed"] == [STEPS // 2, STEPS // 2] and cp["computed_source"] == "cachepass.stats"
    assert cp["block_work"] == pytest.approx(0.5)  # the profiler agrees with cachepass.stats
    assert 20 < cp["psnr"] < math.inf and 0 < cp["rel_l1"] < 0.1
    assert cp["graph_breaks"] == 0 and cp["recompiles"] == 0 and cp["graphs"] >= 1
    assert cp["cache_mib"] > 0 and cp["seconds"] > 0 and cp["speedup"] > 0
    assert not cp["repeat_rel_l1"]  # every generation after the warm-up gives the same output
    assert cp["psnr_first"] == cp["psnr"]  # the first generation (the warm-up) is scored too, and the same

    fbc = rows["diffusers FirstBlockCache threshold=0.1"]
    assert fbc["computed"] is None and 0 < fbc["block_work"] < 1  # steps from the profiler only
    assert fbc["psnr"] > 20 and fbc["compiler"] == "eager"


def test_flux_digits_workload(tmp_path):
    """The embedded FLUX model in FluxPipeline with true CFG: cachepass and diffusers' hooks on both block
    stacks, AdaCache with the workload's image options, and a plot with a panel per workload."""
    steps = 6
    rows, table = run(tmp_path, ["cachepass:interval:compute_last=False,interval=2", "cachepass:adacache",
                                 "diffusers-taylorseer:use_lite_mode=True,cache_interval=2"],
                      workload="flux-digits", steps=steps)
    assert "`flux-digits`" in table and "FluxPipeline" in table
    assert all(r["status"] == "ok" for r in rows.values()), rows
    cp = rows["cachepass interval compute_last=False interval=2"]
    assert cp["computed"] == [steps // 2, steps // 2]  # cond and uncond: true CFG's two calls per step
    assert cp["block_work"] == pytest.approx(0.5)  # one attention per FLUX block, double and single alike
    assert 15 < cp["psnr"] < math.inf and cp["psnr_first"] == cp["psnr"]
    ada = rows["cachepass adacache"]
    assert ada["computed"] is not None and sum(ada["computed"]) < 2 * steps  # caching on: motion=False applied
    assert any("motion=False" in n for n in ada["notes"])
    ts = rows["diffusers TaylorSeerCache cache_interval=2 use_lite_mode=True"]
    assert ts["block_work"] < 1 and ts["psnr"] > 15


def test_several_workloads_in_one_run(tmp_path):
    out = tmp_path / "rows.json"
    args = compare.parse_args(["--workload", "tiny", "flux-digits", "--steps", "2", "--repeats", "1", "--backend",
                               "eager", "--json", str(out), "--plot", str(tmp_path / "frontier.png"), "--methods", "eager"])
    assert compare.main_with(args) == 0
    assert (tmp_path / "frontier.png").stat().st_size > 0  # a panel per workload
    runs = json.loads(out.read_text())["runs"]
    assert [r["meta"]["workload"] for r in runs] == ["tiny", "flux-digits"]
    assert all(r["rows"][0]["status"] == "ok" for r in runs)


def test_cache_dit_row(tmp_path):
    pytest.importorskip("cache_dit")
    rows, _ = run(tmp_path, ["cache-dit-dbcache:threshold=0.3,warmup=2"])
    row = rows["cache-dit DBCache threshold=0.3 warmup=2"]
    assert row["status"] == "ok", row
    assert row["computed_source"] == "cache_dit.summary" and len(row["computed"]) == 2
    assert all(2 <= c <= STEPS for c in row["computed"])
    assert row["psnr"] > 20


def test_method_parsing():
    from benchmarks import methods

    specs = methods.parse("cachepass:fbcache:threshold=0.05|0.1,warmup=2")
    assert [s.options for s in specs] == [{"threshold": 0.05, "warmup": 2}, {"threshold": 0.1, "warmup": 2}]
    (spec,) = methods.parse("diffusers-magcache+compile:threshold=0.1")
    assert spec.compiled and spec.tool == "diffusers" and spec.family == "diffusers MagCache +compile"
    with pytest.raises(ValueError, match="unknown"):
        methods.parse("cachepass:nope")
    assert methods.parse_all(["full", "eager"]) == methods.parse("full")


def test_the_budget_table_takes_each_tools_best_within_the_budget_in_its_worse_generation():
    def row(method, tool, work, psnr, first):
        return {"method": method, "tool": tool, "status": "ok", "block_work": work, "psnr": psnr, "psnr_first": first}

    rows = [row("eager", "full", 1.0, math.inf, math.inf),
            row("cachepass a", "cachepass", 0.18, 41.0, 41.0),
            row("cachepass b", "cachepass", 0.30, 50.0, 30.0),  # good later, bad first: counts as 30 dB
            row("peer c", "diffusers", 0.20, 39.5, 39.5),
            row("peer d", "cache-dit", 0.45, 44.0, 44.0)]
    assert report.best_within(rows, 0.2, peers=False)["method"] == "cachepass a"
    assert report.best_within(rows, 0.3, peers=False)["method"] == "cachepass a"
    assert report.best_within(rows, 0.15, peers=False) is None
    assert report.best_within(rows, 0.5, peers=True)["method"] == "peer d"
    table = report.budget_markdown(rows).splitlines()
    by_budget = {line.split(" | ")[0].strip("| "): line for line in table[2:]}
    assert by_budget["20%"].endswith("| +1.5 |") and by_budget["45%"].endswith("| -3.0 |")
    assert by_budget["15%"].endswith("| - |")
