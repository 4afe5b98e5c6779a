"""Step, stream and generation inference from the timestep sequence."""

from cachepass.runtime.tracker import StepTracker


def positions(tracker, ts):
    return [(p.generation, p.step, p.stream) for p in map(tracker.observe, ts)]


def test_cfg_as_two_calls_gives_two_streams_per_step():
    got = positions(StepTracker(), [999, 999, 800, 800, 500, 500])
    assert got == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1)]


def test_a_new_generation_starts_when_the_timestep_jumps_back():
    tracker = StepTracker()
    got = positions(tracker, [999, 700, 400, 100, 999, 700])
    assert got == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (0, 3, 0), (1, 0, 0), (1, 1, 0)]
    assert tracker.num_steps == 4  # learnt from the finished generation


def test_schedules_that_count_up_are_understood():
    got = positions(StepTracker(), [0.0, 0.25, 0.5, 0.75, 0.0, 0.25])
    assert [g for g, _, _ in got] == [0, 0, 0, 0, 1, 1]
    assert [s for _, s, _ in got] == [0, 1, 2, 3, 0, 1]


def test_fixed_number_of_steps_splits_generations_with_equal_schedules():
    tracker = StepTracker(num_steps=2)
    assert positions(tracker, [10, 5, 10, 5]) == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]


def test_without_timestep_every_call_is_a_step():
    tracker = StepTracker(num_steps=3)
    got = positions(tracker, [None] * 4)
    assert got == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (1, 0, 0)]


def test_reset_starts_a_new_generation():
    tracker = StepTracker()
    positions(tracker, [9, 8])
    tracker.reset()
    assert positions(tracker, [7]) == [(1, 0, 0)]
