"""Each policy's decision rule on hand-worked indicator sequences: exact skip schedules.

``True`` = compute, ``False`` = reuse. Indicators are small constant tensors, so every relative L1
change is a ratio that can be worked out by hand (written next to each case).
"""

from __future__ import annotations

import pytest
import torch

from cachepass.options import parse_options
from cachepass.policies.adacache import CODEBOOK_30_FAST, CODEBOOK_50, CODEBOOK_100, auto_codebook, interpolate_codebook
from cachepass.policies.base import CallContext
from cachepass.reconstruction import ResidualReuse, TaylorReuse


def policy(**options):
    return parse_options({"inner": "eager", **options}).policy


def ctx(step, num_steps=None, branch_index=0):
    return CallContext(generation=0, step=step, branch_index=branch_index, num_steps=num_steps, timestep=None)


def run(p, values, num_steps=None, state=None):
    """Decide over a sequence of scalar indicator values (one call per step)."""
    state = p.new_state() if state is None else state
    return [p.decide(state, ctx(i, num_steps), torch.full((4,), float(v))) for i, v in enumerate(values)]


T, F = True, False


# --- teacache ------------------------------------------------------------------------------------

def test_teacache_accumulates_change_against_the_previous_call():
    # d = 0.1 per call (each value 1.1x the previous); identity rescale, threshold 0.25:
    # step 0 forced; acc 0.1, 0.2 reuse; 0.3 -> compute, acc = 0; 0.1 reuse.
    # Against the last *computed* call instead it would compute at step 2 (acc 0.1 + 0.21).
    p = policy(policy="teacache", coefficients="identity", threshold=0.25)
    assert run(p, [1, 1.1, 1.21, 1.331, 1.4641]) == [T, F, F, T, F]


def test_teacache_polynomial_is_numpy_poly1d_order():
    # coefficients (1000, 0, 0, 0, 0): poly(d) = 1000 d^4 (highest power first).
    # d: -, 0.1, 0.2, 0.1, 0 -> poly 0.1 (reuse), 1.6 (acc 1.7: compute), 0.1 (reuse), 0 (reuse).
    # Read lowest-power-first it would be the constant 1000 and compute every step.
    p = policy(policy="teacache", coefficients=[1000, 0, 0, 0, 0], threshold=0.25)
    assert run(p, [1, 1.1, 1.32, 1.452, 1.452]) == [T, F, T, F, F]


def test_teacache_forced_steps():
    constant = [1.0] * 8  # d = 0: with the identity rescale nothing accumulates
    options = {"policy": "teacache", "coefficients": "identity"}
    # use_ret_steps=False: step 0 and the last step (known from num_steps)
    assert run(policy(**options), constant, num_steps=8) == [T, F, F, F, F, F, F, T]
    # last step unknown (first generation without num_steps): only step 0
    assert run(policy(**options), constant) == [T] + [F] * 7
    # use_ret_steps=True: the first 5 steps, the last one not forced
    assert run(policy(**options, ret_steps=True), constant, num_steps=8) == [T] * 5 + [F] * 3


def test_teacache_wan_coefficients_accumulate_even_without_change():
    # Wan2.1 T2V 1.3B (no ret steps): poly(0) = c4 = 0.1379, so with threshold 0.2 a static indicator
    # still computes every other step: acc 0.138 (reuse), 0.276 (compute), ...
    assert run(policy(policy="teacache", threshold=0.2), [1.0] * 6) == [T, F, T, F, T, F]


def test_teacache_forced_step_resets_the_accumulator():
    # d = 0.1 per call, threshold 0.25, 4 steps: acc 0.1, 0.2 then step 3 is forced (last) -> acc 0;
    # a new generation's state starts from zero as well.
    p = policy(policy="teacache", coefficients="identity", threshold=0.25)
    state = p.new_state()
    assert run(p, [1, 1.1, 1.21, 1.331], num_steps=4, state=state) == [T, F, F, T]
    assert state.accumulated == 0.0


def test_teacache_coefficient_presets():
    assert policy(policy="teacache").poly.coeffs.tolist() == [2.39676752e3, -1.31110545e3, 2.01331979e2,
                                                               -8.29855975, 1.37887774e-1]
    assert policy(policy="teacache", ret_steps=True).poly.coeffs.tolist() == [
        -5.21862437e4, 9.23041404e3, -5.28275948e2, 1.36987616e1, -4.99875664e-2]
    assert policy(policy="teacache", coefficients="wan2.1-i2v-720p").poly.coeffs.tolist() == [
        -114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683]
    # identity: [0, 0, 0, 1, 0] -> poly(d) = d
    assert policy(policy="teacache", coefficients="identity").poly(0.37) == pytest.approx(0.37)


def test_teacache_states_are_independent_per_branch():
    p = policy(policy="teacache", coefficients="identity", threshold=0.25)
    a, b = p.new_state(), p.new_state()
    values = [1, 1.1, 1.21, 1.331]
    got_a, got_b = [], []
    for i, v in enumerate(values):  # interleaved like cond/uncond; branch b never changes
        got_a.append(p.decide(a, ctx(i, branch_index=0), torch.full((4,), float(v))))
        got_b.append(p.decide(b, ctx(i, branch_index=1), torch.full((4,), 1.0)))
    assert got_a == [T, F, F, T] and got_b == [T, F, F, F]


def test_old_branch_names_of_the_policy_interface_still_work_and_warn():
    """``CallContext.stream`` (and the keyword ``stream=``), ``MAX_STREAMS`` and magcache's
    ``ratios_per_stream``: deprecated aliases of ``branch_index``, ``MAX_BRANCHES`` and
    ``ratios_per_branch``, each warning at the caller's line."""
    from cachepass.policies import base, magcache

    c = ctx(3, branch_index=1)
    with pytest.warns(DeprecationWarning, match="CallContext.stream is deprecated; use CallContext.branch_index") \
            as caught:
        assert c.stream == c.branch_index == 1
    assert caught[0].filename == __file__
    with pytest.warns(DeprecationWarning, match=r"CallContext\(stream=...\) is deprecated") as caught:
        old = CallContext(generation=0, step=3, stream=1, num_steps=None, timestep=None)
    assert caught[0].filename == __file__
    assert old == c
    with pytest.raises(TypeError, match="both 'stream'"):
        CallContext(0, 3, branch_index=1, stream=1, num_steps=None, timestep=None)
    with pytest.warns(DeprecationWarning, match="MAX_STREAMS is deprecated; use .*MAX_BRANCHES") as caught:
        assert base.MAX_STREAMS == base.MAX_BRANCHES == 64
    assert caught[0].filename == __file__
    with pytest.warns(DeprecationWarning, match="ratios_per_stream is deprecated; use .*ratios_per_branch"):
        assert magcache.ratios_per_stream([1.0, 0.9]) == magcache.ratios_per_branch([1.0, 0.9]) == [[1.0, 0.9]]


def test_customcache_decides_like_teacache_and_rebuilds_by_taylor():
    p = policy(policy="customcache", coefficients="identity", threshold=0.25)
    assert run(p, [1, 1.1, 1.21, 1.331, 1.4641]) == [T, F, F, T, F]
    assert p.requirements().reconstruction == TaylorReuse(order=1)
    assert p.requirements().indicator == "timestep_embedding"
    assert policy(policy="customcache").config.threshold == 0.26


# --- taylorseer ----------------------------------------------------------------------------------

def schedule(p, num_steps, known=True):
    state = p.new_state()
    return [s for s in range(num_steps) if p.decide(state, ctx(s, num_steps if known else None), None)]


def test_taylorseer_reference_schedule_13_of_50():
    p = policy(policy="taylorseer", final_steps=0)  # the reference forces no last step
    assert schedule(p, 50) == list(range(0, 50, 4))
    assert len(schedule(p, 50)) == 13
    assert schedule(policy(policy="taylorseer"), 50) == list(range(0, 50, 4)) + [49]  # the default: the last too
    assert p.requirements().reconstruction == TaylorReuse(order=1)


def test_taylorseer_warmup_interval_and_final_steps():
    # after warmup steps 0, 1, 2 the counter restarts from the last warmup step: 6, 10, ...
    assert schedule(policy(policy="taylorseer", warmup=3, interval=4, final_steps=0), 16) == [0, 1, 2, 6, 10, 14]
    # final_steps needs the step count
    p = policy(policy="taylorseer", interval=5, final_steps=1, order=3)
    assert schedule(p, 12) == [0, 5, 10, 11]
    assert schedule(p, 12, known=False) == [0, 5, 10]
    assert p.requirements().reconstruction == TaylorReuse(order=3)


# --- adacache ------------------------------------------------------------------------------------

def adacache_run(p, features: dict, num_steps):
    """Decide every step; on compute, hand the policy ``features[step]`` (a scale of ones)."""
    state, computed = p.new_state(), []
    for s in range(num_steps):
        if p.decide(state, ctx(s, num_steps), None):
            computed.append(s)
            feature = torch.full((1, 4, 3), features.get(s, 1.0))
            p.after_compute(state, ctx(s, num_steps), {"attention_output:middle": feature})  # by name
    return computed, state


def test_adacache_codebook_intervals():
    # 100-step codebook {0.03: 12, 0.05: 10, 0.07: 8, 0.09: 6, 0.11: 4, 1.0: 3}, motion off.
    # step 1: change 0.02 / gap 1 = 0.02 -> 12, next 13;  13: 0.24 / 12 = 0.02 -> 12, next 25;
    # 25: 0.72 / 12 = 0.06 -> 8, next 33;  33: 0.8 / 8 = 0.1 -> 4, next 37;  37: 1.0 / 4 = 0.25 -> 3, next 40;
    # 40 onwards: no change -> 12;  98, 99 forced (final_steps=2).
    f = {0: 1.0, 1: 1.02}
    f[13] = f[1] * 1.24
    f[25] = f[13] * 1.72
    f[33] = f[25] * 1.8
    f[37] = f[33] * 2.0
    for s in range(38, 100):
        f[s] = f[37]
    p = policy(policy="adacache", motion=False, codebook="100")
    computed, state = adacache_run(p, f, 100)
    assert computed == [0, 1, 13, 25, 33, 37, 40, 52, 64, 76, 88, 98, 99]
    assert [i for _, _, i in state.intervals[:7]] == [1, 12, 12, 8, 4, 3, 12]
    assert state.intervals[3][1] == pytest.approx(0.06)


def test_adacache_motion_regularisation():
    # two frames of 2 tokens: frame 1 is twice frame 0, so mo = |2-1| / (2 + 1) = 1/3 at every step.
    # window for 20 steps: [2, 18]. Step 1 is outside (moreg 1); step 2 inside:
    # moreg = (1/3 / 0.385)^8, mograd = 10 (moreg - 1) / 1, d = 0.5 * (moreg + |mograd|).
    p = policy(policy="adacache", tokens_per_frame=2, codebook={0.05: 2, 100.0: 1})
    state = p.new_state()
    frames = torch.tensor([1.0, 1.0, 2.0, 2.0]).view(1, 4, 1).expand(1, 4, 3)
    for step, scale in [(0, 1.0), (1, 1.1), (2, 1.65)]:
        assert p.decide(state, ctx(step, 20), None)
        p.after_compute(state, ctx(step, 20), {"attention_output:middle": frames * scale})
    moreg = ((1 / 3) / 0.385) ** 8
    assert state.intervals[1][1] == pytest.approx(0.1)  # outside the window: raw change
    assert state.intervals[2][1] == pytest.approx(0.5 * (moreg + 10 * abs(moreg - 1)))
    assert state.previous_moreg == pytest.approx(moreg)
    assert p.requirements().observe == ("attention_output:middle",)  # tokens_per_frame given: no grid
    assert policy(policy="adacache").requirements().observe == ("attention_output:middle", "frame_grid")


def test_adacache_codebooks():
    assert CODEBOOK_50 == {0.05: 8, 0.1: 7, 0.14: 5, 0.19: 4, 0.23: 3, 1.0: 2}
    assert interpolate_codebook(CODEBOOK_100, 100, CODEBOOK_30_FAST, 30, 100) == CODEBOOK_100
    assert interpolate_codebook(CODEBOOK_100, 100, CODEBOOK_30_FAST, 30, 30) == CODEBOOK_30_FAST
    assert auto_codebook(100) is CODEBOOK_100 and auto_codebook(80) is CODEBOOK_100
    assert auto_codebook(50) is CODEBOOK_50 and auto_codebook(40) is CODEBOOK_50 and auto_codebook(None) is CODEBOOK_50
    assert auto_codebook(30) is CODEBOOK_30_FAST and auto_codebook(10) is CODEBOOK_30_FAST


# --- fbcache / dbcache ---------------------------------------------------------------------------

def test_fbcache_compares_against_the_last_computed_call():
    # threshold 0.12; reference 1.0 from step 0: 0.05, 0.10 reuse; 0.15 -> compute (reference 1.15);
    # 1.2 vs 1.15: 0.043 reuse; 1.3 vs 1.15: 0.13 -> compute.
    p = policy(policy="fbcache", threshold=0.12)
    assert run(p, [1.0, 1.05, 1.1, 1.15, 1.2, 1.3]) == [T, F, F, T, F, T]
    req = p.requirements()
    assert (req.indicator, req.compute_first, req.compute_last) == ("front_residual", 1, 0)
    assert req.reconstruction == ResidualReuse()


def test_fbcache_forced_steps():
    p = policy(policy="fbcache", threshold=0.5, warmup=2, final_steps=1)
    assert run(p, [1.0] * 6, num_steps=6) == [T, T, F, F, F, T]
    assert run(p, [1.0] * 6) == [T, T, F, F, F, F]


def test_dbcache_schedule_and_requirements():
    # warmup 3: steps 0-2 computed (reference 1.2 at step 2); then 1.26: 0.05 reuse; 1.35: 0.125 -> compute
    p = policy(policy="dbcache", Fn=2, Bn=1, warmup=3, threshold=0.1)
    assert run(p, [1.0, 1.1, 1.2, 1.26, 1.35, 1.35]) == [T, T, T, F, T, F]
    req = p.requirements()
    assert (req.indicator, req.compute_first, req.compute_last) == ("front_residual", 2, 1)
    assert req.reconstruction == ResidualReuse()
    assert policy(policy="dbcache", taylor=2).requirements().reconstruction == TaylorReuse(order=2)
