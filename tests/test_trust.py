"""Trust: a call reads only its own cache, and history never changes a result.

Each test reproduces one of the defects of issue 10 on real diffusers classes and pipelines (WanPipeline
with two experts, FluxPipeline with true CFG) or on a raw loop without pipeline signals.
"""

from __future__ import annotations

import gc
import logging
import threading
import weakref

import pytest
import torch
from conftest import count_attention_calls, relative_l1
from tiny_models import (
    flux_inputs,
    run_flux_pipeline,
    run_sd3_pipeline,
    run_wan_pipeline,
    tiny_flux,
    tiny_flux_pipeline,
    tiny_sd3_pipeline,
    tiny_wan,
    tiny_wan_pipeline,
    tiny_wan_two_expert_pipeline,
    wan_inputs,
)

import cachepass
from cachepass.errors import OptionError
from cachepass.options import parse_options
from cachepass.runtime import signals
from cachepass.runtime.placement import MAX_INFERRED_BRANCHES
from cachepass.runtime.state import HISTORY, runtime_for

INTERVAL = {"policy": "interval", "interval": 3, "inner": "eager"}
SCHEDULE = [999.0 - 50 * i for i in range(16)]  # 999 ... 249


def compiled(model, **options):
    base = INTERVAL if options.get("policy", "interval") == "interval" else {"inner": "eager"}
    options = {**base, **options}
    return torch.compile(model, backend="cachepass", options=options)


def raw_loop(model, inputs, schedule=SCHEDULE, update=0.02):
    """A sampler without pipeline signals: one call per step, the latent moved by the output."""
    x = inputs["hidden_states"].clone()
    with torch.no_grad():
        for t in schedule:
            out = model(hidden_states=x, timestep=torch.tensor([t]),
                        encoder_hidden_states=inputs["encoder_hidden_states"])[0]
            x = x + update * out
    return x


# --- 1. instances ----------------------------------------------------------------------------------

def test_two_experts_of_one_class_keep_their_own_caches():
    """Wan2.2: transformer and transformer_2 are two instances of one class, compiled the same way, so
    Dynamo serves both with one program. Each must read only its own cache."""
    reference = run_wan_pipeline(tiny_wan_two_expert_pipeline(), steps=8)
    shared = tiny_wan_two_expert_pipeline()
    shared.transformer = torch.compile(shared.transformer, backend="cachepass", options=INTERVAL)
    shared.transformer_2 = torch.compile(shared.transformer_2, backend="cachepass", options=INTERVAL)
    apart = tiny_wan_two_expert_pipeline()  # one backend object each: Dynamo compiles each expert apart
    apart.transformer = torch.compile(apart.transformer, backend=cachepass.backend(**INTERVAL))
    apart.transformer_2 = torch.compile(apart.transformer_2, backend=cachepass.backend(**INTERVAL))

    out_shared, out_apart = run_wan_pipeline(shared, steps=8), run_wan_pipeline(apart, steps=8)
    assert torch.equal(out_shared, out_apart)
    assert relative_l1(out_shared, reference) < 0.1
    high, low = cachepass.stats(shared.transformer), cachepass.stats(shared.transformer_2)
    assert high.calls > 0 and low.calls > 0 and high.calls + low.calls == 2 * 8
    first_low = min(low.branches[0].computed_steps)  # the low-noise expert computes its first step itself
    assert first_low == min(low.branches[0].computed_steps + low.branches[0].reused_steps) > 0
    assert max(high.branches[0].computed_steps + high.branches[0].reused_steps) < first_low
    assert torch.equal(run_wan_pipeline(shared, steps=8), out_shared)  # and again, the same


def test_one_thread_per_instance():
    pipes = [tiny_wan_pipeline(tiny_wan(seed=s)) for s in (0, 3)]
    for p in pipes:
        p.transformer = torch.compile(p.transformer, backend="cachepass", options=INTERVAL)
    alone = [run_wan_pipeline(p, steps=6, seed=i) for i, p in enumerate(pipes)]  # also compiles
    results, errors = [None, None], []

    def work(i):
        try:
            for _ in range(3):
                results[i] = run_wan_pipeline(pipes[i], steps=6, seed=i)
                assert torch.equal(results[i], alone[i])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [cachepass.stats(p.transformer).generations for p in pipes] == [4, 4]


# --- 2. and 7. what ran before -----------------------------------------------------------------------

def test_a_warm_up_call_changes_nothing_in_a_pipeline():
    pipe = tiny_wan_pipeline()
    pipe.transformer = torch.compile(pipe.transformer, backend="cachepass", options=INTERVAL)
    clean = run_wan_pipeline(pipe, steps=8)
    run_wan_pipeline(pipe, steps=1, seed=7)  # a warm-up request at the first timestep, other latents
    assert torch.equal(run_wan_pipeline(pipe, steps=8), clean)


def test_a_warm_up_call_is_never_reused_in_a_raw_loop():
    model, inputs = tiny_wan(), wan_inputs()
    full = raw_loop(model, inputs)
    fast = compiled(model)
    with torch.no_grad():  # the warm-up: same first timestep, other latents
        fast(hidden_states=5 * inputs["hidden_states"], timestep=torch.tensor([SCHEDULE[0]]),
             encoder_hidden_states=inputs["encoder_hidden_states"])
    out = raw_loop(fast, inputs)
    branch = cachepass.stats(fast).branches[0]
    assert 1 in branch.computed_steps  # the call after a repeated timestep computes: never the warm-up's cache
    cachepass.reset(fast)
    clean = raw_loop(fast, inputs)
    assert relative_l1(out, full) <= relative_l1(clean, full) + 1e-6


@pytest.mark.parametrize("before", ["two steps", "one call and a reset"])
def test_nothing_is_learnt_from_earlier_generations(before):
    model, inputs = tiny_wan(), wan_inputs()
    fast = compiled(model, policy="teacache", threshold=0.3)
    clean = raw_loop(fast, inputs)
    clean_steps = cachepass.stats(fast).branches[0].computed_steps
    cachepass.reset(fast)
    if before == "two steps":
        raw_loop(fast, inputs, SCHEDULE[:2])
    else:
        raw_loop(fast, inputs, SCHEDULE[:1])
        cachepass.reset(fast)
    assert torch.equal(raw_loop(fast, inputs), clean)
    assert cachepass.stats(fast).branches[0].computed_steps == clean_steps
    assert len(clean_steps) < len(SCHEDULE)


# --- 3. and 4. shapes ---------------------------------------------------------------------------------

def _wan_pipeline_uneven_prompts(pipe, steps=6):
    g = torch.Generator().manual_seed(123)
    prompt, negative = torch.randn(1, 5, 16, generator=g), torch.randn(1, 7, 16, generator=g)
    with torch.no_grad():
        return pipe(prompt_embeds=prompt, negative_prompt_embeds=negative, height=64, width=64, num_frames=5,
                    num_inference_steps=steps, guidance_scale=4.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).frames


def test_cfg_branches_of_different_token_counts_under_automatic_dynamic_shapes():
    """After the recompile one shape-generic graph serves both branches; each still reads its own cache."""
    outs = {}
    for dynamic in (False, None):
        torch._dynamo.reset()
        pipe = tiny_wan_pipeline()
        pipe.transformer = torch.compile(pipe.transformer, backend="cachepass", options=INTERVAL, dynamic=dynamic)
        outs[dynamic] = _wan_pipeline_uneven_prompts(pipe)
        stats = cachepass.stats(pipe.transformer)
        assert [s.computed_steps for s in stats.branches] == [[0, 3, 5], [0, 3, 5]]  # the last step computes
    torch.testing.assert_close(outs[None], outs[False], rtol=0, atol=1e-6)


@pytest.mark.parametrize("policy", ["interval", "teacache"])
def test_a_shape_change_mid_generation_computes(policy):
    model = tiny_wan()
    fast = torch.compile(model, backend="cachepass", dynamic=True,
                         options={**INTERVAL, "policy": policy} if policy == "interval" else
                         {"policy": policy, "threshold": 10.0, "inner": "eager"})
    small, large = wan_inputs(size=8), wan_inputs(size=12)
    raw_loop(fast, small, SCHEDULE[:4])
    with torch.no_grad():
        t = torch.tensor([SCHEDULE[4]])
        out = fast(timestep=t, **large)[0]
        ref = model(timestep=t, **large)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert 4 in cachepass.stats(fast).branches[0].computed_steps


# --- 5. and 6. timesteps that do not place the call ---------------------------------------------------

def test_per_element_timesteps_that_differ_always_compute(caplog):
    """Batch slots at different steps: a request joins slot 1 at t=999 while slot 0 is at t=749."""
    model = tiny_wan()
    fast = compiled(model, policy="interval", interval=100)
    x, text = torch.randn(2, 4, 2, 8, 8), torch.randn(2, 5, 16)
    with torch.no_grad(), caplog.at_level(logging.DEBUG, logger="cachepass"):
        for t in (999.0, 874.0):
            fast(hidden_states=x, timestep=torch.tensor([t, t]), encoder_hidden_states=text)
        for t0, t1 in ((749.0, 999.0), (624.0, 874.0)):
            ts = torch.tensor([t0, t1])
            out = fast(hidden_states=x, timestep=ts, encoder_hidden_states=text)[0]
            torch.testing.assert_close(out, model(hidden_states=x, timestep=ts, encoder_hidden_states=text)[0],
                                       rtol=1e-5, atol=1e-6)
    said = [r for r in caplog.records if "elements differ" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.DEBUG  # once, at debug level


def test_a_run_cancelled_then_one_that_starts_lower_is_a_new_generation():
    model, inputs = tiny_wan(), wan_inputs()
    fast = compiled(model, policy="interval", interval=100)
    cancelled = [1000.0 - 25 * i for i in range(16)]  # 1000 ... 625, then the run stops
    raw_loop(fast, inputs, cancelled)
    other = wan_inputs(seed=9)
    t = torch.tensor([500.0])  # img2img at strength 0.5: a new request, 50-step spacing
    with torch.no_grad():
        out = fast(timestep=t, **other)[0]
        ref = model(timestep=t, **other)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert cachepass.stats(fast).generations == 2


def test_the_end_of_a_pipeline_call_reaches_cachepass_without_adding_to_the_model():
    """``_reset_stateful_cache`` (what every pipeline calls at its end) starts a new generation, and
    cachepass adds no ``HookRegistry`` to the model to hear it: diffusers' ``self.dtype`` asks each
    submodule ``hasattr(m, "_diffusers_hook")``, a question Dynamo guards on (Allegro recompiled)."""
    model, inputs = tiny_wan(), wan_inputs()
    fast = compiled(model, policy="interval", interval=100)
    raw_loop(fast, inputs, SCHEDULE[:8])
    assert not any(hasattr(m, "_diffusers_hook") for m in model.modules())
    fast._reset_stateful_cache()
    t = torch.tensor([SCHEDULE[8]])  # the next step of the same schedule: a reuse, had the request gone on
    with torch.no_grad():
        out = fast(timestep=t, **inputs)[0]
        ref = model(timestep=t, **inputs)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert cachepass.stats(fast).generations == 2


def test_an_interrupted_pipeline_call_then_a_new_one():
    pipe = tiny_wan_pipeline()
    pipe.transformer = torch.compile(pipe.transformer, backend="cachepass", options=INTERVAL)
    clean = run_wan_pipeline(pipe, steps=8)

    def cancel(pipeline, step, timestep, kwargs):
        if step == 4:
            raise KeyboardInterrupt  # the user stops the run: the pipeline never reaches its end
        return {}

    with pytest.raises(KeyboardInterrupt):
        with torch.no_grad():
            pipe(prompt_embeds=torch.randn(1, 5, 16), negative_prompt_embeds=torch.randn(1, 5, 16), height=64,
                 width=64, num_frames=5, num_inference_steps=8, output_type="latent", callback_on_step_end=cancel)
    assert torch.equal(run_wan_pipeline(pipe, steps=8), clean)


# --- 8. first generation == second generation ------------------------------------------------------

def _policy_options(policy: str, steps: int = 10) -> dict:
    """The policy at its defaults; a required option without default (magcache's ratios) from its example."""
    options = {"policy": policy, "inner": "eager"}
    try:
        parse_options(options)
    except OptionError:
        options.update(cachepass.POLICIES[policy].example())
    return options


#: every registered policy that reuses, at its defaults
DEFAULT_POLICIES = [name for name in cachepass.POLICIES
                    if parse_options(_policy_options(name)).policy.requirements().reuses]


@pytest.mark.parametrize("policy", DEFAULT_POLICIES)
def test_first_generation_equals_second_in_wan_pipeline(policy):
    pipe = tiny_wan_pipeline(tiny_wan(num_layers=4))
    pipe.transformer = torch.compile(pipe.transformer, backend="cachepass", options=_policy_options(policy, 10))
    first = run_wan_pipeline(pipe, steps=10)
    second = run_wan_pipeline(pipe, steps=10)
    assert torch.equal(first, second)
    stats = cachepass.stats(pipe.transformer)
    assert [s.computed_steps for s in stats.branches] == [s.computed_steps for s in stats.history[-1]]


@pytest.mark.parametrize("policy", DEFAULT_POLICIES)
def test_first_generation_equals_second_in_flux_pipeline(policy):
    pipe = tiny_flux_pipeline()
    pipe.transformer = torch.compile(pipe.transformer, backend="cachepass", options=_policy_options(policy, 10))
    first = run_flux_pipeline(pipe, steps=10)
    second = run_flux_pipeline(pipe, steps=10)
    assert torch.equal(first, second)
    stats = cachepass.stats(pipe.transformer)
    assert stats.caching  # adacache too: without a frame grid it runs without its motion term
    assert [s.name for s in stats.branches] == ["cond", "uncond"]
    assert [s.computed_steps for s in stats.branches] == [s.computed_steps for s in stats.history[-1]]


def test_the_pipeline_step_count_forces_the_last_step_from_the_first_generation():
    pipe = tiny_wan_pipeline()
    pipe.transformer = torch.compile(pipe.transformer, backend="cachepass",
                                     options={**INTERVAL, "interval": 4, "compute_last": True})
    run_wan_pipeline(pipe, steps=6)
    assert [s.computed_steps for s in cachepass.stats(pipe.transformer).branches] == [[0, 4, 5], [0, 4, 5]]



def test_a_pipeline_that_states_no_step_count_still_ends_its_first_generation_well():
    """FluxPipeline's ``cache_context`` names the branch only; its progress bar's total, confirmed by its
    scheduler, gives the step count, so the first generation computes its last step too (issue 15)."""
    pipe = tiny_flux_pipeline()
    pipe.transformer = torch.compile(pipe.transformer, backend="cachepass",
                                     options={**INTERVAL, "interval": 4, "compute_last": True})
    run_flux_pipeline(pipe, steps=6)
    assert [s.computed_steps for s in cachepass.stats(pipe.transformer).branches] == [[0, 4, 5], [0, 4, 5]]
    run_flux_pipeline(pipe, steps=7)  # each pipeline call states its own count
    assert [s.computed_steps for s in cachepass.stats(pipe.transformer).branches] == [[0, 4, 6], [0, 4, 6]]
    with pipe.transformer.cache_context("cond"):  # after the pipeline call, no count is left over
        assert signals.current_signal(pipe.transformer._orig_mod).num_steps is None
        assert signals.loop_steps(pipe.transformer._orig_mod) is None



def test_a_pipeline_without_cache_context_gets_its_step_count_from_its_progress_bar():
    """StableDiffusion3Pipeline sets no ``cache_context`` (calls are placed by timestep): its confirmed
    progress-bar total still forces the last step from the first generation, and holds only while its
    loop runs: a raw call after the pipeline has no step count."""
    pipe = tiny_sd3_pipeline()
    model = pipe.transformer
    pipe.transformer = torch.compile(model, backend="cachepass",
                                     options={**INTERVAL, "interval": 4, "compute_last": True})
    first = run_sd3_pipeline(pipe, steps=6)
    assert [s.computed_steps for s in cachepass.stats(pipe.transformer).branches] == [[0, 4, 5]]
    assert torch.equal(run_sd3_pipeline(pipe, steps=6), first)
    assert signals.loop_steps(model) is None


def test_a_progress_bar_count_ends_with_its_own_bar():
    from types import SimpleNamespace as NS

    from diffusers import DiffusionPipeline

    module = torch.nn.Linear(2, 2)
    pipe = NS(scheduler=NS(order=1, timesteps=list(range(5))), model=module)
    earlier = DiffusionPipeline.progress_bar(pipe, total=5)
    later = DiffusionPipeline.progress_bar(pipe, total=5)  # a second loop before the first bar closed
    assert signals.loop_steps(module) == 5
    earlier.close()  # closing (or collecting) the earlier bar leaves the running loop's count
    assert signals.loop_steps(module) == 5
    later.close()
    assert signals.loop_steps(module) is None
    with DiffusionPipeline.progress_bar(pipe, total=4):  # not what the scheduler lists: no count
        assert signals.loop_steps(module) is None
    with DiffusionPipeline.progress_bar(pipe, pipe.scheduler.timesteps):  # a bar over the timesteps
        assert signals.loop_steps(module) == 5
    assert signals.loop_steps(module) is None


@pytest.mark.parametrize("order", ["cachepass first", "diffusers first"])
def test_the_progress_bar_is_tapped_whichever_is_imported_first(order):
    import subprocess
    import sys

    imports = ["import cachepass", "from diffusers import DiffusionPipeline"]
    code = "; ".join((imports if order == "cachepass first" else imports[::-1]) + [
        "assert getattr(DiffusionPipeline.progress_bar, '__cachepass_tap__', False)"])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

def test_a_progress_bar_counts_steps_only_when_the_scheduler_agrees():
    from types import SimpleNamespace as NS

    listed = NS(scheduler=NS(order=1, timesteps=list(range(28))))
    assert signals.confirmed_loop_steps(listed, 28) == 28
    assert signals.confirmed_loop_steps(listed, 12) is None  # a bar over something else
    tail = NS(scheduler=NS(order=1, timesteps=list(range(28))), _num_timesteps=12)  # img2img's tail
    assert signals.confirmed_loop_steps(tail, 12) == 12
    second_order = NS(scheduler=NS(order=2, timesteps=list(range(55))), _num_timesteps=55)
    assert signals.confirmed_loop_steps(second_order, 28) is None  # two calls a step
    assert signals.confirmed_loop_steps(NS(), 28) is None  # no scheduler
    for bad in (None, 0, -3, True, 2.5):
        assert signals.confirmed_loop_steps(listed, bad) is None

# --- 9. bounded memory ----------------------------------------------------------------------------

def test_one_step_calls_at_one_timestep_do_not_grow_the_branches():
    model, inputs = tiny_wan(), wan_inputs()
    fast = compiled(model)
    for _ in range(3 * MAX_INFERRED_BRANCHES + 1):
        raw_loop(fast, inputs, SCHEDULE[:1])
        assert len(cachepass.stats(fast).branches) <= MAX_INFERRED_BRANCHES
    pipe = tiny_wan_pipeline(model)
    pipe.transformer = fast
    for _ in range(5):
        run_wan_pipeline(pipe, steps=1)
    assert len(cachepass.stats(fast).branches) == 2


def test_history_is_capped():
    model, inputs = tiny_wan(), wan_inputs()
    fast = compiled(model)
    for _ in range(HISTORY + 4):
        raw_loop(fast, inputs, SCHEDULE[:3])
    stats = cachepass.stats(fast)
    assert stats.generations == HISTORY + 4
    assert len(stats.history) == HISTORY


def test_caches_are_released_with_the_program_and_with_the_model():
    model, inputs = tiny_wan(), wan_inputs()
    fast = compiled(model)
    raw_loop(fast, inputs, SCHEDULE[:2])
    branch = next(iter(runtime_for(model).branches.values()))
    program, cached = branch.program, weakref.ref(branch.cache.residuals[0])
    del branch
    assert program() is not None and cached() is not None
    torch._dynamo.reset()
    gc.collect()
    assert program() is None and cached() is None  # the program compiled before the reset took its cache

    raw_loop(fast, inputs, SCHEDULE[:2])  # recompiles
    runtime = weakref.ref(runtime_for(model))
    cached = weakref.ref(next(iter(runtime().branches.values())).cache.residuals[0])
    del fast, model
    torch._dynamo.reset()
    gc.collect()
    assert runtime() is None and cached() is None


def test_stats_explain_and_reset_are_per_instance():
    a, b = tiny_flux(seed=0), tiny_flux(seed=1)
    fa, fb = compiled(a, interval=100), compiled(b, interval=100)
    inputs = flux_inputs()
    with torch.no_grad():
        for t in (1.0, 0.9, 0.8):
            fa(timestep=torch.tensor([t]), **inputs)
        fb(timestep=torch.tensor([1.0]), **inputs)
    assert [s.computed_steps + s.reused_steps for s in cachepass.stats(fa).branches] == [[0, 1, 2]]
    assert [s.computed_steps for s in cachepass.stats(fb).branches] == [[0]]
    cachepass.reset(fb)
    with torch.no_grad():  # a's generation goes on: b's reset did not touch it
        calls = count_attention_calls(lambda: fa(timestep=torch.tensor([0.7]), **inputs))
    assert calls == 0 and cachepass.stats(fa).branches[0].reused_steps == [1, 2, 3]
