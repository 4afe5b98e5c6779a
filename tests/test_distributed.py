"""Sequence parallelism on CPU (gloo): every rank takes the same cache decisions, outputs equal one process.

The model is ``tests/sp_model.py``: tokens sharded over the ranks, attention all-gathering keys and
values inside the compiled graph. One launch per world size runs every registered policy in each rank,
with its declared ``sequence_parallel`` example options (``Policy.examples``; process start-up
dominates); every launch is bounded by a timeout, after which its processes are killed and the test
fails as a hang. The single-process reference runs the same model on the whole sequence.
"""

from __future__ import annotations

import logging
import multiprocessing
import time

import pytest
import sp_model
import torch

from cachepass import POLICIES
from cachepass.analysis.features import token_dependent
from cachepass.errors import OptionError
from cachepass.options import parse_options
from cachepass.policies.adacache import motion_sums
from cachepass.policies.distance import relative_l1
from cachepass.runtime.distributed import DecisionSync

LAUNCH_TIMEOUT_S = 300  # a whole launch; 2 shared CPU cores, 4 ranks each compiling 8 policies
COLLECTIVE_TIMEOUT_S = 60  # gloo gives up on a collective whose partner never comes


def launch(tmp_path, world: int, policies, *, extra=None, split=False, collective_timeout=COLLECTIVE_TIMEOUT_S):
    """Start ``world`` gloo ranks running ``sp_model.worker``; wait at most ``LAUNCH_TIMEOUT_S``, kill
    the ranks still alive then and fail. Returns each rank's exit code."""
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=sp_model.worker, args=(rank, world, str(tmp_path / "init"), str(tmp_path), list(policies),
                                                  extra or {}, sp_model.CHURN, collective_timeout, split))
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for rank in hung:
        procs[rank].kill()
        procs[rank].join()
    assert not hung, f"ranks {hung} still running after {LAUNCH_TIMEOUT_S} s: a hang"
    return [p.exitcode for p in procs]


def load(tmp_path, world: int) -> list[dict]:
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def configured(policy: str):
    """The policy object of ``policy`` with its sequence-parallel example options."""
    return parse_options({"policy": policy, **sp_model.case(policy)}).policy


def reads_token_statistics(policy: str) -> bool:
    """Whether the policy decides on a statistic of per-token tensors (an indicator or an observed body
    feature other than the timestep embedding), which each rank sees only its shard of."""
    req = configured(policy).requirements()
    return (req.indicator is not None and token_dependent(req.indicator)) or any(map(token_dependent, req.observe))


#: Policies whose unsynchronised ranks decide from their own shards (the rest read whole tensors or none).
SHARD_DEPENDENT = [policy for policy in POLICIES if reads_token_statistics(policy)]


@pytest.fixture(scope="module")
def reference():
    """Each policy on one process over the whole sequence (and the split run's second latent)."""
    out = {policy: sp_model.run_policy(policy, sp_model.case(policy)) for policy in POLICIES}
    out["split", 1] = sp_model.run_policy(sp_model.SPLIT_POLICY, sp_model.case(sp_model.SPLIT_POLICY), seed=1)
    return out


# four ranks take 36 s on a 2-core machine: -m slow; two ranks keep the property in the default run
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_sequence_parallel_ranks_decide_alike_and_match_one_process(tmp_path, reference, world):
    assert launch(tmp_path, world, POLICIES, split=world == 4) == [0] * world
    ranks = load(tmp_path, world)
    for policy in POLICIES:
        ref = reference[policy]
        runs = [r["results"][policy] for r in ranks]
        assert runs[0]["fallback"] is None and ref["fallback"] is None, policy
        for rank, run in enumerate(runs):
            assert run["decisions"] == runs[0]["decisions"], f"{policy}: rank {rank} decided otherwise than rank 0"
            assert len(run["decisions"]) == sp_model.STEPS
            assert run["computed_steps"] == [i for i, c in enumerate(run["decisions"]) if c]
            assert torch.equal(run["x"], runs[0]["x"])  # every rank gathered the same sequence
        if not configured(policy).sequence_parallel_exact():
            # adacache: its motion term leaves out the token pairs across shards (docs/distributed.md):
            # here a distance moves across a codebook bound and one interval differs from one process's
            assert relative_error(runs[0]["x"], ref["x"]) < 3e-2
        else:  # the summed statistics are the whole sequence's: one process decides the same
            assert runs[0]["decisions"] == ref["decisions"], policy
            assert relative_error(runs[0]["x"], ref["x"]) < 1e-5, policy
        if configured(policy).requirements().reuses:  # all but none
            assert False in ref["decisions"], f"{policy} never skipped: the check would prove nothing"
    for rank in ranks:  # announced once per process and group size, not once per compiled graph
        assert [m for m in rank["log"] if f"synchronised over {world} ranks" in m] == [
            f"cachepass: cache decisions are synchronised over {world} ranks (one all_reduce of the statistics "
            "per decision); pass sync=False if the ranks run different prompts (data-parallel serving)"
        ]
    check_statistics([r["results"]["statistics"] for r in ranks], world)
    if world == 4:
        check_split_groups([r["results"]["split"] for r in ranks], reference)


def check_statistics(stats: list[dict], world: int) -> None:
    """Relative L1 summed over shards is the whole tensor's; the motion sums are the formula over the
    token pairs that lie within one shard (those across shards are not seen)."""
    now, before = sp_model.statistic_tensors()
    for s in stats:
        assert s == stats[0]
        assert s["relative_l1"] == pytest.approx(relative_l1(now, before), rel=1e-6)
    n, step = sp_model.TOKENS // world, sp_model.TOKENS_PER_FRAME
    pairs = [i for i in range(sp_model.TOKENS - step) if i // n == (i + step) // n]
    assert len(pairs) == sp_model.TOKENS - step - (world - 1) * step
    later, earlier = now[:, [i + step for i in pairs]], now[:, pairs]
    expected = [(later - earlier).abs().sum(), later.abs().sum() + earlier.abs().sum(), world]
    assert stats[0]["motion"] == pytest.approx([float(v) for v in expected], rel=1e-5)
    whole = motion_sums(now, step).tolist()
    assert whole[0] / whole[1] != pytest.approx(expected[0] / expected[1], rel=1e-3)  # it is not the same number


def check_split_groups(runs: list[dict], reference) -> None:
    """Two groups of two ranks, each sequence-parallel over its own ``process_group`` on its own latent:
    each group decides as one process would on its latent, independently of the other group."""
    refs = [reference[sp_model.SPLIT_POLICY], reference["split", 1]]
    assert refs[0]["decisions"] != refs[1]["decisions"], "the two latents must lead to different schedules"
    for rank, run in enumerate(runs):
        ref = refs[2 * rank // len(runs)]
        assert run["decisions"] == ref["decisions"], f"rank {rank}"
        assert relative_error(run["x"], ref["x"]) < 1e-5


def test_shard_dependent_policies_are_the_ones_reading_token_statistics():
    """What the tests here derive from the requirements, pinned for the built-in policies so that a change
    shows (customcache reads the timestep embedding, whole on every rank, so it agrees either way)."""
    assert {"teacache", "adacache", "fbcache", "dbcache"} <= set(SHARD_DEPENDENT)
    assert not {"none", "interval", "taylorseer", "customcache", "magcache"} & set(SHARD_DEPENDENT)
    assert not configured("adacache").sequence_parallel_exact()
    exact = ("none", "interval", "teacache", "taylorseer", "customcache", "fbcache", "dbcache", "magcache")
    assert all(configured(p).sequence_parallel_exact() for p in exact)


#: Shard-dependent policies whose unsynchronised ranks still agree on this random model, and why.
AGREE_ON_THIS_MODEL = {
    "speca": "its front-block prediction error moves alike on both shards of this model: the ranks agreed at "
             "every threshold tried (0.9 to 2.0), so the model cannot show the disagreement",
}


@pytest.mark.parametrize("policy", [
    pytest.param(p, marks=[pytest.mark.skip(reason=AGREE_ON_THIS_MODEL[p])] if p in AGREE_ON_THIS_MODEL else [])
    for p in SHARD_DEPENDENT])
def test_without_sync_sharded_ranks_disagree(tmp_path, policy):
    """``sync=False`` on the sequence-parallel model: each rank decides from its own shard, and they
    part at some step (then their collectives no longer pair up: gloo aborts or times out). This is
    the failure the main test would see if cachepass did not synchronise (customcache reads the
    timestep embedding, whole on every rank, so it agrees either way)."""
    launch(tmp_path, 2, [policy], extra={"sync": False}, collective_timeout=15)
    logs = []
    for rank in range(2):
        path = tmp_path / f"rank{rank}-{policy}.log"
        logs.append(path.read_text() if path.exists() else "")
    common = min(map(len, logs))
    assert common >= 2, logs  # both ranks decided at least the first steps before anything broke
    assert logs[0][:common] != logs[1][:common], f"ranks agreed without synchronisation: {logs}"


# --- options and the reducer, in this process --------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"sync": "yes"}, "option 'sync' must be 'auto'"),
    ({"sync": 1}, "option 'sync' must be 'auto'"),
    ({"sync": None}, "option 'sync' must be 'auto'"),
    ({"process_group": "world"}, "option 'process_group' must be a torch.distributed ProcessGroup"),
    ({"process_group": [0, 1]}, "option 'process_group' must be a torch.distributed ProcessGroup"),
    ({"sync": False, "process_group": object()}, "option 'process_group' has no effect with sync=False"),
])
def test_bad_sync_options_name_the_option(options, message):
    with pytest.raises(OptionError, match=message):
        parse_options({"inner": "eager", **options})


def test_sync_defaults_to_auto_and_is_a_common_option():
    for policy in POLICIES:
        settings = parse_options({"policy": policy, **sp_model.case(policy), "sync": False})
        assert settings.sync is False and settings.process_group is None
    settings = parse_options({})
    assert settings.sync == "auto" and settings.process_group is None


def test_single_process_reducer_is_the_identity():
    import torch.distributed as dist

    assert not dist.is_initialized()
    stats = torch.tensor([3.0, 4.0])
    for mode in ("auto", False):
        sync = DecisionSync(mode)
        assert sync.reduce(stats) is stats and stats.tolist() == [3.0, 4.0]
        assert sync.world_size == 1
    with pytest.raises(RuntimeError, match="sync=True but torch.distributed is not initialised"):
        DecisionSync(True).reduce(stats)


def test_relative_l1_is_a_ratio_of_sums():
    now, before = torch.tensor([1.0, 2.0, 3.0, 5.0]), torch.tensor([1.0, 1.0, 2.0, 4.0])
    assert relative_l1(now, before) == pytest.approx(3.0 / 8.0)
    assert relative_l1(torch.zeros(3), torch.zeros(3)) == 0.0
    assert relative_l1(torch.ones(3), torch.zeros(3)) == float("inf")
    # an all-reduce over shards adds the per-shard sums: the same ratio as the whole tensors'
    halves = [relative_l1(now[i:i + 2], before[i:i + 2]) for i in (0, 2)]
    assert relative_l1(now, before) != pytest.approx(sum(halves) / 2)  # not an average of ratios


def test_decisions_are_logged_at_debug_level(caplog):
    with caplog.at_level(logging.DEBUG, logger=sp_model.PROGRAM_LOGGER):
        run = sp_model.run_policy("interval", {"interval": 3})
    lines = [r.getMessage() for r in caplog.records if r.name == sp_model.PROGRAM_LOGGER]
    assert lines[:2] == ["cachepass: generation 0 step 0 branch 0: compute",
                         "cachepass: generation 0 step 1 branch 0: reuse"]
    # every third step, and the last one (the step count is known)
    assert run["decisions"] == [step % 3 == 0 or step == sp_model.STEPS - 1 for step in range(sp_model.STEPS)]
