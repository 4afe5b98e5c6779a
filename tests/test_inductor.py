"""The deliberate inductor tests: every graph variant compiled by inductor, not only run eagerly."""

import torch
from conftest import relative_l1
from tiny_models import tiny_wan, wan_inputs

import cachepass

SCHEDULE = [999, 800, 600, 400, 200]


def test_inductor_variants_match_eager_variants():
    torch._dynamo.utils.counters.clear()  # other tests break graphs on purpose
    inputs = wan_inputs()
    eager = torch.compile(tiny_wan(), backend="cachepass", options={"policy": "interval", "interval": 2, "inner": "eager"})
    fast = torch.compile(tiny_wan(), backend="cachepass",
                         options={"policy": "interval", "interval": 2, "inner": "inductor"})
    with torch.no_grad():
        for t in SCHEDULE:
            a = eager(timestep=torch.tensor([t]), **inputs)[0]
            b = fast(timestep=torch.tensor([t]), **inputs)[0]
            assert relative_l1(b, a) < 1e-4
    assert cachepass.stats(fast).branches[0].computed_steps == [0, 2, 4]
    assert not torch._dynamo.utils.counters["graph_break"]  # cachepass adds no graph break
