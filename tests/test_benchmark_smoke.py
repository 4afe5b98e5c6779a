"""Smoke run of benchmarks/compare.py on the tiny workload: every column there, values that make sense."""

import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import compare, report  # noqa: E402

STEPS = 8


def run(tmp_path, methods):
    out = tmp_path / "rows.json"
    md = tmp_path / "table.md"
    args = compare.parse_args(["--workload", "tiny", "--steps", str(STEPS), "--repeats", "1", "--device", "cpu",
                               "--backend", "eager", "--json", str(out), "--markdown", str(md), "--methods", *methods])
    assert compare.main_with(args) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    return rows, md.read_text()


def test_cachepass_and_diffusers_rows(tmp_path):
    rows, table = run(tmp_path, ["cachepass:interval:interval=2", "diffusers-fbcache:threshold=0.1"])
    assert "| " + " | ".join(report.COLUMNS) + " |" in table
    assert list(rows) == ["eager", "compile", "cachepass interval interval=2",
                          "diffusers FirstBlockCache threshold=0.1"]
    assert all(r["status"] == "ok" for r in rows.values()), rows

    eager = rows["eager"]
    assert eager["speedup"] == 1.0 and eager["psnr"] == math.inf and eager["block_work"] == 1.0
    assert eager["graph_breaks"] is None  # not compiled
    assert rows["compile"]["graph_breaks"] == 0 and rows["compile"]["psnr"] > 80

    cp = rows["cachepass interval interval=2"]
    assert cp["computed"] == [STEPS // 2, STEPS // 2] and cp["computed_source"] == "cachepass.stats"
    assert cp["block_work"] == pytest.approx(0.5)  # the profiler agrees with cachepass.stats
    assert 20 < cp["psnr"] < math.inf and 0 < cp["rel_l1"] < 0.1
    assert cp["graph_breaks"] == 0 and cp["recompiles"] == 0 and cp["graphs"] >= 1
    assert cp["cache_mib"] > 0 and cp["seconds"] > 0 and cp["speedup"] > 0
    assert not cp["repeat_rel_l1"]  # every generation after the warm-up gives the same output

    fbc = rows["diffusers FirstBlockCache threshold=0.1"]
    assert fbc["computed"] is None and 0 < fbc["block_work"] < 1  # steps from the profiler only
    assert fbc["psnr"] > 20 and fbc["compiler"] == "eager"


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
