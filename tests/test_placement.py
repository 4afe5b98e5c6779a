"""Placement of calls (request, step, branch) from pipeline signals and, in raw loops, from timesteps."""

from cachepass.runtime.placement import MAX_INFERRED_BRANCHES, MIXED, Placer
from cachepass.runtime.signals import PipelineSignal


def positions(placer, ts, num_steps=None):
    return [(p.request, p.step, p.branch_index) for p in (placer.place(None, t, num_steps) for t in ts)]


def certainty(placer, ts):
    return [placer.place(None, t, None).certain for t in ts]


def test_cfg_as_two_calls_gives_two_branches_per_step():
    got = positions(Placer(), [999, 999, 800, 800, 500, 500])
    assert got == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1)]


def test_a_new_request_starts_when_the_timestep_jumps_back():
    got = positions(Placer(), [999, 700, 400, 100, 999, 700])
    assert got == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (0, 3, 0), (1, 0, 0), (1, 1, 0)]


def test_nothing_is_learnt_across_requests():
    placer = Placer()
    positions(placer, [999, 500])
    assert [p.num_steps for p in (placer.place(None, t, None) for t in (999, 700, 400))] == [None] * 3


def test_schedules_that_count_up_are_understood():
    got = positions(Placer(), [0.0, 0.25, 0.5, 0.75, 0.0, 0.25])
    assert [r for r, _, _ in got] == [0, 0, 0, 0, 1, 1]
    assert [s for _, s, _ in got] == [0, 1, 2, 3, 0, 1]


def test_fixed_number_of_steps_splits_requests_with_equal_schedules():
    assert positions(Placer(), [10, 5, 10, 5], num_steps=2) == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]


def test_without_timestep_every_call_is_a_step():
    got = positions(Placer(), [None] * 4, num_steps=3)
    assert got == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (1, 0, 0)]


def test_end_request_starts_a_new_request():
    placer = Placer()
    positions(placer, [9, 8])
    placer.end_request()
    assert positions(placer, [7]) == [(1, 0, 0)]


def test_a_jump_far_beyond_the_step_size_is_a_new_request():
    """A run cancelled at 625 of a 1000 -> 0 schedule, then an img2img run from 500: not its next step."""
    cancelled = [1000 - 25 * i for i in range(16)]  # ... 625
    got = positions(Placer(), cancelled + [500, 490, 480])
    assert [r for r, _, _ in got] == [0] * 16 + [1, 1, 1]
    assert [s for _, s, _ in got][-3:] == [0, 1, 2]


def test_a_repeated_timestep_is_uncertain_until_the_branches_are_established():
    # CFG: the first call of step 1 could be a new request's second step (warm-up, then generation)
    assert certainty(Placer(), [999, 999, 800, 800, 500, 500]) == [True, True, False, True, True, True]
    # warm-up call at 999, then a single-branch generation: step 1 computes, then step 1's single call
    # shows that the first step's second call was the request's start
    assert certainty(Placer(), [999, 999, 800, 600, 400]) == [True, True, False, True, True]
    # one call per step: nothing is ambiguous
    assert certainty(Placer(), [999, 800, 600]) == [True, True, True]


def test_one_step_calls_at_one_timestep_stay_bounded():
    placer = Placer()
    got = positions(placer, [500] * (3 * MAX_INFERRED_BRANCHES))
    assert max(s for _, _, s in got) == MAX_INFERRED_BRANCHES - 1
    assert got[-1][0] == 2  # every MAX_INFERRED_BRANCHES calls a new request


def test_per_element_timesteps_that_differ_are_never_certain():
    placer = Placer()
    assert not placer.place(None, MIXED, None).certain
    assert not placer.place(None, MIXED, None).certain


def test_pipeline_signals_name_the_branch_and_the_step():
    placer = Placer()
    calls = [PipelineSignal("cond", 0, 4), PipelineSignal("uncond", 0, 4), PipelineSignal("cond", 1, 4)]
    got = [placer.place(s, 0.5, None) for s in calls]  # the timestep does not matter here
    assert [(p.request, p.step, p.branch, p.branch_index, p.num_steps) for p in got] == [
        (0, 0, "cond", 0, 4), (0, 0, "uncond", 1, 4), (0, 1, "cond", 0, 4)]
    assert all(p.certain for p in got)
    # the branch comes back to step 0: the run restarted (a cancelled generation, then a new one)
    assert placer.place(PipelineSignal("cond", 0, 4), 0.9, None).request == 1


def test_named_branches_without_step_index_count_their_own_steps():
    placer = Placer()
    seq = [("cond", 1.0), ("uncond", 1.0), ("cond", 0.75), ("uncond", 0.75), ("cond", 0.5)]
    got = [placer.place(PipelineSignal(b), t, 8) for b, t in seq]
    assert [(p.request, p.step, p.branch_index, p.num_steps) for p in got] == [
        (0, 0, 0, 8), (0, 0, 1, 8), (0, 1, 0, 8), (0, 1, 1, 8), (0, 2, 0, 8)]
    # the same timestep again for a branch (bf16 rounds 0.500 and 0.498 alike): still its next step
    again = placer.place(PipelineSignal("cond"), 0.5, 8)
    assert (again.request, again.step) == (0, 3)
    # the timestep moving back: the pipeline started a new run
    assert placer.place(PipelineSignal("cond"), 1.0, 8).request == 1
