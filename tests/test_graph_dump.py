"""Graph dumps: the ``cachepass.graphs`` debug logger and the ``debug_dir`` option."""

from __future__ import annotations

import logging
import os
import pathlib
import re

import pytest
import torch
from tiny_models import NoStack, PlainDiT

import cachepass
from cachepass.errors import OptionError
from cachepass.options import parse_options


def plain(depth: int = 4):
    torch.manual_seed(0)
    return PlainDiT(depth=depth).eval(), torch.randn(1, 8, 4), torch.tensor([500.0])


def compile_and_run(model, x, t, **options):
    fast = torch.compile(model, backend=cachepass.backend(inner="eager", **options))
    with torch.no_grad():
        return fast(x, t)


def regions(folder: pathlib.Path) -> dict[str, list[str]]:
    """region -> node names, from regions.txt's table."""
    out: dict[str, list[str]] = {}
    lines = [line for line in (folder / "regions.txt").read_text().splitlines() if not line.startswith("#")]
    assert lines[0].split()[:2] == ["region", "node"]
    for line in lines[1:]:
        region, node = line.split()[:2]
        out.setdefault(region, []).append(node)
    return out


def defines(code: str, name: str) -> bool:
    return f"    {name} = " in code


def definition(code: str, name: str) -> str:
    return next(line for line in code.splitlines() if line.startswith(f"    {name} = "))


def test_debug_dir_writes_the_graphs_and_the_regions(tmp_path):
    model, x, t = plain()
    compile_and_run(model, x, t, policy="dbcache", Fn=2, Bn=1, debug_dir=tmp_path)
    (folder,) = tmp_path.iterdir()
    assert folder.name == "graph-000-PlainDiT"
    assert sorted(p.name for p in folder.iterdir()) == [
        "compute.py", "head.py", "input.py", "regions.txt", "reuse.py", "stages.txt"]
    code = {name: (folder / f"{name}.py").read_text() for name in ("input", "head", "compute", "reuse")}
    table = regions(folder)
    assert set(table) == {"input", "head", "cached", "after", "epilogue", "output"}
    for region, names in table.items():  # every node is one of the input graph's
        for name in names:
            assert name in code["input"], (region, name)
    for name in table["head"]:  # the head graph computes the head; compute and reuse do not
        assert defines(code["head"], name) and defines(code["input"], name)
        assert not defines(code["compute"], name)
        assert not defines(code["reuse"], name)  # the nodes a variant adds are named cp_..., never a head node's
    for name in table["cached"]:  # the cached blocks run in compute only
        assert defines(code["compute"], name) and not defines(code["reuse"], name), name
    for name in table["after"] + table["epilogue"]:  # what runs after the decision runs in both variants
        assert defines(code["compute"], name) and defines(code["reuse"], name), name
    text = (folder / "regions.txt").read_text()
    assert "# cut: blocks [0, 2) run in the head, [2, 3) are cached, [3, 4) and the epilogue run after" in text
    assert "layers.1" in text and "layers.2" in text
    summary = (folder / "stages.txt").read_text()
    for stage in ("block_stack", "partition", "variants", "compile"):
        assert f"\n{stage} " in summary and f"{stage}" in summary
    assert summary.rstrip().endswith("caching: on")


def _statements(code: str) -> tuple[list[str], dict[str, str]]:
    """A graph's code: the forward's parameters, and per name defined its statement's right-hand side."""
    params = re.search(r"def forward\(self, (.*)\):", code).group(1)
    args = [a.split(":")[0].strip() for a in params.split(", ")]
    defined = {}
    for line in code.splitlines():
        match = re.match(r"    (\w+) = (.*)$", line)
        if match and match.group(1) not in defined:
            defined[match.group(1)] = match.group(2).split(";  ")[0]
    return args, defined


@pytest.mark.parametrize("options", [{"policy": "dbcache", "Fn": 2, "Bn": 1},
                                     {"policy": "taylorseer", "granularity": "block"}], ids=["stack", "block"])
def test_added_nodes_never_take_an_original_name(tmp_path, options):
    """In the dumps a name means one node: a node the variants (or the reconstruction) add is named
    ``cp_...``, and a name the input graph has stands for the same computation in every variant."""
    model, x, t = plain()
    compile_and_run(model, x, t, debug_dir=tmp_path, **options)
    (folder,) = tmp_path.iterdir()
    args, original = _statements((folder / "input.py").read_text())
    added = set()
    for name in ("head", "compute", "reuse"):
        params, defined = _statements((folder / f"{name}.py").read_text())
        assert params[:len(args)] == args and all(p.startswith("cp_") for p in params[len(args):]), name
        values = set(original) | set(defined) | set(params) | set(args)

        def shape(rhs: str, values=values) -> str:  # the statement with every value name blanked
            return re.sub(r"\b\w+\b", lambda m: "_" if m.group(0) in values else m.group(0), rhs)

        for node, rhs in defined.items():
            if node.startswith("cp_"):
                assert node not in original, (name, node)
                added.add(node)
            else:
                assert node in original and shape(rhs) == shape(original[node]), (name, node, rhs, original[node])
    assert added, "the variants add nodes (a residual, a prediction, Taylor terms)"
    if options["policy"] == "dbcache":
        assert {"cp_front_residual"} < added and any(n.startswith("cp_residual_") for n in added)
        assert any(n.startswith("cp_reuse_") for n in added)
    else:
        assert any(n.startswith("cp_taylor_") for n in added)


def test_each_graph_gets_the_next_number(tmp_path):
    model, x, t = plain(depth=2)
    compile_and_run(model, x, t, policy="interval", debug_dir=str(tmp_path))
    torch._dynamo.reset()
    compile_and_run(model, x, t, policy="none", debug_dir=str(tmp_path))
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert folders == ["graph-000-PlainDiT", "graph-001-PlainDiT"]
    assert not (tmp_path / folders[1] / "reuse.py").exists()  # policy none never reuses
    assert (tmp_path / folders[1] / "compute.py").exists()


def test_a_fallback_graph_is_dumped_with_its_reason(tmp_path):
    x = torch.randn(1, 2, 8)
    compile_and_run(NoStack(), x, torch.tensor([1.0]), policy="interval", debug_dir=tmp_path)
    (folder,) = tmp_path.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["input.py", "stages.txt"]
    summary = (folder / "stages.txt").read_text()
    assert "block_stack" in summary and "failed: no block stack found" in summary
    assert "regions" in summary and "not run" in summary
    assert "caching off: no block stack found" in summary


def test_an_unwritable_debug_dir_warns_and_the_model_runs(tmp_path, caplog):
    model, x, t = plain(depth=2)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with caplog.at_level(logging.WARNING, logger="cachepass"):
        out = compile_and_run(model, x, t, policy="interval", debug_dir=blocker)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x, t))
    assert any("cannot write graph dumps" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("bad", [3, b"dumps", "", ["d"], True])
def test_debug_dir_must_be_a_path(bad):
    with pytest.raises(OptionError, match="'debug_dir'"):
        parse_options({"debug_dir": bad})
    with pytest.raises(ValueError, match="'debug_dir'"):
        cachepass.backend(debug_dir=bad)


def test_debug_dir_takes_str_and_pathlike(tmp_path):
    assert parse_options({"debug_dir": tmp_path}).debug_dir == os.fspath(tmp_path)
    assert parse_options({"debug_dir": "dumps"}).debug_dir == "dumps"
    assert parse_options({}).debug_dir is None


def test_the_graphs_logger_shows_each_stage_and_the_cut(caplog):
    model, x, t = plain(depth=3)
    with caplog.at_level(logging.DEBUG, logger="cachepass.graphs"):
        compile_and_run(model, x, t, policy="fbcache")
    said = [r.getMessage() for r in caplog.records if r.name == "cachepass.graphs"]
    assert said[0].startswith("input graph of PlainDiT (") and "def forward(" in said[0]
    for stage in ("block_stack", "regions", "checks", "residual_stream", "timestep", "indicators"):
        assert f"after stage {stage}: the graph is unchanged (the stage only reads it)" in said
    (cut,) = [m for m in said if m.startswith("after stage partition: the cut")]
    assert "# cut: blocks [0, 1) run in the head, [1, 3) are cached" in cut and "\nhead " in cut
    for name in ("head", "compute", "reuse"):
        (piece,) = [m for m in said if m.startswith(f"after stage variants: the {name} graph")]
        assert "def forward(" in piece


def test_nothing_is_dumped_by_default(caplog, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, x, t = plain(depth=2)
    with caplog.at_level(logging.DEBUG, logger="cachepass.stages"):
        compile_and_run(model, x, t, policy="interval")
    assert not any(r.name == "cachepass.graphs" for r in caplog.records)
    assert list(tmp_path.iterdir()) == []


def test_explain_dumps_the_input_and_the_cut(tmp_path):
    model, x, t = plain()
    cachepass.explain(model, x, t, policy="dbcache", options={"Fn": 3, "debug_dir": tmp_path})
    (folder,) = tmp_path.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["input.py", "regions.txt", "stages.txt"]
    assert "# cut: blocks [0, 3) run in the head, [3, 4) are cached" in (folder / "regions.txt").read_text()
    summary = (folder / "stages.txt").read_text()
    assert "exports" in summary and "variants" in summary and summary.rstrip().endswith("caching: on")
