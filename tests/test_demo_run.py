"""`cachepass demo` on short runs: the tables, the files, that the policies really skip, and that the
full row is timed under the same compiler (cachepass, policy "none", the same inner) as the policies."""

import math

import torch

from cachepass.cli import main
from cachepass.demo.run import block_work, format_result, format_table, run_demo


def test_demo_tables_and_outputs(tmp_path, monkeypatch):
    compiled = []
    real_compile = torch.compile

    def spy(model, **kwargs):
        compiled.append((kwargs.get("backend"), dict(kwargs.get("options") or {})))
        return real_compile(model, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    lines = []
    results = run_demo(models=("wan", "flux"), steps=6, digits=(1, 7), policies=["interval", "taylorseer"],
                       repeats=2, out_dir=tmp_path, log=lines.append)
    assert [r.model for r in results] == ["wan", "flux"]
    # every row, the full one first, through cachepass with the same inner compiler
    assert [(b, o["policy"], o["inner"]) for b, o in compiled] == [
        ("cachepass", p, "eager") for p in ("none", "interval", "taylorseer")] * 2
    for result in results:
        assert [r.policy for r in result.rows] == ["full", "interval", "taylorseer"]
        full, *cached = result.rows
        assert full.compiled_policy == "none" and [r.compiled_policy for r in cached] == ["interval", "taylorseer"]
        assert full.computed == [6, 6] and math.isinf(full.psnr) and full.speedup == 1.0 and full.ideal == 1.0
        for row in cached:
            assert len(row.computed) == 2 and all(c < 6 for c in row.computed)  # cond and uncond both skip
            assert row.ideal == 12 / sum(row.computed)  # every block of a computed step, none of a reused one
            assert row.speedup == full.seconds / row.seconds and len(row.times) == 2
            assert row.psnr > 15 and row.rel_l1 < 0.5
        table = format_table(result.rows)
        assert "ideal" in table.splitlines()[0] and "measured" in table.splitlines()[0]
        assert "policy 'none'" in format_result(result) and "median of 2" in format_result(result)
    assert (tmp_path / "demo.gif").stat().st_size > 0 and (tmp_path / "steps.png").stat().st_size > 0
    assert (tmp_path / "flux.png").stat().st_size > 0 and (tmp_path / "flux-steps.png").stat().st_size > 0
    assert any(line.startswith("[wan 1/3]") for line in lines) and any(line.startswith("[flux 3/3]") for line in lines)


def test_ideal_counts_the_blocks_run_on_every_call():
    assert block_work("interval", {}, [5, 5], 10, 4) == 0.5
    # fbcache runs its first block on reused steps too: 5 x 4 + 5 x 1 of 10 x 4 blocks
    assert block_work("fbcache", {}, [5, 5], 10, 4) == 25 / 40
    assert block_work("none", {}, [10, 10], 10, 4) == 1.0


def test_cli_runs_the_demo(tmp_path, capsys):
    argv = ["demo", "--model", "flux", "--steps", "4", "--digits", "2", "--policies", "interval", "--repeats", "1",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "FLUX" in out and "interval" in out and "Wan" not in out
