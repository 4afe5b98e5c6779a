"""diffusers' real WanPipeline, unchanged, with the transformer compiled by cachepass."""

import torch
from conftest import count_attention_calls, relative_l1
from tiny_models import run_wan_pipeline, tiny_wan, tiny_wan_pipeline

import cachepass

STEPS = 8


def test_wan_pipeline_two_generations_with_cfg():
    pipe = tiny_wan_pipeline(tiny_wan(num_layers=3))
    reference = run_wan_pipeline(pipe, steps=STEPS)
    full_attention = count_attention_calls(lambda: run_wan_pipeline(pipe, steps=STEPS))
    assert full_attention == STEPS * 2 * 3 * 2  # steps x (cond, uncond) x blocks x (self, cross)

    pipe.transformer = torch.compile(pipe.transformer, backend="cachepass",
                                     options={"policy": "interval", "interval": 3, "inner": "eager"})
    first = run_wan_pipeline(pipe, steps=STEPS)
    cached_attention = count_attention_calls(lambda: run_wan_pipeline(pipe, steps=STEPS))

    stats = cachepass.stats(pipe.transformer)
    assert stats.generations == 2
    assert len(stats.branches) == 2  # cond and uncond are separate calls, hence separate branches
    for branch in stats.branches + stats.history[0]:
        assert branch.computed_steps == [0, 3, 6, 7]  # the pipeline's step count: the last step computes
        assert branch.reused_steps == [1, 2, 4, 5]
    assert cached_attention == 4 * 2 * 3 * 2  # only the computed steps ran the blocks

    second = run_wan_pipeline(pipe, steps=STEPS)
    assert torch.equal(first, second)
    assert relative_l1(first, reference) < 0.1

    # a generation with another step count is detected from the timesteps alone
    run_wan_pipeline(pipe, steps=5)
    assert [s.steps for s in cachepass.stats(pipe.transformer).branches] == [5, 5]


def test_batched_cfg_is_one_branch():
    """Pipelines that batch cond and uncond call the model once per step: one branch, batch 2."""
    model = tiny_wan()
    fast = torch.compile(model, backend="cachepass", options={"policy": "interval", "interval": 2, "inner": "eager"})
    x = torch.randn(2, 4, 2, 8, 8)
    text = torch.randn(2, 5, 16)
    with torch.no_grad():
        for t in (900, 700, 500):
            fast(hidden_states=x, timestep=torch.tensor([t, t]), encoder_hidden_states=text)
    stats = cachepass.stats(fast)
    assert len(stats.branches) == 1 and stats.branches[0].computed_steps == [0, 2]
