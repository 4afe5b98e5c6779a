"""The stage runner: one named, timed, logged sequence of stages for the backend, explain and calibration."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from tiny_models import NoStack, PlainDiT, timestep_embedding

import cachepass
from cachepass import stages
from cachepass.analysis.structure import analyse
from cachepass.errors import NoBlockStack, OptionError, SplitStack, UnsupportedStructure
from cachepass.options import parse_options

STAGES = ["block_stack", "regions", "checks", "residual_stream", "timestep", "indicators",
          "partition", "block_parts", "features", "exports", "variants", "compile"]


def captured(model, *args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend)(*args)
    return graphs


def plain(depth: int = 4):
    torch.manual_seed(0)
    return PlainDiT(depth=depth).eval(), torch.randn(1, 8, 4), torch.tensor([500.0])


def test_the_stage_list():
    assert [s.name for s in stages.PIPELINE] == STAGES
    assert [s.name for s in stages.ANALYSIS] == STAGES[:6]
    assert stages.TRANSFORM == stages.CUT + (stages.VARIANTS,)


def test_each_stage_logs_its_time_at_debug(caplog):
    model, x, t = plain()
    fast = torch.compile(model, backend=cachepass.backend(policy="interval", inner="eager"))
    with caplog.at_level(logging.DEBUG, logger="cachepass.stages"), torch.no_grad():
        fast(x, t)
    lines = [r.getMessage() for r in caplog.records if r.name == "cachepass.stages"]
    for name in STAGES:
        assert sum(bool(re.match(rf"stage {name}: \d+\.\d\d ms: ", line)) for line in lines) == 1, (name, lines)
    assert any("1 stream tensor(s)" in line for line in lines)
    assert any(line.startswith("stage partition:") and "blocks [0, 0) head, [0, 4) cached" in line for line in lines)


def test_a_failure_names_its_stage_and_the_ones_before():
    model, x, t = plain()
    ((gm, example),) = captured(model, x, t)
    state = stages.PassState(gm, model, requirements=parse_options({"policy": "dbcache", "Fn": 4}).policy.requirements())
    with pytest.raises(UnsupportedStructure) as info:
        stages.run_stages(state, stages.PIPELINE)
    message = str(info.value)
    assert message.startswith("the policy computes 4 first and 0 last blocks always, which leaves nothing to cache")
    assert ("(cachepass stage 'partition' failed; completed before it: block_stack, regions, checks, "
            "residual_stream, timestep, indicators)") in message
    assert info.value.stage == "partition" and info.value.completed == STAGES[:6]
    assert info.value.reason.startswith("the policy computes 4 first")
    assert state.failed == "partition" and state.completed == STAGES[:6] and "partition" in state.timings


def test_the_failure_reaches_the_fallback_warning_and_stats(caplog):
    model, x, t = plain()
    fast = torch.compile(model, backend=cachepass.backend(policy="dbcache", Fn=4, inner="eager"))
    with caplog.at_level(logging.WARNING, logger="cachepass"), torch.no_grad():
        out = fast(x, t)
        torch.testing.assert_close(out, model(x, t))
    reason = cachepass.stats(fast).uncached_reason
    assert reason.startswith("the policy computes 4 first") and "stage 'partition' failed" in reason
    assert any("stage 'partition' failed" in r.getMessage() for r in caplog.records)


def test_failures_keep_their_type():
    ((gm, _),) = captured(NoStack(), torch.randn(1, 2, 8), torch.tensor([1.0]))
    with pytest.raises(NoBlockStack, match=r"^no block stack found") as info:
        stages.analyse_graph(gm)
    assert "(cachepass stage 'block_stack' failed; completed before it: none)" in str(info.value)

    class Broken(PlainDiT):
        def forward(self, x, t):
            c = self.t_mlp(timestep_embedding(t, self.dim))
            h = self.embed(x)
            for layer in self.layers[:2]:
                h = layer(h, c)
            torch._dynamo.graph_break()
            for layer in self.layers[2:]:
                h = layer(h, c)
            return self.out(h)

    model = Broken(depth=4).eval()
    gm, _ = captured(model, torch.randn(1, 4, 4), torch.tensor([3.0]))[0]
    with pytest.raises(SplitStack, match="a graph break splits the block stack 'layers'") as info:
        stages.analyse_graph(gm, model)
    assert info.value.parent == "layers" and info.value.stage == "block_stack"


def test_other_errors_pass_through_with_a_note():
    model, x, t = plain()
    ((gm, _),) = captured(model, x, t)

    def broken(state):
        raise KeyError("missing")

    state = stages.PassState(gm, model)
    with pytest.raises(KeyError) as info:
        stages.run_stages(state, stages.ANALYSIS + (stages.Stage("broken", broken, lambda s: ""),))
    assert info.value.__notes__ == [
        "cachepass: raised in stage 'broken'; completed before it: " + ", ".join(STAGES[:6])]
    assert state.failed == "broken"


def test_analyse_is_the_analysis_stages():
    model, x, t = plain()
    ((gm, _),) = captured(model, x, t)
    structure = analyse(gm, model)
    state = stages.analyse_graph(gm, model)
    assert [b.module.qualified_name for b in structure.blocks] == [b.module.qualified_name for b in state.structure.blocks]
    assert {k: v.name for k, v in structure.indicators.items()} == {k: v.name for k, v in state.structure.indicators.items()}
    assert state.completed == STAGES[:6]


@pytest.fixture
def block_stack_calls(monkeypatch):
    calls = []
    original = stages.find_block_stack

    def counting(gm):
        calls.append(gm)
        return original(gm)

    monkeypatch.setattr(stages, "find_block_stack", counting)
    return calls


def test_backend_explain_and_calibration_analyse_each_graph_once(block_stack_calls):
    model, x, t = plain(depth=3)
    fast = torch.compile(model, backend=cachepass.backend(policy="teacache", inner="eager"))
    with torch.no_grad():
        fast(x, t)
    assert len(block_stack_calls) == 1

    cachepass.explain(model, x, t, policy="teacache")
    assert len(block_stack_calls) == 2

    from cachepass.calibration.record import record

    def run():
        for step in (900.0, 600.0, 300.0):
            model(x, torch.tensor([step]))

    recording = record(run, model)
    assert len(block_stack_calls) == 3
    assert recording.num_steps == 3 and set(recording.indicators) == {"timestep_embedding", "modulated_input"}


def test_explain_takes_policy_options():
    model, x, t = plain()
    one = cachepass.explain(model, x, t, policy="dbcache", options={"Fn": 1}).graphs[0]
    two = cachepass.explain(model, x, t, policy="dbcache", options={"Fn": 2}).graphs[0]
    assert one.caching and two.caching
    assert one.cut == (1, 4) and two.cut == (2, 4)
    assert two.node_counts["head"] > one.node_counts["head"]
    assert two.node_counts["cached"] < one.node_counts["cached"]
    text = str(cachepass.explain(model, x, t, policy="dbcache", options={"Fn": 2, "Bn": 1}))
    assert "cut: blocks [0, 2) run in the head, [2, 3) are cached, [3, 4) run after the decision" in text
    assert "indicator front_residual: " in text and "<- used by the policy" in text
    off = cachepass.explain(model, x, t, policy="dbcache", options={"Fn": 4})
    assert not off.caching and "stage 'partition' failed" in str(off)
    with pytest.raises(OptionError, match="'Fn'"):
        cachepass.explain(model, x, t, policy="dbcache", options={"Fn": -1})
    with pytest.raises(OptionError, match="'policy'"):
        cachepass.explain(model, x, t, options={"policy": "dbcache"})
