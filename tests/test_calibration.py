"""Calibration on synthetic trajectories and tiny models: the fit, the threshold choice, profiles, magcache."""

import json
import logging
import math
import random

import numpy as np
import pytest
import torch
from tiny_models import tiny_wan, wan_inputs

import cachepass
from cachepass.calibration import (
    ModelFingerprint,
    Profile,
    Recording,
    Trajectory,
    fit_teacache,
    load_profile,
    magnitude_ratios,
    record,
)
from cachepass.calibration.api import _search, compute_budget
from cachepass.errors import OptionError
from cachepass.options import parse_options
from cachepass.policies.base import CallContext
from cachepass.policies.magcache import nearest_resample

KNOWN = (30.0, -12.0, 2.5, 0.4, 0.01)  # numpy.poly1d order


def synthetic_recording(steps=50, branches=2, generations=2, seed=0, poly=KNOWN) -> Recording:
    """Trajectories whose one-step reuse error is exactly ``poly(indicator change)``; longer spans add up."""
    rng = random.Random(seed)
    trajs = []
    for g in range(generations):
        for s in range(branches):
            x = [math.nan] + [rng.uniform(0.01, 0.2) for _ in range(steps - 1)]
            step_err = [0.0] + [float(np.polyval(poly, v)) for v in x[1:]]
            reuse = {(t0, t): sum(step_err[t0 + 1:t + 1]) for t in range(steps) for t0 in range(max(0, t - 8), t)}
            ratios = [1.0] + [rng.uniform(0.95, 1.05) for _ in range(steps - 1)]
            trajs.append(Trajectory(g, s, 8, timesteps=[1000.0 - 20 * i for i in range(steps)],
                                    indicator_change={"timestep_embedding": x}, output_mean=[1.0] * steps,
                                    magnitude_ratio=ratios, reuse_abs=reuse))
    return Recording(trajs, steps, ("timestep_embedding",), 8, ModelFingerprint("Toy", 1, "0" * 32), [None])


# --- the fit --------------------------------------------------------------------------------------

def test_fit_recovers_known_coefficients():
    fit = fit_teacache(synthetic_recording(), "timestep_embedding", degree=4)
    np.testing.assert_allclose(fit.coefficients, KNOWN, rtol=1e-6, atol=1e-9)
    assert fit.r2 > 0.999999 and fit.relative_rms < 1e-6 and fit.points == 4 * 49


def test_fit_degree_is_selectable_and_reports_a_worse_fit_when_too_low():
    rec = synthetic_recording()
    assert fit_teacache(rec, "timestep_embedding", degree=2).degree == 2
    assert fit_teacache(rec, "timestep_embedding", degree=1).r2 < fit_teacache(rec, "timestep_embedding", 4).r2


def test_reuse_error_beyond_the_window_is_a_triangle_bound():
    traj = synthetic_recording(generations=1, branches=1).trajectories[0]
    assert traj.reuse_error(0, 20) == pytest.approx(traj.reuse_error(0, 8) + traj.reuse_error(8, 16)
                                                    + traj.reuse_error(16, 20))


def test_magnitude_ratios_are_the_mean_over_generations():
    rec = synthetic_recording()
    table = magnitude_ratios(rec)
    assert len(table) == 2 and len(table[0]) == 50
    a, b = rec.trajectories[0].magnitude_ratio, rec.trajectories[2].magnitude_ratio
    assert table[0][7] == pytest.approx((a[7] + b[7]) / 2)


# --- choosing the threshold -----------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["teacache", "magcache"])
def test_threshold_meets_the_compute_budget_exactly(policy):
    rec = synthetic_recording()
    search, _, _ = _search(policy, rec, "timestep_embedding", 4, {})
    fewest = search.count(math.inf)
    for steps in range(fewest, 40, 2):
        chosen = search.for_steps(steps)
        assert chosen.max_computed == steps, (steps, chosen.computed_per_branch())
        assert search.replay(chosen.threshold).computed == chosen.computed


def test_threshold_replay_is_the_policy_itself():
    """The replayed schedule equals what TeaCachePolicy decides on the same indicator values."""
    rec = synthetic_recording(generations=1, branches=1)
    search, fixed, _ = _search("teacache", rec, "timestep_embedding", 4, {})
    chosen = search.for_steps(15)
    policy = parse_options({"policy": "teacache", "threshold": chosen.threshold, **fixed}).policy
    state, value, computed = policy.new_state(), torch.ones(3, dtype=torch.float64) * 2, []
    traj = rec.trajectories[0]
    for step in range(50):
        if step:
            value = value * (1 + traj.indicator_change["timestep_embedding"][step])
        if policy.decide(state, CallContext(0, step, 0, 50, None), value) or not computed:
            computed.append(step)
    assert computed == chosen.computed[0]


def test_threshold_for_an_error_budget():
    rec = synthetic_recording()
    search, _, _ = _search("teacache", rec, "timestep_embedding", 4, {})
    chosen = search.for_error(0.05)
    assert chosen.error <= 0.05
    assert search.for_steps(chosen.max_computed - 1).error > 0.05  # one step fewer would break it
    assert search.for_error(1e-9).max_computed == 50  # nothing reused fits a budget that small


def test_compute_budget_from_a_speedup():
    assert compute_budget(50, 3.0, None) == 16 and compute_budget(50, 2.0, None) == 25
    assert compute_budget(50, None, 23) == 23


# --- profiles -------------------------------------------------------------------------------------

def teacache_profile(**over) -> dict:
    data = {"format": "cachepass-profile", "version": 1, "policy": "teacache", "num_steps": 50,
            "model": {"class": "Toy", "parameters": 1, "digest": "0" * 32},
            "options": {"threshold": 0.1, "indicator": "timestep_embedding", "coefficients": [1.0, 0.0],
                        "ret_steps": False}}
    data.update(over)
    return data


def test_profile_round_trip_sets_the_policy_options(tmp_path):
    path = Profile.from_dict(teacache_profile()).save(tmp_path / "p.json")
    policy = parse_options({"policy": "teacache", "profile": str(path)}).policy
    c = policy.config
    assert (c.threshold, c.indicator, c.coefficients, c.ret_steps) == (0.1, "timestep_embedding", [1.0, 0.0], False)
    assert list(policy.poly.coeffs) == [1.0, 0.0]
    assert parse_options({"policy": "teacache", "profile": str(path), "threshold": 0.3}).policy.config.threshold == 0.3


def test_calibrate_writes_branches_and_an_old_profile_still_loads(tmp_path):
    """A profile's report counts the recorded cond / uncond branches as ``recording.branches``; a profile
    written before that name (``recording.streams``) still loads, its report under the new key."""
    profile = cachepass.calibrate(None, torch.nn.Linear(1, 1), policy="magcache", target_steps=20,
                                  recording=synthetic_recording(), check=False)
    assert profile.report["recording"] == {"generations": 2, "branches": 2, "window": 8}
    old = json.loads(json.dumps(profile.to_dict()))
    old["report"]["recording"] = {"generations": 2, "streams": 2, "window": 8}  # what calibrate() wrote before
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    loaded = Profile.load(path)
    assert loaded.report["recording"] == {"generations": 2, "branches": 2, "window": 8}
    assert loaded.options == profile.options and loaded.num_steps == profile.num_steps == 50
    policy = parse_options({"policy": "magcache", "profile": str(path)}).policy
    assert policy.config.mag_ratios == profile.options["mag_ratios"]
    assert Profile.load(profile.save(tmp_path / "new.json")).report == profile.report


def test_old_calibration_names_still_work_and_warn():
    """``Trajectory.stream`` (and ``stream=``), ``Recording.streams``, ``Replay.streams`` and
    ``Replay.computed_per_stream()``: deprecated aliases that warn at the caller's line."""
    rec = synthetic_recording()
    with pytest.warns(DeprecationWarning, match="Recording.streams is deprecated; use Recording.num_branches") \
            as caught:
        assert rec.streams == rec.num_branches == 2
    assert caught[0].filename == __file__
    traj = rec.trajectories[1]
    with pytest.warns(DeprecationWarning, match="Trajectory.stream is deprecated; use Trajectory.branch_index"):
        assert traj.stream == traj.branch_index == 1
    with pytest.warns(DeprecationWarning, match=r"Trajectory\(stream=...\) is deprecated") as caught:
        assert Trajectory(0, stream=1, window=8).branch_index == 1
    assert caught[0].filename == __file__
    search, _, _ = _search("teacache", rec, "timestep_embedding", 4, {})
    replay = search.for_steps(20)
    with pytest.warns(DeprecationWarning, match="Replay.streams is deprecated; use Replay.branch_indices"):
        assert replay.streams == replay.branch_indices == [0, 1, 0, 1]
    with pytest.warns(DeprecationWarning, match=r"Replay.computed_per_stream\(\) is deprecated") as caught:
        assert replay.computed_per_stream() == replay.computed_per_branch() and replay.max_computed == 20
    assert caught[0].filename == __file__


def test_customcache_reads_a_teacache_profile_but_keeps_its_threshold(tmp_path):
    path = Profile.from_dict(teacache_profile()).save(tmp_path / "p.json")
    c = parse_options({"policy": "customcache", "profile": str(path)}).policy.config
    assert (c.threshold, c.coefficients) == (0.26, [1.0, 0.0])


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("num_steps"), "field 'num_steps' is missing"),
    (lambda d: d["options"].pop("coefficients"), "'options.coefficients' is missing"),
    (lambda d: d["options"].update(threshold="0.1"), "'options.threshold' must be a finite number"),
    (lambda d: d["options"].update(coefficients=[1, True]), r"coefficients\[1\]' must be a finite number"),
    (lambda d: d["options"].update(ret_steps=0), "'options.ret_steps' must be true or false"),
    (lambda d: d["model"].pop("digest"), "'model.digest' is missing"),
    (lambda d: d.update(num_steps=2.5), "'num_steps' must be an integer"),
    (lambda d: d.update(version=7), "version 7 is not supported"),
    (lambda d: d.update(format="teacache"), "not a cachepass profile"),
    (lambda d: d["options"].update(code="__import__('os')"), "unknown field.*options.code"),
])
def test_bad_profiles_are_clear_errors(tmp_path, change, message):
    data = teacache_profile()
    change(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message):
        parse_options({"policy": "teacache", "profile": str(path)})


def test_profile_that_is_not_json_or_missing(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_profile(str(tmp_path / "x.json"))
    with pytest.raises(ValueError, match="cannot read it"):
        load_profile(str(tmp_path / "missing.json"))


def test_profile_for_another_policy_or_indicator_is_an_error(tmp_path):
    path = Profile.from_dict(teacache_profile()).save(tmp_path / "p.json")
    with pytest.raises(ValueError, match="is a 'teacache' profile, not a 'magcache' one"):
        parse_options({"policy": "magcache", "profile": str(path)})
    with pytest.raises(ValueError, match="fitted on 'timestep_embedding'"):
        parse_options({"policy": "teacache", "profile": str(path), "indicator": "modulated_input"})


def test_profile_for_another_model_warns_when_compiled(tmp_path, caplog):
    model = tiny_wan()
    path = Profile.from_dict(teacache_profile()).save(tmp_path / "p.json")
    compiled = torch.compile(model, backend="cachepass", options={"policy": "teacache", "profile": str(path),
                                                                   "inner": "eager"})
    with caplog.at_level(logging.WARNING, logger="cachepass"), torch.no_grad():
        compiled(timestep=torch.tensor([999]), **wan_inputs())
    assert any("was made for Toy" in r.getMessage() and "WanTransformer3DModel" in r.getMessage()
               for r in caplog.records)
    mine = teacache_profile(model=ModelFingerprint.of(model).to_dict())
    assert Profile.from_dict(mine).check_model(model) and not Profile.from_dict(teacache_profile()).check_model(model)


def test_fingerprint_tells_architectures_apart_not_weights():
    a, b = tiny_wan(num_layers=3, seed=0), tiny_wan(num_layers=3, seed=1)
    assert ModelFingerprint.of(a) == ModelFingerprint.of(b)
    assert ModelFingerprint.of(a) != ModelFingerprint.of(tiny_wan(num_layers=2))


# --- magcache -------------------------------------------------------------------------------------

def magcache_decisions(policy, steps, num_steps=None, branch_index=0):
    state = policy.new_state()
    return [policy.decide(state, CallContext(0, s, branch_index, num_steps, None), None) for s in range(steps)]


def test_magcache_accumulates_ratio_error_and_limits_skips():
    ratios = [1.0, 1.0, 0.99, 0.99, 0.99, 0.99, 0.9, 0.99, 0.99, 0.99]
    p = parse_options({"policy": "magcache", "mag_ratios": ratios, "threshold": 0.05, "max_skip_steps": 2,
                       "retention_ratio": 0.2}).policy
    # steps 0-1 retained; 2: err .01 reuse; 3: ratio .9801 err .0299 reuse; 4: third skip > K -> compute;
    # 5: .01 reuse; 6: 1 - .891 > .05 -> compute; 7: .01; 8: .0299 reuse; 9: K -> compute
    assert magcache_decisions(p, 10, 10) == [True, True, False, False, True, False, True, False, False, True]


def test_magcache_profile_and_step_count_warning(tmp_path, caplog):
    data = {"format": "cachepass-profile", "version": 1, "policy": "magcache", "num_steps": 4,
            "model": {"class": "Toy", "parameters": 1, "digest": "0" * 32},
            "options": {"threshold": 0.5, "mag_ratios": [[1.0, 0.9, 0.9, 0.9]], "max_skip_steps": 1}}
    path = Profile.from_dict(data).save(tmp_path / "m.json")
    p = parse_options({"policy": "magcache", "profile": str(path)}).policy
    assert (p.config.threshold, p.config.max_skip_steps, p.config.retention_ratio) == (0.5, 1, 0.2)
    assert magcache_decisions(p, 4) == [True, False, True, False]
    with caplog.at_level(logging.WARNING, logger="cachepass"):
        magcache_decisions(p, 8, num_steps=8)
    assert any("calibrated for 4 steps but this generation has 8" in r.getMessage() for r in caplog.records)
    assert nearest_resample([1, 2, 3, 4], 7) == [1, 1, 2, 3, 3, 3, 4]  # round half to even, as np.round
    data["options"]["mag_ratios"] = [[1.0, 0.9]]
    with pytest.raises(ValueError, match="2 ratios per branch for num_steps=4"):
        Profile.from_dict(data)


def test_magcache_without_ratios_says_how_to_get_them():
    with pytest.raises(ValueError, match="needs the model's magnitude ratios"):
        parse_options({"policy": "magcache"})


# --- recording on a real (tiny) model -------------------------------------------------------------

def test_record_leaves_the_model_as_it_was():
    model = tiny_wan()
    inputs = wan_inputs()

    def run():
        for t in (999, 800, 600, 400):
            model(timestep=torch.tensor([t]), **inputs)
        return None

    with torch.no_grad():
        before = model(timestep=torch.tensor([999]), **inputs)[0]
    rec = record(run, model)
    assert rec.num_steps == 4 and rec.indicators == ("timestep_embedding", "modulated_input")
    traj = rec.trajectories[0]
    assert traj.magnitude_ratio[0] == 1.0 and all(v > 0 for v in traj.magnitude_ratio)
    assert math.isnan(traj.indicator_change["timestep_embedding"][0])
    assert all(traj.indicator_change["timestep_embedding"][1:]) and (0, 3) in traj.reuse_abs
    assert "_compiled_call_impl" not in model.__dict__
    assert not cachepass.stats(model).caching and "never run" in cachepass.stats(model).fallback_reason
    with torch.no_grad():
        assert torch.equal(model(timestep=torch.tensor([999]), **inputs)[0], before)


def test_record_needs_the_model_to_be_called():
    with pytest.raises(ValueError, match="recorded nothing: the model was never called"):
        record(lambda: None, tiny_wan())


def test_teacache_profile_for_another_step_count_warns_once(tmp_path, caplog):
    path = Profile.from_dict(teacache_profile()).save(tmp_path / "p.json")
    policy = parse_options({"policy": "teacache", "profile": str(path)}).policy
    with caplog.at_level(logging.WARNING, logger="cachepass"):
        for branch in (0, 1):
            policy.decide(policy.new_state(), CallContext(0, 0, branch, 30, None), torch.ones(2))
        policy.decide(policy.new_state(), CallContext(0, 0, 0, 50, None), torch.ones(2))
    warned = [r for r in caplog.records if "calibrated at 50 steps but the model runs 30" in r.getMessage()]
    assert len(warned) == 1


# --- issue 11: corrupt profiles are one clear OptionError naming the file; warnings once per cause --

def magcache_profile(**over) -> dict:
    data = {"format": "cachepass-profile", "version": 1, "policy": "magcache", "num_steps": 4,
            "model": {"class": "Toy", "parameters": 1, "digest": "0" * 32},
            "options": {"threshold": 0.5, "mag_ratios": [[1.0, 0.9, 0.9, 0.9]], "max_skip_steps": 1}}
    data.update(over)
    return data


def _rejects_file(path, policy="teacache", match="is not a valid cachepass profile"):
    with pytest.raises(OptionError, match=match) as info:
        parse_options({"policy": policy, "profile": str(path)})
    assert str(path) in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("content", [
    bytes(range(256)) * 4,  # a binary file renamed .json
    b"\x89PNG\r\n\x1a\n" + bytes(32),
    json.dumps(teacache_profile()).replace("Toy", "T\u00e9y").encode("latin-1"),  # not UTF-8
    json.dumps(teacache_profile()).encode("utf-16"),
    b"[" * 100_000 + b"]" * 100_000,  # a RecursionError before
    b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    b"[]", b"3", b'"profile"', b"null", b"", b"{} trailing",
    json.dumps(teacache_profile(num_steps=1)).replace('"num_steps": 1', '"num_steps": ' + "9" * 5000).encode(),
])
def test_unreadable_profiles_name_the_file(tmp_path, content):
    path = tmp_path / "p.json"
    path.write_bytes(content)
    _rejects_file(path)


@pytest.mark.parametrize("policy, change, field", [
    ("teacache", lambda d: d["options"].update(threshold=float("nan")), "options.threshold"),  # silently no caching
    ("teacache", lambda d: d["options"].update(threshold=float("inf")), "options.threshold"),
    ("teacache", lambda d: d["options"].update(coefficients=[1.0, float("nan")]), r"options.coefficients\[1\]"),
    ("teacache", lambda d: d["options"].update(coefficients={"1": 2}), "options.coefficients"),
    ("teacache", lambda d: d["options"].update(coefficients="wan2.1-t2v-1.3b"), "options.coefficients"),
    ("teacache", lambda d: d["options"].update(coefficients=[0.0] * 33), "options.coefficients"),
    ("teacache", lambda d: d["options"].update(indicator="first_block_output"), "options.indicator"),
    ("teacache", lambda d: d.update(num_steps=10**9), "num_steps"),
    ("teacache", lambda d: d.update(num_steps=True), "num_steps"),
    ("teacache", lambda d: d.update(model=[1]), "model"),
    ("teacache", lambda d: d.update(report="good"), "report"),
    ("teacache", lambda d: d.update(policy=["teacache"]), "policy"),
    ("magcache", lambda d: d["options"].update(mag_ratios=[[1.0, float("inf"), 0.9, 0.9]]),
     r"options.mag_ratios\[0\]\[1\]"),
    ("magcache", lambda d: d["options"].update(mag_ratios=[1.0, 0.9, 0.9, 0.9]), r"options.mag_ratios\[0\]"),
    ("magcache", lambda d: d["options"].update(mag_ratios={"0": [1.0]}), "options.mag_ratios"),
    ("magcache", lambda d: d["options"].update(retention_ratio=float("nan")), "options.retention_ratio"),
    ("magcache", lambda d: d["options"].update(retention_ratio=2), "options.retention_ratio"),
    ("magcache", lambda d: d["options"].update(max_skip_steps=1.5), "options.max_skip_steps"),
])
def test_bad_profile_fields_name_the_file_and_the_field(tmp_path, policy, change, field):
    data = teacache_profile() if policy == "teacache" else magcache_profile()
    change(data)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))  # NaN / Infinity written as JSON's extension tokens
    _rejects_file(path, policy, match=f"'{field}'")


def test_profiles_given_as_objects_or_dicts_are_checked_too():
    bad = Profile.from_dict(teacache_profile())
    bad.options = {**bad.options, "threshold": float("nan")}
    with pytest.raises(OptionError, match="'options.threshold'"):
        parse_options({"policy": "teacache", "profile": bad})
    data = teacache_profile()
    data["options"] = {**data["options"], 1: "x"}
    with pytest.raises(OptionError, match="option 'profile'.*key that is not a string"):
        parse_options({"policy": "teacache", "profile": data})


def test_profile_with_a_bom_and_numpy_free_json_loads(tmp_path):
    path = tmp_path / "p.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(teacache_profile()).encode())
    assert parse_options({"policy": "teacache", "profile": str(path)}).policy.config.threshold == 0.1


def test_profile_read_errors_name_the_option(tmp_path):
    with pytest.raises(OptionError, match="option 'profile'.*cannot read it"):
        parse_options({"policy": "teacache", "profile": str(tmp_path)})  # a directory
    with pytest.raises(OptionError, match="option 'profile'"):
        parse_options({"policy": "teacache", "profile": "a\0b"})


def test_profile_for_another_model_warns_once_per_cause(tmp_path, caplog):
    """Two loads (two graphs compile, each parses its options) and two checks: one WARNING, then DEBUG."""
    model = tiny_wan()
    path = Profile.from_dict(teacache_profile()).save(tmp_path / "p.json")
    with caplog.at_level(logging.DEBUG, logger="cachepass"):
        for _ in range(2):
            parse_options({"policy": "teacache", "profile": str(path)}).policy.check_model(model)
    said = [r for r in caplog.records if "was made for Toy" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING, logging.DEBUG]
    caplog.clear()
    other = Profile.from_dict(teacache_profile()).save(tmp_path / "q.json")  # another cause: warns again
    with caplog.at_level(logging.WARNING, logger="cachepass"):
        parse_options({"policy": "teacache", "profile": str(other)}).policy.check_model(model)
    assert sum("was made for Toy" in r.getMessage() for r in caplog.records) == 1


def test_profile_step_count_warning_once_across_loads(tmp_path, caplog):
    path = Profile.from_dict(teacache_profile()).save(tmp_path / "p.json")
    with caplog.at_level(logging.WARNING, logger="cachepass"):
        for _ in range(2):  # e.g. two graphs of one model, each with its own parsed options
            policy = parse_options({"policy": "teacache", "profile": str(path)}).policy
            for branch in (0, 1):
                policy.decide(policy.new_state(), CallContext(0, 0, branch, 30, None), torch.ones(2))
    assert sum("calibrated at 50 steps but the model runs 30" in r.getMessage() for r in caplog.records) == 1


def test_magcache_resample_warning_once_not_per_branch(caplog):
    options = {"policy": "magcache", "mag_ratios": [[1.0, 0.9, 0.9, 0.9], [1.0, 0.9, 0.9, 0.9]]}
    with caplog.at_level(logging.DEBUG, logger="cachepass"):
        for _ in range(2):  # two policy instances (two graphs) with the same ratios
            policy = parse_options(options).policy
            for branch in (0, 1):
                magcache_decisions(policy, 8, num_steps=8, branch_index=branch)
    said = [r for r in caplog.records if "calibrated for 4 steps but this generation has 8" in r.getMessage()]
    assert [r.levelno for r in said][:1] == [logging.WARNING]
    assert sum(r.levelno == logging.WARNING for r in said) == 1 and len(said) > 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cachepass"):  # another step count is another cause
        magcache_decisions(parse_options(options).policy, 6, num_steps=6)
    assert sum("this generation has 6" in r.getMessage() for r in caplog.records) == 1


def test_threshold_search_replays_an_unbounded_threshold():
    """Policies take finite thresholds only; the search's "no limit" replay still works."""
    search, _, _ = _search("magcache", synthetic_recording(), "timestep_embedding", 4, {})
    assert search.count(math.inf) == search.count(1e300)


def test_replays_take_the_first_branchs_steps_as_the_runtime_does():
    """branches="together" (the default): a later branch computes where its generation's first branch did
    (and its own first call), and decides alone past the steps the first branch reached."""
    from types import SimpleNamespace as NS

    from cachepass.calibration.threshold import follow_first_branch

    trajs = [NS(generation=0, branch_index=0, num_steps=6), NS(generation=0, branch_index=1, num_steps=8),
             NS(generation=1, branch_index=1, num_steps=6)]  # generation 1 recorded no first branch
    computed = [[0, 3, 5], [0, 1, 6, 7], [0, 4]]
    assert follow_first_branch(trajs, computed) == [[0, 3, 5], [0, 3, 5, 6, 7], [0, 4]]
