"""The issue-15 policies on both embedded trained models (Wan digits video, FLUX digits image), short
generations: each skips, stays close to the full output, and the first and second generations of one
compiled model are bit-identical. Also the FoCa weights themselves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cachepass
from cachepass.metrics import psnr
from cachepass.reconstruction import foca_weights

DIGITS = [3]
STEPS = 16


def test_foca_weights_are_exact_on_lines_and_damped_on_curves():
    assert foca_weights([0.0], 1.0).tolist() == [1.0]
    np.testing.assert_allclose(foca_weights([0.0, -1.0], 1.0), [2.0, -1.0])
    w = foca_weights([0.0, -1.0, -2.0], 1.0)
    np.testing.assert_allclose(w, [2.625, -2.25, 0.625])
    times = np.array([0.0, -0.3, -0.9])  # uneven gaps: still exact for a line in time
    for target in (0.2, 0.5, -0.1):
        weights = foca_weights(times, target)
        assert weights.sum() == pytest.approx(1.0)
        assert weights @ (3 * times + 1) == pytest.approx(3 * target + 1)
    np.testing.assert_allclose(foca_weights([0.0, -1.0, -2.0], 1.0, corrector=False), [2.5, -2.0, 0.5])


def _wan(steps: int = STEPS):
    from cachepass.demo.model import generate, load_digits_model, make_pipeline

    model = load_digits_model()
    return model, make_pipeline, lambda pipe: generate(pipe, DIGITS, num_inference_steps=steps)


def _flux(steps: int = STEPS):
    from cachepass.demo.flux_model import generate_flux, load_digits_flux_model, make_flux_pipeline

    model = load_digits_flux_model()
    return model, make_flux_pipeline, lambda pipe: generate_flux(pipe, DIGITS, num_inference_steps=steps)


@pytest.fixture(scope="module", params=["wan", "flux"])
def trained(request):
    torch.set_num_threads(1)
    model, make_pipe, gen = _wan() if request.param == "wan" else _flux()
    with torch.no_grad():
        full = gen(make_pipe(model))
    return request.param, model, make_pipe, gen, full


# (policy, options, least PSNR in dB on both models at 16 steps: 16 steps move far between computed ones,
# so these bounds sit below the 50-step frontier of benchmarks/frontier.py)
CASES = [
    ("foca", {"interval": 3}, 28.0),
    ("foca", {"interval": 3, "points": 3}, 22.0),
    ("speca", {}, 28.0),
]


@pytest.mark.parametrize("policy,options,least", CASES, ids=[f"{p}-{len(o)}" for p, o, _ in CASES])
def test_new_policy_skips_and_stays_close_first_and_second_time(trained, policy, options, least):
    name, model, make_pipe, gen, full = trained
    pipe = make_pipe(model)
    pipe.transformer = torch.compile(model, backend="cachepass", options={
        "policy": policy, "inner": "eager", "num_steps": STEPS, **options})
    try:
        with torch.no_grad():
            first = gen(pipe)
            computed_first = [list(b.computed_steps) for b in cachepass.stats(pipe.transformer).branches]
            second = gen(pipe)
        stats = cachepass.stats(pipe.transformer)
    finally:
        torch._dynamo.reset()
    computed = [list(b.computed_steps) for b in stats.branches]
    assert len(computed) == 2 and computed == computed_first
    assert all(STEPS - 1 in c for c in computed), computed  # the last step is computed
    assert all(len(c) <= 3 * STEPS // 4 for c in computed), computed
    assert torch.equal(first, second)
    print(name, policy, options, computed[0], round(psnr(first, full), 2))
    assert psnr(first, full) > least, (name, psnr(first, full))


def test_schedules_compute_the_last_step_when_the_step_count_is_known():
    from cachepass.options import parse_options
    from cachepass.policies.base import CallContext

    for policy, options in (("interval", {"interval": 4}), ("taylorseer", {"interval": 4}),
                            ("foca", {"interval": 4})):
        p = parse_options({"policy": policy, **options}).policy
        state = p.new_state()
        steps = [s for s in range(18) if p.decide(state, CallContext(0, s, 0, 18, None), None)]
        assert steps[0] == 0 and steps[-1] == 17, (policy, steps)


#: the pipelines' own step counts: WanPipeline 50 (stated in cache_context), FluxPipeline 28 (its progress bar)
FULL_STEPS = {"wan": 50, "flux": 28}


def _first_generation(model, make_pipe, gen, options: dict):
    """(the full output, the first generation's output, its stats) with ``options`` (inner eager)."""
    torch.set_num_threads(1)
    with torch.no_grad():
        full = gen(make_pipe(model))
    pipe = make_pipe(model)
    pipe.transformer = torch.compile(model, backend="cachepass", options={**options, "inner": "eager"})
    try:
        with torch.no_grad():
            first = gen(pipe)
        return full, first, cachepass.stats(pipe.transformer)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_the_default_policy_holds_on_both_models_from_the_first_generation(name):
    """No options at all (issue 15's target for the default): at most 30 % of the block work and at least
    35 dB in the first generation, on the Wan video model (50 steps) and the FLUX image model (28 steps,
    counted from FluxPipeline's progress bar, so the last step computes). Measured (digit 3): Wan 14/50 per
    branch at 47.7 dB, FLUX 8/28 at 42.1 dB (7/28 at 36.7 dB before the count was known). TeaCache, the
    old default, reached 21 dB on FLUX at 23-32 % of the steps: its coefficients were fitted on Wan."""
    steps = FULL_STEPS[name]
    model, make_pipe, gen = _wan(steps) if name == "wan" else _flux(steps)
    full, first, stats = _first_generation(model, make_pipe, gen, {})
    assert stats.policy == "taylorseer"
    computed = [len(b.computed_steps) for b in stats.branches]
    assert len(computed) == 2 and all(c <= 0.3 * steps for c in computed), computed
    print(name, computed, round(psnr(first, full), 2))
    assert psnr(first, full) >= 35.0, psnr(first, full)


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_a_fifth_of_the_block_work_stays_above_40_db_from_the_first_generation(name):
    """Issue 15's small-budget target at its 50 steps: taylorseer interval 6 computes 10 of 50 steps per
    branch (20 % of the block work) and keeps >= 40 dB in the first generation, on both models, with no
    step-count option (WanPipeline states it; FluxPipeline's comes from its progress bar). Measured
    (digit 3): Wan 41.3 dB, FLUX 43.7 dB."""
    model, make_pipe, gen = _wan(50) if name == "wan" else _flux(50)
    full, first, stats = _first_generation(model, make_pipe, gen, {"policy": "taylorseer", "interval": 6})
    computed = [b.computed_steps for b in stats.branches]
    assert len(computed) == 2 and all(len(c) <= 10 and c[-1] == 49 for c in computed), computed
    print(name, [len(c) for c in computed], round(psnr(first, full), 2))
    assert psnr(first, full) >= 40.0, psnr(first, full)


@pytest.mark.parametrize("policy, threshold, gain", [("teacache", 0.2, 1.0), ("fbcache", 0.2, 3.0)])
def test_cfg_branches_decide_together_unless_told_apart(policy, threshold, gain):
    """With true CFG the guidance scale multiplies any mismatch between the branches' reused steps. On the
    FLUX model the unconditional branch's indicator moves less, so deciding apart it reuses other steps
    than the conditional one; together (the default) both compute on the first branch's steps, each from
    its own cache. Measured (digit 3, 28 steps): teacache 0.2 apart 7 / 5 steps at 24.2 dB, together
    7 / 7 at 26.2 dB; fbcache 0.2 apart 11 / 11 (other steps) at 31.3 dB, together at 37.2 dB."""
    model, make_pipe, gen = _flux(28)
    results = {}
    for branches in ("apart", "together"):
        full, out, stats = _first_generation(model, make_pipe, gen,
                                             {"policy": policy, "threshold": threshold, "branches": branches})
        results[branches] = ([b.computed_steps for b in stats.branches], psnr(out, full))
    print(policy, {k: ([len(c) for c in v[0]], round(v[1], 2)) for k, v in results.items()})
    (cond, uncond), apart_db = results["apart"]
    assert cond != uncond
    (cond, uncond), together_db = results["together"]
    assert cond == uncond and len(cond) < 28
    assert together_db > apart_db + gain, (together_db, apart_db)
