"""A new policy is one module plus one registry line: proved with policies defined here.

``DriftPolicy`` below is what a new policy's module holds (its config, its requirements by indicator and
feature names, ``decide``, ``after_compute`` reading the observed tensors by name, its example options);
the test adds it to ``cachepass.POLICIES`` with one line (``monkeypatch.setitem``) and runs it through
``torch.compile(..., backend="cachepass")`` in diffusers' WanPipeline, changing nothing else.
``CalibratedDriftPolicy`` adds a :class:`~cachepass.policies.base.Calibration`: ``cachepass.calibrate``
fits it, writes its profile and reads it back without knowing it. The rest checks the pieces of the
interface: indicator and feature names, observed tensors by name, calibratable and not.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch
from conftest import relative_l1 as output_l1
from test_calibration import synthetic_recording
from tiny_models import PlainDiT, run_wan_pipeline, tiny_wan, tiny_wan_pipeline

import cachepass
from cachepass.analysis.features import check_feature_name, indicator_name, token_dependent
from cachepass.analysis.indicators import INDICATORS as ANALYSIS_INDICATORS
from cachepass.analysis.structure import analyse
from cachepass.calibration import Profile, calibratable_policies
from cachepass.errors import OptionError
from cachepass.options import parse_options
from cachepass.policies import base
from cachepass.policies.base import (
    MAX_STEPS,
    Calibration,
    CalibrationFit,
    CallContext,
    Policy,
    PolicyConfig,
    Requirements,
    check_float,
    check_int,
    is_forced_step,
)
from cachepass.policies.distance import relative_l1

# --- a new policy: what its module holds --------------------------------------------------------------

#: What DriftPolicy.after_compute was handed, per computed call: (branch index, step, names, shape of the last
#: block's output). Module-level so the test can read it (a real policy keeps such things in its state).
OBSERVED: list[tuple] = []


@dataclass(frozen=True)
class DriftConfig(PolicyConfig):
    threshold: float = 0.2  # relative L1 change of the timestep embedding since the last computed call
    warmup: int = 1

    def validate(self) -> None:
        check_float("threshold", self.threshold, minimum=0.0)
        check_int("warmup", self.warmup, minimum=1, maximum=MAX_STEPS)


@dataclass
class DriftState:
    reference: Any = None  # the indicator at the last computed call
    norms: list = field(default_factory=list)  # the last block's output norm per computed call


class DriftPolicy(Policy):
    """Reuse while the timestep embedding moved less than ``threshold`` since the last computed call."""

    name = "drift"
    config_class = DriftConfig
    examples = {
        "tiny": {},
        "tiny:warmup": {"threshold": 0.3, "warmup": 3},
        # the sequence-parallel test model's sin/cos embedding moves ~0.5-1 per step of 14
        "sequence_parallel": {"threshold": 1.0},
    }

    def requirements(self) -> Requirements:
        return Requirements(indicator="indicator:timestep_embedding", observe=("block_output:-1",))

    def new_state(self) -> DriftState:
        return DriftState()

    def decide(self, state: DriftState, ctx: CallContext, indicator) -> bool:
        if not is_forced_step(ctx, self.config.warmup) and state.reference is not None:
            if relative_l1(indicator, state.reference, ctx.sync) < self.config.threshold:
                return False
        state.reference = indicator.detach().clone()
        return True

    def after_compute(self, state: DriftState, ctx: CallContext, observed: dict) -> None:
        out = observed["block_output:-1"]
        state.norms.append(float(out.norm()))
        OBSERVED.append((ctx.branch_index, ctx.step, tuple(observed), tuple(out.shape)))


# --- a calibratable one: its Calibration and a profile option ---------------------------------------

@dataclass(frozen=True)
class CalibratedDriftConfig(DriftConfig):
    threshold: float | None = None  # None: the profile's, else 0.2
    profile: Any = None

    def validate(self) -> None:
        self.resolved()

    def resolved(self) -> "CalibratedDriftConfig":
        from cachepass.calibration.profile import fill_options

        config, _ = fill_options(self, CalibratedDriftPolicy.name, {"threshold": 0.2})
        return replace(config, threshold=check_float("threshold", config.threshold, minimum=0.0))


class DriftCalibration(Calibration):
    """Nothing to fit but the threshold: the replay of the policy on the recorded indicator chooses it."""

    options = ("warmup",)

    def fit(self, recording, *, indicator, degree, options, budget) -> CalibrationFit:
        fixed = {"warmup": options.get("warmup", 1)}
        return CalibrationFit(self.search(recording, fixed, indicator), fixed, {"indicator": indicator})

    def profile_options(self, fields) -> dict:
        return {"warmup": fields.integer("warmup", minimum=1, maximum=MAX_STEPS)}


class CalibratedDriftPolicy(DriftPolicy):
    name = "drift-calibrated"
    config_class = CalibratedDriftConfig
    calibration = DriftCalibration()
    examples = {"tiny": {}}

    def __init__(self, config: CalibratedDriftConfig) -> None:
        super().__init__(config.resolved())


@pytest.fixture
def registered(monkeypatch):
    """The one registry line of each policy above."""
    monkeypatch.setitem(cachepass.POLICIES, DriftPolicy.name, DriftPolicy)
    monkeypatch.setitem(cachepass.POLICIES, CalibratedDriftPolicy.name, CalibratedDriftPolicy)
    OBSERVED.clear()
    yield
    OBSERVED.clear()


# --- the new policy end to end -------------------------------------------------------------------

def test_a_new_policy_runs_end_to_end_from_its_registry_line(registered):
    pipe = tiny_wan_pipeline(tiny_wan(num_layers=3))
    reference = run_wan_pipeline(pipe, steps=8)
    pipe.transformer = torch.compile(pipe.transformer, backend="cachepass",
                                     options={"policy": "drift", "inner": "eager"})
    out = run_wan_pipeline(pipe, steps=8)
    stats = cachepass.stats(pipe.transformer)
    assert stats.caching and stats.policy == "drift"
    assert [s.name for s in stats.branches] == ["cond", "uncond"]
    for s in stats.branches:
        assert s.steps == 8 and s.computed_steps[0] == 0 and s.reused_steps, (s.computed_steps, s.reused_steps)
    assert output_l1(out, reference) < 0.05
    # after_compute got the observed tensor by the name the policy stated, once per computed call
    computed = sorted((s.index, step) for s in stats.branches for step in s.computed_steps)
    assert sorted((branch, step) for branch, step, _, _ in OBSERVED) == computed
    shapes = {(names, shape) for _, _, names, shape in OBSERVED}
    assert shapes == {(("block_output:-1",), (1, 32, 16))}  # (batch, tokens, width)


@pytest.mark.parametrize("example", ["tiny", "tiny:warmup"])
def test_a_new_policy_gets_the_registry_driven_checks(registered, example):
    """What the registry-driven tests do for every policy (parse its examples, run them on the DiT outside
    diffusers, as tests/test_policies_e2e.py does) holds for the new one too."""
    options = DriftPolicy.example(example)
    policy = parse_options({"policy": "drift", **options}).policy
    assert isinstance(policy, DriftPolicy) and policy.requirements().indicator == "timestep_embedding"
    assert DriftPolicy.tiny_examples() == {"tiny": {}, "tiny:warmup": {"threshold": 0.3, "warmup": 3}}
    compiled = torch.compile(PlainDiT().eval(), backend="cachepass",
                             options={"policy": "drift", "inner": "eager", "num_steps": 10, **options})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 4, generator=g)
    with torch.no_grad():
        for t in torch.linspace(999, 0, 10):
            compiled(x, torch.tensor([float(t)]))
    stats = cachepass.stats(compiled)
    assert stats.caching and stats.policy == "drift" and stats.branches[0].steps == 10
    with pytest.raises(OptionError, match="unknown option 'treshold' for policy 'drift'"):
        parse_options({"policy": "drift", "treshold": 0.1})


REGISTERED_RUN = """
import sys
import cachepass, pytest
import test_policy_registry
cachepass.POLICIES["drift"] = test_policy_registry.DriftPolicy  # the registry line
sys.exit(pytest.main(sys.argv[1:]))
"""


def _pytest_with_drift_registered(*args: str) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", REGISTERED_RUN, "-q", "-p", "no:cacheprovider", *args], cwd=here,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done.stdout


@pytest.mark.slow  # two pytest runs in a subprocess, 27 s on a 2-core machine
def test_the_registry_driven_tests_take_up_a_new_policy():
    """With the one registry line (in a fresh process, so that the tests' tables are built with it), the
    end-to-end and option tests run the new policy's examples and pass, and the digits test (minutes:
    collected only here) takes it up. (tests/test_distributed.py iterates the same registry, in ranks it
    spawns: those see a registry line written in cachepass/policies/__init__.py, not this process's.)"""
    out = _pytest_with_drift_registered("test_policies_e2e.py", "test_policies_options.py", "-k", "drift", "-rA")
    e2e, options = "test_policies_e2e.py", "test_policies_options.py"
    for path, case in ((e2e, "test_policy_end_to_end[drift]"), (e2e, "test_policy_end_to_end[drift-warmup]"),
                       (e2e, "test_policy_on_a_model_outside_diffusers[drift]"),
                       (e2e, "test_policy_on_a_model_outside_diffusers[drift-warmup]"),
                       (options, "test_every_declared_example_is_valid[drift]"),
                       (options, "test_unknown_option_lists_the_valid_ones[drift]")):
        assert f"PASSED {path}::{case}" in out, out[-3000:]
    assert "6 passed" in out, out[-3000:]
    collected = _pytest_with_drift_registered("test_policies_digits.py", "--collect-only")
    assert "test_policies_digits.py::test_default_policy_halves_the_work_and_stays_close[drift]" in collected


def test_an_unregistered_policy_is_an_option_error():
    with pytest.raises(OptionError, match="option 'policy' must be one of"):
        parse_options({"policy": "drift"})


# --- calibration: generic over the policies that declare one -----------------------------------------

def test_calibration_is_generic_over_calibratable_policies(registered, tmp_path):
    assert list(calibratable_policies()) == ["teacache", "magcache", "drift-calibrated"]
    recording = synthetic_recording()
    profile = cachepass.calibrate(None, torch.nn.Linear(1, 1), policy="drift-calibrated", target_steps=20,
                                  recording=recording, check=False)
    assert profile.policy == "drift-calibrated" and set(profile.options) == {"threshold", "warmup"}
    assert profile.report["fit"] == {"indicator": "timestep_embedding"}
    assert max(profile.report["predicted"]["computed_steps"]) <= 20
    path = profile.save(tmp_path / "drift.json")
    policy = parse_options({"policy": "drift-calibrated", "profile": str(path)}).policy
    assert policy.config.threshold == profile.options["threshold"] > 0
    # the profile's fields are the policy's: checked by its calibration, named in the error
    data = Profile.load(path).to_dict()
    data["options"]["warmup"] = 0
    with pytest.raises(OptionError, match=r"drift.json.*'options.warmup' must be >= 1"):
        Profile.from_dict(data, str(path))
    data["options"] = {"threshold": 0.1, "warmup": 1, "coefficients": [1.0]}
    with pytest.raises(OptionError, match="unknown field.*'options.coefficients'.*'drift-calibrated'"):
        Profile.from_dict(data, str(path))
    with pytest.raises(OptionError, match="unknown option.*'max_skip_steps'.*'drift-calibrated'"):
        cachepass.calibrate(None, torch.nn.Linear(1, 1), policy="drift-calibrated", recording=recording,
                            max_skip_steps=3)


@pytest.mark.parametrize("policy", ["fbcache", "customcache", "none", "drift"])
def test_a_policy_without_calibration_cannot_be_calibrated(registered, policy):
    with pytest.raises(OptionError, match=f"calibrate: policy must be one of 'teacache', 'magcache'.*policy "
                                          f"'{policy}' declares no calibration"):
        cachepass.calibrate(lambda: None, torch.nn.Linear(1, 1), policy=policy)


def test_an_unknown_policy_cannot_be_calibrated():
    with pytest.raises(OptionError, match="calibrate: policy must be one of 'teacache', 'magcache'; got 'nope'"):
        cachepass.calibrate(lambda: None, torch.nn.Linear(1, 1), policy="nope")


def test_a_profile_names_a_calibratable_policy(registered):
    data = {"format": "cachepass-profile", "version": 1, "policy": "drift", "num_steps": 4,
            "model": {"class": "Toy", "parameters": 1, "digest": "0" * 32}, "options": {"threshold": 0.1}}
    with pytest.raises(OptionError, match="field 'policy' must be one of 'teacache', 'magcache', "
                                          "'drift-calibrated', got 'drift'"):
        Profile.from_dict(data)


# --- indicators and features by name -----------------------------------------------------------------

def test_indicators_come_from_one_list():
    assert base.INDICATORS == tuple(ANALYSIS_INDICATORS) == (
        "timestep_embedding", "modulated_input", "first_block_output", "front_residual")
    found = []

    def recorder(gm, example_inputs):
        found.append(list(analyse(gm).indicators))
        return gm.forward

    from tiny_models import wan_inputs

    with torch.no_grad():
        torch.compile(tiny_wan(), backend=recorder)(timestep=torch.tensor([999]), **wan_inputs())
    analysed = [n for n, i in ANALYSIS_INDICATORS.items() if not i.made_by_partition]
    assert found == [analysed]  # the analysis finds every indicator of the list on Wan, in its order


def test_requirements_name_indicators_and_features():
    assert Requirements(indicator="indicator:modulated_input").indicator == "modulated_input"
    assert Requirements(indicator="front_residual", compute_first=1).indicator == "front_residual"
    assert indicator_name("timestep_embedding") == "timestep_embedding"
    for bad in ("block_output:0", "indicator:nope", "nope", 3):
        with pytest.raises(ValueError, match="is not one the head graph can compute"):
            Requirements(indicator=bad)
    ok = ("block_output:-1", "attention_output:middle", "indicator:timestep_embedding", "frame_grid",
          "stream_input", "stream_output")
    assert Requirements(observe=ok).observe == ok
    assert [check_feature_name(n) for n in ok] == list(ok)
    with pytest.raises(ValueError, match="unknown feature 'mlp_output:1'"):
        Requirements(observe=("mlp_output:1",))
    with pytest.raises(ValueError, match="made by the partition"):
        Requirements(observe=("indicator:front_residual",))
    with pytest.raises(ValueError, match="no indicator 'nope'"):
        check_feature_name("indicator:nope")
    with pytest.raises(ValueError, match="names a feature twice"):
        Requirements(observe=("frame_grid", "frame_grid"))
    assert not token_dependent("timestep_embedding") and not token_dependent("indicator:timestep_embedding")
    assert not token_dependent("frame_grid")
    assert token_dependent("front_residual") and token_dependent("block_output:0")


def test_observed_tensors_are_handed_over_by_name():
    p = parse_options({"policy": "adacache"}).policy
    assert p.requirements().observe == ("attention_output:middle", "frame_grid")
    a, b = torch.ones(1), torch.zeros(1, 1, 2, 1, 1)
    assert p.observed_by_name([a, b]) == {"attention_output:middle": a, "frame_grid": b}
    # frame_grid is optional (an image model has none): left out, the motion term is off
    assert p.requirements().optional == ("frame_grid",)
    assert p.observed_by_name([a]) == {"attention_output:middle": a}
    with pytest.raises(RuntimeError, match="returned 0 observed tensors for the 2 named"):
        p.observed_by_name([])
    # the motion term reads the grid by its name: 2 tokens per frame here, as tokens_per_frame=2 gives
    frames = torch.tensor([1.0, 1.0, 2.0, 2.0]).view(1, 4, 1).expand(1, 4, 3)
    by_grid, by_option = p.new_state(), parse_options({"policy": "adacache", "tokens_per_frame": 2}).policy
    by_option_state = by_option.new_state()
    for step, scale in [(0, 1.0), (1, 1.1), (2, 1.65)]:
        ctx = CallContext(0, step, 0, 20, None)
        p.after_compute(by_grid, ctx, {"frame_grid": torch.zeros(1, 1, 2, 1, 2),
                                       "attention_output:middle": frames * scale})
        by_option.after_compute(by_option_state, ctx, {"attention_output:middle": frames * scale})
    assert by_grid.intervals == by_option_state.intervals
    assert math.isfinite(by_grid.intervals[2][1]) and by_grid.intervals[2][1] > 1.0  # the motion term counted
