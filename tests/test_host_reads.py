"""Host reads per denoiser call (issue 14): a read back from the device (``Tensor.item`` / ``tolist``,
seen by the profiler as ``aten::_local_scalar_dense``, plus ``Tensor.tolist``) makes the host wait for the
device queue to drain. Inside a pipeline that states the step (WanPipeline's ``cache_context``), a policy
whose schedule needs no device statistic adds none: the timestep is not read back."""

import pytest
import torch
from tiny_models import run_wan_pipeline, tiny_wan, tiny_wan_pipeline

from cachepass.policies import POLICIES

STEPS = 8
SCHEDULE_POLICIES = ["none", "interval", "taylorseer", "magcache"]  # decide from the step alone


def count_host_reads(fn) -> int:
    original = torch.Tensor.tolist
    tolist_calls = [0]

    def counting_tolist(self, *args, **kwargs):
        tolist_calls[0] += 1
        return original(self, *args, **kwargs)

    torch.Tensor.tolist = counting_tolist
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
    finally:
        torch.Tensor.tolist = original
    return tolist_calls[0] + sum(1 for e in prof.events() if e.name == "aten::_local_scalar_dense")


@pytest.fixture(scope="module")
def plain_reads():
    """What the pipeline itself reads per generation (its scheduler), with the plain model."""
    pipe = tiny_wan_pipeline(tiny_wan())
    run_wan_pipeline(pipe, steps=STEPS)
    return count_host_reads(lambda: run_wan_pipeline(pipe, steps=STEPS))


@pytest.mark.parametrize("policy", SCHEDULE_POLICIES)
def test_schedule_policies_read_nothing_back_per_call(policy, plain_reads):
    torch._dynamo.reset()
    model = tiny_wan()
    pipe = tiny_wan_pipeline(model)
    options = {"policy": policy, "inner": "eager", **POLICIES[policy].example("tiny")}
    pipe.transformer = torch.compile(model, backend="cachepass", options=options)
    run_wan_pipeline(pipe, steps=STEPS)  # compiles
    added = count_host_reads(lambda: run_wan_pipeline(pipe, steps=STEPS)) - plain_reads
    assert added == 0, f"{policy}: {added} host reads in {2 * STEPS} calls"


def test_a_raw_loop_still_reads_the_timestep():
    """Without a pipeline's step the timestep places the call: one read per call."""
    torch._dynamo.reset()
    from tiny_models import wan_inputs

    model = tiny_wan()
    fast = torch.compile(model, backend="cachepass", options={"policy": "interval", "inner": "eager"})
    inputs = wan_inputs()

    def loop():
        with torch.no_grad():
            for t in (999, 900, 800, 700):
                fast(timestep=torch.tensor([t]), **inputs)

    loop()
    assert count_host_reads(loop) == 4
