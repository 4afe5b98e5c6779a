"""Policy options: defaults, and every bad value raising a ValueError that names the option."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cachepass
from cachepass.errors import OptionError
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
    ("teacache", "branches", "joint"),
    ("fbcache", "branches", True),
]


@pytest.mark.parametrize("policy, option, value", BAD)
def test_bad_option_names_the_option(policy, option, value):
    with pytest.raises(ValueError, match=f"'{option}'"):
        parse_options({"policy": policy, option: value})


def test_granularity_reaches_the_reconstruction():
    for granularity in ("stack", "block"):
        settings = parse_options({"policy": "taylorseer", "granularity": granularity, "order": 3})
        assert settings.policy.requirements().reconstruction == TaylorReuse(order=3, granularity=granularity)


@pytest.mark.parametrize("policy", list(cachepass.POLICIES))
def test_unknown_option_lists_the_valid_ones(policy):
    with pytest.raises(ValueError, match="unknown option 'treshold'.*valid options are"):
        parse_options({"policy": policy, "treshold": 0.1})


@pytest.mark.parametrize("policy", list(cachepass.POLICIES))
def test_every_declared_example_is_valid(policy):
    """Each registered policy's example options (``Policy.examples``) parse, and its requirements name
    real indicators and features (checked when stated)."""
    cls = cachepass.POLICIES[policy]
    assert "tiny" in cls.examples, f"{policy} declares no 'tiny' example (docs/policies.md, Adding a policy)"
    for name in cls.examples:
        options = {**cls.example("tiny"), **cls.example(name)} if name == "image" else cls.example(name)
        settings = parse_options({"policy": policy, **options})
        assert settings.policy.name == policy and isinstance(settings.policy, cls)
        settings.policy.requirements()


def test_defaults():
    assert DEFAULT_POLICY == "taylorseer"
    settings = parse_options({})
    assert settings.policy.name == "taylorseer"
    c = settings.policy.config
    assert (c.interval, c.order, c.warmup, c.final_steps, c.granularity) == (4, 1, 1, 1, "stack")
    c = parse_options({"policy": "teacache"}).policy.config
    assert (c.threshold, c.indicator, c.ret_steps) == (0.2, "timestep_embedding", False)
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


# --- issue 11: finite numbers in range, exact types, bounded sizes, one OptionError --------------

MAG = {"policy": "magcache", "mag_ratios": [1.0, 0.95, 0.9, 0.9]}
NAN, INF = float("nan"), float("inf")

BAD_VALUES = [
    ({"policy": "teacache", "threshold": NAN}, "threshold"),
    ({"policy": "customcache", "threshold": NAN}, "threshold"),
    ({"policy": "fbcache", "threshold": NAN}, "threshold"),
    ({"policy": "dbcache", "threshold": NAN}, "threshold"),
    ({**MAG, "threshold": NAN}, "threshold"),
    ({"policy": "teacache", "threshold": INF}, "threshold"),
    ({"policy": "teacache", "threshold": 10**400}, "threshold"),  # an int too large for a float
    ({"policy": "teacache", "threshold": True}, "threshold"),  # a bool is never a number
    ({"policy": "teacache", "threshold": np.bool_(True)}, "threshold"),
    ({"policy": "teacache", "threshold": "0.1"}, "threshold"),
    ({"policy": "teacache", "threshold": torch.tensor(0.1)}, "threshold"),
    ({"policy": "teacache", "coefficients": [1.0, NAN]}, "coefficients"),
    ({"policy": "teacache", "coefficients": [INF, 0.0]}, "coefficients"),
    ({"policy": "teacache", "coefficients": {1.0: 2.0, 3.0: 4.0}}, "coefficients"),  # not silently its keys
    ({"policy": "teacache", "coefficients": 1.0}, "coefficients"),
    ({"policy": "teacache", "coefficients": {1.0, 2.0}}, "coefficients"),
    ({"policy": "teacache", "coefficients": [1.0] * 33}, "coefficients"),
    ({"policy": "teacache", "coefficients": [[1.0, 2.0]]}, "coefficients"),
    ({"policy": "magcache", "mag_ratios": 1.0}, "mag_ratios"),
    ({"policy": "magcache", "mag_ratios": {1.0: 0.9}}, "mag_ratios"),
    ({"policy": "magcache", "mag_ratios": "0.9"}, "mag_ratios"),
    ({"policy": "magcache", "mag_ratios": [1.0, INF]}, "mag_ratios"),
    ({"policy": "magcache", "mag_ratios": [1.0, NAN]}, "mag_ratios"),
    ({"policy": "magcache", "mag_ratios": [1.0, 0.0]}, "mag_ratios"),
    ({"policy": "magcache", "mag_ratios": [[1.0, 0.9], [1.0]]}, "mag_ratios"),  # ragged
    ({"policy": "magcache", "mag_ratios": [[1.0, 0.9], 1.0]}, "mag_ratios"),
    ({"policy": "magcache", "mag_ratios": [1.0] * 10_001}, "mag_ratios"),
    ({"policy": "magcache", "mag_ratios": [[1.0]] * 65}, "mag_ratios"),
    ({**MAG, "retention_ratio": NAN}, "retention_ratio"),  # failed only at step 1 before
    ({**MAG, "retention_ratio": 1.5}, "retention_ratio"),
    ({**MAG, "max_skip_steps": 10**9}, "max_skip_steps"),
    ({**MAG, "num_steps": 10**9}, "num_steps"),  # was a MemoryError after 51 s
    ({"num_steps": 10_001}, "num_steps"),
    ({"num_steps": 0}, "num_steps"),
    ({"num_steps": 4.0}, "num_steps"),
    ({"num_steps": True}, "num_steps"),
    ({"policy": ["teacache"]}, "policy"),  # unhashable: was a TypeError
    ({"policy": {"name": "teacache"}}, "policy"),
    ({"policy": None}, "policy"),
    ({"policy": 3}, "policy"),
    ({"policy": "interval", "interval": True}, "interval"),
    ({"policy": "interval", "interval": 10**9}, "interval"),
    ({"policy": "interval", "compute_last": 1}, "compute_last"),
    ({"policy": "taylorseer", "order": np.float32(2)}, "order"),
    ({"policy": "taylorseer", "warmup": 10**6}, "warmup"),
    ({"policy": "dbcache", "Fn": 10**6}, "Fn"),
    ({"policy": "adacache", "tokens_per_frame": 2**40}, "tokens_per_frame"),
    ({"policy": "adacache", "motion": np.int64(1)}, "motion"),
    ({"policy": "adacache", "codebook": {INF: 2}}, "codebook"),
    ({"policy": "adacache", "codebook": {NAN: 2}}, "codebook"),
    ({"policy": "adacache", "codebook": {0.1: 10**6}}, "codebook"),
    ({"policy": "adacache", "codebook": {0.01 * (i + 1): 1 for i in range(65)}}, "codebook"),
    ({"policy": "adacache", "codebook": ["auto"]}, "codebook"),
    ({"policy": "adacache", "feature": "attention_output:3\n"}, "feature"),
    ({"policy": "adacache", "feature": "attention_output:" + "9" * 30}, "feature"),
    ({"sync": "yes"}, "sync"),
    ({"sync": 1}, "sync"),
    ({"sync": ["auto"]}, "sync"),
    ({"inner": 3}, "inner"),
    ({"inner": int}, "inner"),  # a class is not a backend
    ({"inner": ["eager"]}, "inner"),
    ({"profile": 3}, "profile"),
    ({"profile": ""}, "profile"),
]


@pytest.mark.parametrize("options, option", BAD_VALUES, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_value_is_an_option_error_naming_the_option(options, option):
    with pytest.raises(OptionError, match=f"'{option}'"):
        parse_options(options)


def test_option_error_is_a_value_error():
    assert issubclass(OptionError, ValueError)


@pytest.mark.parametrize("options", [{1: 0.1, "policy": "teacache"}, {None: 1}, {("a",): 1, "b": 2},
                                     {b"threshold": 0.1}])
def test_option_names_must_be_strings(options):
    with pytest.raises(OptionError, match="option names must be strings"):
        parse_options(options)


@pytest.mark.parametrize("options", [["policy", "teacache"], "teacache", 3, (("policy", "none"),)])
def test_options_must_be_a_mapping(options):
    with pytest.raises(OptionError, match="options must be a dict"):
        parse_options(options)


def test_numpy_scalars_are_numbers_and_bools():
    s = parse_options({"policy": "teacache", "threshold": np.float32(0.25), "ret_steps": np.bool_(True),
                       "num_steps": np.int64(30), "sync": np.bool_(False), "coefficients": np.array([1.0, 0.5])})
    c = s.policy.config
    assert (type(c.threshold), type(c.ret_steps), type(s.num_steps), s.sync) == (float, bool, int, False)
    assert c.threshold == pytest.approx(0.25) and s.num_steps == 30 and list(s.policy.poly.coeffs) == [1.0, 0.5]
    c = parse_options({"policy": "interval", "interval": np.int32(5), "compute_last": np.bool_(True)}).policy.config
    assert (c.interval, c.compute_last) == (5, True) and type(c.interval) is int
    c = parse_options({"policy": "magcache", "mag_ratios": np.array([1.0, 0.9], dtype=np.float32),
                       "max_skip_steps": np.int8(2), "retention_ratio": np.float16(0.5)}).policy.config
    assert c.mag_ratios == [[1.0, pytest.approx(0.9)]] and c.max_skip_steps == 2 and c.retention_ratio == 0.5
    c = parse_options({"policy": "adacache", "codebook": {np.float64(0.1): np.int64(3), 1.0: 1}}).policy.config
    assert c.resolved_codebook(None) == {0.1: 3, 1.0: 1}
    assert parse_options({"policy": "dbcache", "Fn": np.uint8(2), "taylor": np.int16(2)}).policy.config.Fn == 2


def test_sequences_may_be_lists_tuples_or_arrays():
    for value in ([1.0, 0.0], (1.0, 0.0), np.array([1.0, 0.0]), [1, 0]):
        assert list(parse_options({"policy": "teacache", "coefficients": value}).policy.poly.coeffs) == [1.0, 0.0]
    for value in ([[1.0, 0.9], [1.0, 0.8]], ((1.0, 0.9), (1.0, 0.8)), np.array([[1.0, 0.9], [1.0, 0.8]])):
        assert parse_options({"policy": "magcache", "mag_ratios": value}).policy.config.mag_ratios == \
            [[1.0, 0.9], [1.0, 0.8]]


def test_documented_maxima_are_accepted():
    assert parse_options({"num_steps": 10_000}).num_steps == 10_000
    assert parse_options({"policy": "interval", "interval": 10_000}).policy.config.interval == 10_000
    assert parse_options({"policy": "teacache", "coefficients": [0.0] * 32}).policy.poly.order == 0
    c = parse_options({"policy": "magcache", "mag_ratios": [[1.0] * 10_000] * 2, "num_steps": 10_000}).policy.config
    assert len(c.mag_ratios[0]) == 10_000
    assert parse_options({"policy": "teacache", "threshold": 1e300}).policy.config.threshold == 1e300


def test_bad_option_fails_before_any_graph_is_compiled():
    compiled_pieces = []

    def inner(gm, example_inputs):
        compiled_pieces.append(gm)
        return gm.forward

    model = torch.nn.Linear(2, 2)
    compiled = torch.compile(model, backend="cachepass", options={"threshold": float("nan"), "inner": inner})
    with pytest.raises(OptionError, match="'threshold'"), torch.no_grad():
        compiled(torch.randn(1, 2))
    assert compiled_pieces == []
    with pytest.raises(OptionError, match="'threshold'"):
        cachepass.backend(threshold=float("nan"), inner=inner)
