"""Every diffusers denoiser family (``tests/families.py``): real classes, tiny configs, pipeline-shaped calls.

Per family, over a raw loop of 8 decreasing (Lumina2: rising) timesteps under ``torch.no_grad()``:

* ``policy="none"`` under ``torch.compile`` equals eager at every step;
* ``policy="interval"`` (``interval=3``, ``compute_last=False``, ``num_steps=8``, ``inner="eager"``) on an
  accelerated family runs fewer ``aten::scaled_dot_product_attention`` calls than the eager loop, computes
  steps 0, 3, 6 and reuses the others, its outputs stay finite and close to the eager loop's (the last one
  within ``LAST_REL_L1_BOUND``, every one within ``MAX_REL_L1_BOUND``), a reused step reads its own
  latents, and no graph is compiled after the first call. On a declined family the interval test is an
  expected failure (strict: it flips to a failure the day the family accelerates; then set its status in
  ``families.py`` to "accelerated", which drops the xfail and the declined-family tests);
* a declined family runs unchanged today (outputs equal eager) with exactly one warning on the
  ``cachepass`` logger, naming the reason recorded in ``families.py``.

A known cachepass defect (``Family.defects``) makes the test of that check an expected failure for that
family, strict too. ``docs/families.md`` has the table of what is found and cached per family.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import pytest
import torch
from conftest import count_attention_calls, relative_l1
from families import FAMILIES, STEPS, Family, first, perturbed, run_loop

import cachepass

INTERVAL = 3
COMPUTED = [s for s in range(STEPS) if s % INTERVAL == 0]  # [0, 3, 6]
REUSED = [s for s in range(STEPS) if s % INTERVAL]  # [1, 2, 4, 5, 7]
#: relative L1 against the eager loop: of the last output (a reused step) and of the worst step. Loose:
#: random weights, and the latents move along the trajectory; measured (docs/families.md): the last step at most
#: 0.22 (HunyuanDiT; Chroma and Mochi state their own bounds), the worst step at most 0.45 (HunyuanDiT),
#: medians 0.06 and 0.08.
LAST_REL_L1_BOUND = 0.3
MAX_REL_L1_BOUND = 0.5
#: the options of the interval runs (``compute_last`` spelled out: the last step stays a reused one)
INTERVAL_OPTIONS = dict(policy="interval", interval=INTERVAL, compute_last=False, num_steps=STEPS, inner="eager")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models are tiny: one intra-op thread is faster, and steady on a shared 2-core machine (two threads
    spin-wait on each other when another process holds a core: 1 ms per tiny linear)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _ids(families):
    return [f.name for f in families]


def _xfail(reason: str):
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=reason)


def _interval_params():
    params = []
    for f in FAMILIES:
        marks = [] if f.accelerated else [_xfail(f"declined today: {f.reason}")]
        params.append(pytest.param(f, marks=marks, id=f.name))
    return params


def _defect_params(families, check: str):
    """One param per family; an expected failure where ``families.py`` records a cachepass defect for ``check``."""
    return [pytest.param(f, id=f.name, marks=[_xfail(f"cachepass defect: {f.defect(check)}")] if f.defect(check)
                         else []) for f in families]


def compiled(model, **options):
    return torch.compile(model, backend="cachepass", options={"inner": "eager", **options})


def assert_same(outs, refs, what: str) -> None:
    assert len(outs) == len(refs)
    for step, (out, ref) in enumerate(zip(outs, refs)):
        assert out.shape == ref.shape, f"{what}: step {step} shape {tuple(out.shape)} != {tuple(ref.shape)}"
        if not torch.equal(out, ref):
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6, msg=lambda m, s=step: f"{what}: step {s}: {m}")


class _Warnings(logging.Handler):
    """The WARNING records of the ``cachepass`` loggers while attached (what ``caplog`` would collect; a
    handler of our own, so that one run serves the several tests that read it)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("cachepass").addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger("cachepass").removeHandler(self)


@dataclass
class EagerRun:
    outs: list
    attention: int
    perturbed_step1: torch.Tensor  # step 1 with other latents (``families.perturbed``)


@dataclass
class IntervalRun:
    outs: list
    attention: int
    stats: object
    warnings: list  # the messages logged at WARNING on the cachepass loggers, compile included
    graphs_first_call: int  # graphs Dynamo handed the backend in the first call
    graphs: int  # ... in all calls
    perturbed_step1: torch.Tensor  # a fresh generation's step 1 (a reused step) with other latents


class _Counting:
    """``cachepass.backend(**options)`` (what ``backend="cachepass"`` runs), counting the graphs it compiles."""

    def __init__(self, **options) -> None:
        self.backend = cachepass.backend(**options)
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self.backend(gm, example_inputs)


@functools.cache
def eager_run(family: Family) -> EagerRun:
    """The eager loop of a family (seed 0) and the attention calls it ran; computed once per session."""
    model, call = family.build(0)
    outs: list = []
    attention = count_attention_calls(lambda: outs.extend(run_loop(model, call, family.steps)))
    with torch.no_grad():
        step1 = first(model(**perturbed(call(family.steps[1]))))
    return EagerRun(outs, attention, step1)


@functools.cache
def interval_run(family: Family) -> IntervalRun:
    """The ``interval`` loop of a family (seed 0): compiled by one warm-up call, then ``cachepass.reset``
    and the loop under the profiler; computed once per session (the interval test and the declined-family
    tests read the same run)."""
    torch._dynamo.reset()
    model, call = family.build(0)
    backend = _Counting(**INTERVAL_OPTIONS)
    fast = torch.compile(model, backend=backend)
    outs: list = []
    with _Warnings() as warned:
        with torch.no_grad():
            fast(**call(family.steps[0]))  # compile outside the profiled loop
        graphs_first_call = backend.graphs
        cachepass.reset(fast)
        attention = count_attention_calls(lambda: outs.extend(run_loop(fast, call, family.steps)))
        stats = cachepass.stats(fast)
        cachepass.reset(fast)
        with torch.no_grad():
            fast(**call(family.steps[0]))
            step1 = first(fast(**perturbed(call(family.steps[1])))).clone()
    torch._dynamo.reset()
    return IntervalRun(outs, attention, stats, warned.messages, graphs_first_call, backend.graphs, step1)


@pytest.mark.parametrize("family", [pytest.param(f, id=f.name, marks=[pytest.mark.slow] if f.slow_none else [])
                                    for f in FAMILIES])
def test_policy_none_equals_eager(family):
    model, call = family.build(0)
    outs = run_loop(compiled(model, policy="none"), call, family.steps)
    assert_same(outs, eager_run(family).outs, f"{family.name} policy none")


@pytest.mark.parametrize("family", _interval_params())
def test_interval_skips_blocks(family):
    eager, run = eager_run(family), interval_run(family)
    assert run.stats.caching, run.warnings
    if family.skips_attention:
        assert run.attention < eager.attention, (
            f"{family.name}: {run.attention} attention calls cached vs {eager.attention} eager")
    else:
        assert run.attention == eager.attention
    assert all(torch.isfinite(o).all() for o in run.outs)
    rel_l1 = [relative_l1(o, r) for o, r in zip(run.outs, eager.outs)]
    last_bound, any_bound = family.rel_l1_bounds or (LAST_REL_L1_BOUND, MAX_REL_L1_BOUND)
    assert rel_l1[-1] < last_bound, f"{family.name}: relative L1 of the last step {rel_l1[-1]:.4f}"
    assert max(rel_l1) < any_bound, f"{family.name}: relative L1 per step {rel_l1}"
    assert [b.computed_steps for b in run.stats.branches] == [COMPUTED]
    assert [b.reused_steps for b in run.stats.branches] == [REUSED]
    assert relative_l1(run.outs[0], eager.outs[0]) < 1e-6  # a computed step is the full computation


ACCELERATED = [f for f in FAMILIES if f.accelerated]


@pytest.mark.parametrize("family", _defect_params(ACCELERATED, "reads_latents"))
def test_a_reused_step_reads_its_own_latents(family):
    """A reused step adds the cached residual to its own stream: other latents at step 1 give another output,
    as they do eagerly. (Reusing a cached *output*, e.g. a residual formed with a constant input of the
    stream's shape, would return the same output whatever the latents.)"""
    eager, run = eager_run(family), interval_run(family)
    assert run.stats.branches[0].reused_steps[:1] == [1]
    eager_change = relative_l1(eager.perturbed_step1, eager.outs[1])
    cached_change = relative_l1(run.perturbed_step1, run.outs[1])
    assert cached_change > 0.25 * eager_change, (
        f"{family.name}: output change {cached_change:.4f}, eager {eager_change:.4f}")


@pytest.mark.parametrize("family", _defect_params(FAMILIES, "no_recompile"))
def test_no_recompile_after_the_first_call(family):
    """cachepass adds no recompile: the graphs of the first call serve the whole loop."""
    run = interval_run(family)
    assert run.graphs == run.graphs_first_call, (
        f"{run.graphs_first_call} graph(s) in the first call, {run.graphs} in all")


@pytest.mark.parametrize("family", _defect_params(ACCELERATED, "quiet"))
def test_an_accelerated_family_never_says_caching_is_off(family):
    """No graph of a model that caches warns that caching is off (a helper graph before or between the
    stack's graphs runs unchanged, quietly)."""
    said = [w for w in interval_run(family).warnings if "caching is off" in w]
    assert not said, said


DECLINED = [f for f in FAMILIES if not f.accelerated]


@pytest.mark.parametrize("family", DECLINED, ids=_ids(DECLINED))
def test_declined_family_runs_unchanged(family):
    run = interval_run(family)
    assert_same(run.outs, eager_run(family).outs, f"{family.name} declined")
    assert not run.stats.caching
    assert any(family.reason in w for w in run.warnings), run.warnings


@pytest.mark.parametrize("family", _defect_params(DECLINED, "warns_once"))
def test_declined_family_warns_once(family):
    warnings = interval_run(family).warnings
    assert len(warnings) == 1, warnings
    assert family.reason in warnings[0]


def test_every_family_is_listed_once_and_shaped_as_promised():
    assert len({f.cls for f in FAMILIES}) == len(FAMILIES)
    for f in FAMILIES:
        assert f.status in ("accelerated", "declined"), f.name
        assert (f.reason is None) == f.accelerated, f.name
        assert len(f.steps) == STEPS, f.name


def test_families_are_deterministic():
    """Two builds from one seed give the same weights and inputs (one family is enough to check the helpers)."""
    family = FAMILIES[0]
    (m1, c1), (m2, c2) = family.build(0), family.build(0)
    for p1, p2 in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(p1, p2)
    with torch.no_grad():
        assert torch.equal(first(m1(**c1(family.steps[0]))), first(m2(**c2(family.steps[0]))))
