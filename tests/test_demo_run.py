"""`cachepass demo` on a short run: the table, the files, and that the policies really skip."""

import math

from cachepass.cli import main
from cachepass.demo.run import format_table, run_demo


def test_demo_table_and_outputs(tmp_path):
    lines = []
    rows = run_demo(steps=8, digits=(1, 7), policies=["interval", "taylorseer"], out_dir=tmp_path, log=lines.append)
    assert [r.policy for r in rows] == ["full", "interval", "taylorseer"]
    full, *cached = rows
    assert full.computed == [8, 8] and math.isinf(full.psnr)
    for row in cached:
        assert len(row.computed) == 2 and all(c < 8 for c in row.computed)  # cond and uncond both skip
        assert row.psnr > 15 and row.rel_l1 < 0.5
    table = format_table(rows)
    assert "computed/branch" in table and "PSNR dB" in table and "interval" in table
    assert (tmp_path / "demo.gif").stat().st_size > 0 and (tmp_path / "steps.png").stat().st_size > 0
    assert any(line.startswith("[1/3]") for line in lines)  # progress is shown


def test_cli_runs_the_demo(tmp_path, capsys):
    assert main(["demo", "--steps", "4", "--digits", "2", "--policies", "interval", "--out", str(tmp_path)]) == 0
    assert "interval" in capsys.readouterr().out
