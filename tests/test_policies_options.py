"""Policy options: defaults, and every bad value raising a ValueError that names the option."""

from __future__ import annotations

import pytest
import torch

from cachepass.options import DEFAULT_POLICY, parse_options
from cachepass.reconstruction import TaylorReuse

BAD = [
    ("teacache", "threshold", -1),
    ("teacache", "threshold", "high"),
    ("teacache", "indicator", "first_block_output"),
    ("teacache", "coefficients", "wan2.2"),
    ("teacache", "coefficients", []),  # any degree is allowed (calibrated polynomials), none is not
    ("teacache", "coefficients", [1, 2, 3, 4, "5"]),
    ("teacache", "ret_steps", "yes"),
    ("taylorseer", "interval", 0),
    ("taylorseer", "order", 0),
    ("taylorseer", "order", 5),
    ("taylorseer", "warmup", 0),
    ("taylorseer", "final_steps", -1),
    ("taylorseer", "granularity", "layer"),
    ("adacache", "feature", "attention_output"),
    ("adacache", "feature", "mlp_output:3"),
    ("adacache", "codebook", "70"),
    ("adacache", "codebook", {0.1: 0}),
    ("adacache", "codebook", {}),
    ("adacache", "tokens_per_frame", 0),
    ("adacache", "motion", 1),
    ("adacache", "warmup", 0),
    ("adacache", "final_steps", 1.5),
    ("customcache", "order", 7),
    ("customcache", "threshold", None),
    ("fbcache", "threshold", None),
    ("fbcache", "warmup", 0),
    ("dbcache", "Fn", 0),
    ("dbcache", "Bn", -1),
    ("dbcache", "taylor", 5),
]


@pytest.mark.parametrize("policy, option, value", BAD)
def test_bad_option_names_the_option(policy, option, value):
    with pytest.raises(ValueError, match=f"'{option}'"):
        parse_options({"policy": policy, option: value})


def test_granularity_reaches_the_reconstruction():
    for granularity in ("stack", "block"):
        settings = parse_options({"policy": "taylorseer", "granularity": granularity, "order": 3})
        assert settings.policy.requirements().reconstruction == TaylorReuse(order=3, granularity=granularity)


@pytest.mark.parametrize("policy", ["teacache", "taylorseer", "adacache", "customcache", "fbcache", "dbcache"])
def test_unknown_option_lists_the_valid_ones(policy):
    with pytest.raises(ValueError, match="unknown option 'treshold'.*valid options are"):
        parse_options({"policy": policy, "treshold": 0.1})


def test_defaults():
    assert DEFAULT_POLICY == "teacache"
    settings = parse_options({})
    assert settings.policy.name == "teacache"
    c = settings.policy.config
    assert (c.threshold, c.indicator, c.ret_steps) == (0.2, "timestep_embedding", False)
    c = parse_options({"policy": "taylorseer"}).policy.config
    assert (c.interval, c.order, c.warmup, c.final_steps, c.granularity) == (4, 1, 1, 0, "stack")
    c = parse_options({"policy": "adacache"}).policy.config
    assert (c.feature, c.codebook, c.motion, c.tokens_per_frame) == ("attention_output:middle", "auto", True, None)
    c = parse_options({"policy": "fbcache"}).policy.config
    assert (c.threshold, c.warmup, c.final_steps) == (0.1, 1, 0)
    c = parse_options({"policy": "dbcache"}).policy.config
    assert (c.Fn, c.Bn, c.threshold, c.warmup, c.taylor) == (1, 0, 0.12, 8, None)


def test_bad_option_through_torch_compile_is_a_value_error():
    model = torch.nn.Linear(2, 2)
    compiled = torch.compile(model, backend="cachepass", options={"policy": "taylorseer", "order": 9})
    with pytest.raises(ValueError, match="'order'"), torch.no_grad():
        compiled(torch.randn(1, 2))
