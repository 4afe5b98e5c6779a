"""The scripts in examples/ run as documented (short settings) and print what they promise."""

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, argv: list[str], capsys) -> str:
    old = sys.argv
    sys.argv = [str(EXAMPLES / name), *argv]
    try:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    finally:
        sys.argv = old
    return capsys.readouterr().out


def test_raw_loop(capsys):
    out = run_example("raw_loop.py", [], capsys)
    assert "3 generation(s)" in out and "branch 0: computed" in out


def test_explain_model(capsys):
    out = run_example("explain_model.py", ["--policy", "dbcache", "--Fn", "2"], capsys)
    assert "4 x WanTransformerBlock" in out and "blocks [0, 2) run in the head" in out and "caching: on" in out


@pytest.mark.parametrize("name, argv", [
    ("wan_pipeline.py", ["--steps", "6", "--policy", "interval"]),
    ("flux_pipeline.py", ["--steps", "6", "--policy", "interval"]),
])
def test_pipeline_examples(name, argv, capsys):
    out = run_example(name, argv, capsys)
    assert "branch 0 (cond)" in out and "branch 1 (uncond)" in out and "PSNR against full compute" in out
