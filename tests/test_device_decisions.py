"""``decisions="device"`` (issue 14): the decision taken on the device, in one compiled step graph with
``torch.cond`` (cachepass/runtime/device_program.py, cachepass/transform/device_variant.py).

* host reads: the device path's own logic reads nothing back per call, only the decision record once per
  generation (shown with the ``select`` branch form, which has no ``cond``); with ``torch.cond`` every
  non-forced call adds exactly cond's own predicate read (``if pred:`` in torch's eager ``cond``);
* the same decisions as the host path, bit for bit, on the embedded model (outputs within 1e-5), in the first
  and second generation;
* inner ``eager`` and one small inductor run.
"""

import logging

import pytest
import torch
from test_host_reads import count_host_reads
from tiny_models import run_wan_pipeline, tiny_wan, tiny_wan_pipeline

import cachepass
from cachepass.demo import generate, load_digits_model, make_pipeline
from cachepass.errors import OptionError
from cachepass.options import parse_options
from cachepass.policies import POLICIES
from cachepass.runtime import device_program

STEPS = 8
DEVICE_POLICIES = ["teacache", "fbcache"]


def compiled_pipeline(policy: str, decisions: str, inner: str = "eager", **extra):
    torch._dynamo.reset()
    model = tiny_wan()
    pipe = tiny_wan_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    options = {"policy": policy, "inner": inner, "decisions": decisions, **POLICIES[policy].example("tiny"), **extra}
    pipe.transformer = torch.compile(model, backend="cachepass", options=options)
    return pipe


def computed_steps(model) -> list[list[int]]:
    return [b.computed_steps for b in cachepass.stats(model).branches]


def test_the_option_is_validated_and_host_is_the_default():
    assert parse_options({}).decisions == "host"
    assert parse_options({"decisions": "device"}).decisions == "device"
    for bad in ("gpu", True, None, 1):
        with pytest.raises(OptionError, match="'decisions'"):
            parse_options({"decisions": bad})


def test_policies_state_their_device_rule():
    tea = parse_options({"policy": "teacache"}).policy.device_rule()
    assert tea.accumulate and tea.reference == "previous" and (tea.first, tea.last) == (1, 1)
    fb = parse_options({"policy": "fbcache", "warmup": 2}).policy.device_rule()
    assert not fb.accumulate and fb.reference == "computed" and fb.first == 2 and fb.coefficients is None
    assert getattr(parse_options({"policy": "interval"}).policy, "device_rule", None) is None


@pytest.fixture(scope="module")
def plain_reads():
    pipe = tiny_wan_pipeline(tiny_wan())
    pipe.set_progress_bar_config(disable=True)
    run_wan_pipeline(pipe, steps=STEPS)
    return count_host_reads(lambda: run_wan_pipeline(pipe, steps=STEPS))


def _reads(pipe) -> tuple[int, int]:
    """(host reads of one generation, those that are ``torch.cond``'s predicate: ``aten::is_nonzero``)."""
    run_wan_pipeline(pipe, steps=STEPS)  # compiles
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run_wan_pipeline(pipe, steps=STEPS)
    predicates = sum(1 for e in prof.events() if e.name == "aten::is_nonzero")
    return count_host_reads(lambda: run_wan_pipeline(pipe, steps=STEPS)), predicates


@pytest.mark.parametrize("policy", DEVICE_POLICIES)
def test_the_device_path_reads_nothing_back_per_call(policy, plain_reads, monkeypatch):
    """Without ``cond`` (both variants run, ``torch.where`` selects) a generation of 16 calls adds one read:
    the decision record, when the request ends."""
    monkeypatch.setattr(device_program, "BRANCH", "select")
    pipe = compiled_pipeline(policy, "device")
    reads, predicates = _reads(pipe)
    assert reads - plain_reads == 1 and predicates == 0, f"{policy}: {reads - plain_reads} reads in {2 * STEPS} calls"
    reused = [b.reused_steps for b in cachepass.stats(pipe.transformer).branches]
    assert all(reused), "the tiny example must reuse for the count to mean something"


@pytest.mark.parametrize("policy", DEVICE_POLICIES)
def test_with_torch_cond_the_only_reads_per_call_are_its_predicate(policy, plain_reads):
    pipe = compiled_pipeline(policy, "device")
    reads, predicates = _reads(pipe)
    forced = 2 * 2 if policy == "teacache" else 2  # teacache: first and last step; fbcache: warmup 1; 2 branches
    assert predicates == 2 * STEPS - forced  # one per call that the step graph decides
    assert reads - plain_reads == predicates + 1
    host = compiled_pipeline(policy, "host")
    host_reads, _ = _reads(host)
    assert host_reads - plain_reads == predicates  # the host path: one read per decided call


def _digits_runs(policy: str, decisions: str, steps: int = 20):
    torch._dynamo.reset()
    model = load_digits_model()
    pipe = make_pipeline(model)
    pipe.transformer = torch.compile(model, backend="cachepass",
                                     options={"policy": policy, "inner": "eager", "decisions": decisions})
    runs = []
    with torch.no_grad():
        for seed in (0, 1):  # first and second generation
            out = generate(pipe, [3, 7], num_inference_steps=steps, seed=seed)
            runs.append((out, computed_steps(pipe.transformer)))
    return runs


@pytest.mark.parametrize("policy", DEVICE_POLICIES)
def test_same_decisions_as_the_host_path_on_the_embedded_model(policy):
    host, device = _digits_runs(policy, "host"), _digits_runs(policy, "device")
    for generation, ((h_out, h_steps), (d_out, d_steps)) in enumerate(zip(host, device)):
        assert d_steps == h_steps, f"generation {generation}"
        assert all(len(s) < 20 for s in h_steps), "the policy must reuse for the comparison to mean something"
        torch.testing.assert_close(d_out, h_out, atol=1e-5, rtol=0)


def test_stats_mid_generation_are_complete(monkeypatch):
    """``cachepass.stats`` asked during a generation reads the decisions back then, once."""
    pipe = compiled_pipeline("teacache", "device")
    seen = []

    def on_step_end(pipeline, i, t, kwargs):
        seen.append(sum(b.steps for b in cachepass.stats(pipe.transformer).branches))
        return kwargs

    with torch.no_grad():
        pipe(prompt_embeds=torch.randn(1, 5, 16), negative_prompt_embeds=torch.randn(1, 5, 16), height=64, width=64,
             num_frames=5, num_inference_steps=4, guidance_scale=4.0, output_type="latent",
             callback_on_step_end=on_step_end)
    assert seen == [2, 4, 6, 8]


def test_a_policy_without_a_device_rule_decides_on_the_host_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="cachepass"):
        pipe = compiled_pipeline("customcache", "device")  # teacache's rule, TaylorSeer's reconstruction
        run_wan_pipeline(pipe, steps=STEPS)
        run_wan_pipeline(pipe, steps=STEPS)
    warnings = [r.getMessage() for r in caplog.records if "decisions='device'" in r.getMessage()]
    assert len(warnings) == 1 and "taylor" in warnings[0]
    assert all(b.reused_steps for b in cachepass.stats(pipe.transformer).branches)


def test_inductor_compiles_the_step_graph():
    """One small inductor run: the step graph with torch.cond and the in-place cache writes compiles and
    decides as the host path does."""
    host = compiled_pipeline("teacache", "host", inner="eager")
    expected = run_wan_pipeline(host, steps=6)
    expected_steps = computed_steps(host.transformer)
    pipe = compiled_pipeline("teacache", "device", inner="inductor")
    out = run_wan_pipeline(pipe, steps=6)
    assert computed_steps(pipe.transformer) == expected_steps
    assert all(b.reused_steps for b in cachepass.stats(pipe.transformer).branches)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
