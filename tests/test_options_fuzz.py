"""Seeded fuzzing of the options and of profile files (issue 11).

Every random option dict and every corrupt profile either raises an ``OptionError`` (a ``ValueError``)
whose message names an option or the profile file, or is accepted and then runs a short generation
correctly (right shape, finite, the first call equal to the plain model). No other exception type, ever.

The default run parses every case and compiles a seeded sample of the distinct accepted ones covering
every policy (half through ``cachepass.backend(**o)``, half through ``torch.compile(options=o)``);
``-m slow`` compiles all of them.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import pickle
import random
import time
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch
from tiny_models import PlainDiT

import cachepass
from cachepass.calibration.profile import ModelFingerprint, Profile
from cachepass.errors import OptionError
from cachepass.options import COMMON_OPTIONS, parse_options
from cachepass.policies.teacache import COEFFICIENT_PRESETS

SEED = 11
N_DICTS = 540
N_PROFILES = 64
RUN_SAMPLE = 60  # accepted option dicts compiled and run in the default (fast) run
PROFILE_RUN_SAMPLE = 6
TIMESTEPS = (999.0, 750.0, 500.0, 250.0)

FIELDS = {name: [f.name for f in dataclasses.fields(cls.config_class)] for name, cls in cachepass.POLICIES.items()}
KNOWN = set(COMMON_OPTIONS) | {f for names in FIELDS.values() for f in names}


# --- random values ----------------------------------------------------------------------------------

def _deep_list(depth):
    value = [1.0]
    for _ in range(depth):
        value = [value]
    return value


def _junk(rng: random.Random):
    """A value no option should take whole (a few are valid for some options: then they just run)."""
    makers = [
        lambda: math.nan, lambda: math.inf, lambda: -math.inf, lambda: -1, lambda: -0.5, lambda: 0, lambda: 10**9,
        lambda: 10**400, lambda: 1e308, lambda: -1e308, lambda: 2.5, lambda: "0.1", lambda: "", lambda: "auto",
        lambda: "teacache", lambda: "x" * 500, lambda: "1e400", lambda: None, lambda: True, lambda: False,
        lambda: np.bool_(True), lambda: np.float32("nan"), lambda: np.float64("inf"), lambda: np.int64(-3),
        lambda: np.int64(10**12), lambda: np.float16(65504), lambda: [], lambda: [1], lambda: [math.nan],
        lambda: [[1.0, 2.0], [3.0]], lambda: [1.0, [2.0]], lambda: {}, lambda: {"a": 1}, lambda: {1: 2.0},
        lambda: {math.nan: 1}, lambda: {0.1: True}, lambda: {1, 2}, lambda: frozenset(), lambda: (1, 2),
        lambda: (), lambda: b"x", lambda: bytearray(b"teacache"), lambda: object(), lambda: complex(1, 2),
        lambda: Decimal("0.1"), lambda: Fraction(1, 3), lambda: np.array([1.0, 2.0]), lambda: np.array(["a"]),
        lambda: np.array([[1.0]]), lambda: np.zeros((2, 2, 2)), lambda: np.array(0.5), lambda: torch.tensor(0.5),
        lambda: torch.tensor([1.0, 2.0]), lambda: _deep_list(50), lambda: _deep_list(3), lambda: range(3),
        lambda: iter([1.0, 2.0]), lambda: (lambda: 1), lambda: int, lambda: [1.0] * 20_000,
        lambda: {"nested": {"junk": [None, {"x": math.inf}]}}, lambda: [np.float32(1.0), np.int8(1)],
    ]
    return rng.choice(makers)()


def _number(rng, low, high):
    value = rng.uniform(low, high)
    return rng.choice([value, value, np.float32(value), np.float64(value)])


def _count(rng, low, high):
    value = rng.randint(low, high)
    return rng.choice([value, value, np.int64(value), np.int32(value)])


def _flag(rng):
    return rng.choice([True, False, np.bool_(True), np.bool_(False)])


def _ratios(rng, steps):
    return [rng.uniform(0.8, 1.1) for _ in range(steps)]


def _valid(rng: random.Random, name: str, profiles: dict):
    """A value the option accepts (numpy scalars included)."""
    if name == "threshold":
        return rng.choice([_number(rng, 0.0, 0.5), 0, 1, 1e6])
    if name == "indicator":
        return rng.choice(["timestep_embedding", "modulated_input"])
    if name == "coefficients":
        k = rng.randint(1, 6)
        values = [rng.uniform(-2, 2) for _ in range(k)]
        return rng.choice([None, rng.choice(list(COEFFICIENT_PRESETS)), values, tuple(values), np.array(values),
                           [np.float32(v) for v in values]])
    if name == "ret_steps" or name == "compute_last":
        return _flag(rng)
    if name == "motion":
        return rng.choice([False, False, np.bool_(False), True])
    if name == "profile":
        return rng.choice([None, profiles["teacache"]])
    if name in ("order", "taylor"):
        return _count(rng, 1, 4) if name == "order" or rng.random() < 0.7 else None
    if name == "interval":
        return rng.choice([_count(rng, 1, 6), 10_000])
    if name == "warmup":
        return _count(rng, 1, 3)
    if name == "final_steps":
        return _count(rng, 0, 2)
    if name == "granularity":
        return rng.choice(["stack", "block"])
    if name == "feature":
        return rng.choice(["attention_output:middle", "block_output:0", "block_output:-1", "attention_output:1",
                           "block_output:99"])
    if name == "codebook":
        return rng.choice(["auto", "100", "50", "30-fast", "30-slow", {0.05: 2, 1.0: 1},
                           {np.float32(0.2): np.int64(3), 1: 1}])
    if name == "tokens_per_frame":
        return rng.choice([None, _count(rng, 1, 8), 2**31 - 1])
    if name == "Fn":
        return _count(rng, 1, 3)
    if name == "Bn":
        return _count(rng, 0, 2)
    if name == "max_skip_steps":
        return _count(rng, 0, 5)
    if name == "retention_ratio":
        return _number(rng, 0.0, 1.0)
    if name == "mag_ratios":
        steps = rng.randint(1, 8)
        flat = _ratios(rng, steps)
        return rng.choice([flat, tuple(flat), np.array(flat), [flat, _ratios(rng, steps)],
                           np.array([flat, flat])])
    if name == "num_steps":
        return rng.choice([None, _count(rng, 1, 8), 10_000])
    if name == "sync":  # not True: that one raises at the first call when torch.distributed is not initialised
        return rng.choice(["auto", False, np.bool_(False)])
    if name == "process_group":
        return None
    # an option of a policy added later: one of its declared examples' values, else its default
    for cls in cachepass.POLICIES.values():
        for example in cls.examples.values():
            if name in example:
                return example[name]
    for cls in cachepass.POLICIES.values():
        for f in dataclasses.fields(cls.config_class):
            if f.name == name and f.default is not dataclasses.MISSING:
                return f.default
    raise AssertionError(f"no valid value known for option {name!r}: declare one in the policy's examples")


def random_options(rng: random.Random, profiles: dict):
    """One random option dict (or, rarely, something that is not a dict at all)."""
    if rng.random() < 0.01:
        return rng.choice([["policy", "teacache"], "policy=teacache", 3, (("policy", "none"),)])
    policy = rng.choice(list(cachepass.POLICIES))
    options: dict = {"inner": "eager"}
    if rng.random() < 0.95:
        options["policy"] = policy if rng.random() < 0.95 else _junk(rng)
    else:
        policy = "teacache"
    if policy not in FIELDS:
        policy = "teacache"
    names = FIELDS[policy] + ["num_steps", "sync", "process_group"]
    for name in names:
        wanted = 0.9 if (policy, name) == ("magcache", "mag_ratios") else 0.4
        if rng.random() < wanted:
            options[name] = _valid(rng, name, profiles) if rng.random() < 0.8 else _junk(rng)
            if name == "profile" and options[name] == profiles["teacache"] and policy == "magcache":
                options[name] = profiles["magcache"]
    if policy == "adacache" and "motion" not in options and "tokens_per_frame" not in options and rng.random() < 0.7:
        options["motion"] = False  # the tiny model has no video latent: let most adacache cases cache
    roll = rng.random()
    if roll < 0.08:
        options[rng.choice(["treshold", "foo", "", "Threshold", "policy ", "self", "options", "mode"])] = 1
    elif roll < 0.14:
        options[rng.choice([1, None, (1, 2), 1.5, b"threshold", True, frozenset()])] = 0.1
    elif roll < 0.19:
        options["inner"] = rng.choice(["nope", "cachepass", "", None, 3, ["eager"], {"eager": 1}, int])
    if rng.random() < 0.3:  # dict order should not matter
        items = list(options.items())
        rng.shuffle(items)
        options = dict(items)
    return options


# --- checking one case ---------------------------------------------------------------------------

def _names_an_option(message: str, options) -> bool:
    if "option names must be strings" in message or "options must be a dict" in message:
        return True
    names = KNOWN | {k for k in options if isinstance(k, str)} if isinstance(options, dict) else KNOWN
    return any(f"'{name}'" in message for name in names)


def _key(options: dict) -> str:
    return repr(sorted((k, repr(v)) for k, v in options.items()))


class Runner:
    """Compiles a tiny model under accepted options and checks one short generation."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = PlainDiT(channels=4, dim=16, depth=3, heads=2).eval()
        self.x = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            self.first = self.model(self.x, torch.tensor([TIMESTEPS[0]]))

    def run(self, options: dict, route: str) -> None:
        torch._dynamo.reset()
        if route == "backend":
            compiled = torch.compile(self.model, backend=cachepass.backend(**options))
        else:
            compiled = torch.compile(self.model, backend="cachepass", options=options)
        with torch.no_grad():
            for i, t in enumerate(TIMESTEPS):
                out = compiled(self.x, torch.tensor([t]))
                assert out.shape == self.x.shape, (options, out.shape)
                assert torch.isfinite(out).all(), options
                if i == 0:  # a branch's first call is always computed
                    torch.testing.assert_close(out, self.first, rtol=1e-4, atol=1e-5)

    def rejected_through_compile(self, options) -> str:
        """The message of the OptionError ``torch.compile(options=o)`` raises at the first call."""
        torch._dynamo.reset()
        compiled = torch.compile(self.model, backend="cachepass", options=options)
        with pytest.raises(OptionError) as info, torch.no_grad():
            compiled(self.x, torch.tensor([TIMESTEPS[0]]))
        return str(info.value)


def _valid_profiles(tmp_path) -> dict:
    toy = ModelFingerprint("Toy", 1, "0" * 32)
    tea = Profile("teacache", {"threshold": 0.1, "indicator": "timestep_embedding", "coefficients": [1.0, 0.0],
                               "ret_steps": False}, 4, toy, {"fit": {"r2": 0.9}})
    mag = Profile("magcache", {"threshold": 0.2, "mag_ratios": [[1.0, 0.97, 0.95, 0.9], [1.0, 0.96, 0.95, 0.9]],
                               "max_skip_steps": 2, "retention_ratio": 0.25}, 4, toy, {})
    return {"teacache": str(tea.save(tmp_path / "teacache.json")), "magcache": str(mag.save(tmp_path / "magcache.json"))}


def fuzz_options(tmp_path, run_all: bool):
    rng = random.Random(SEED)
    profiles = _valid_profiles(tmp_path)
    runner = Runner()
    raised, ran_ok, accepted, failures = 0, 0, {}, []
    rejected_samples = []
    for i in range(N_DICTS):
        options = random_options(rng, profiles)
        try:
            parse_options(options)
        except OptionError as exc:
            raised += 1
            if not _names_an_option(str(exc), options):
                failures.append(f"#{i} {options!r}: message names no option: {exc}")
            elif isinstance(options, dict) and len(rejected_samples) < 12 and rng.random() < 0.1:
                rejected_samples.append(options)
            continue
        except Exception as exc:  # the defect this test exists for
            failures.append(f"#{i} {options!r}: {type(exc).__name__}: {exc}")
            continue
        ran_ok += 1
        accepted.setdefault(_key(options), options)
    assert not failures, "\n".join(failures[:20])

    # the torch.compile route raises the same OptionError at the first call (before any graph is compiled)
    for options in rejected_samples[:6]:
        assert _names_an_option(runner.rejected_through_compile(options), options)

    distinct = list(accepted.values())
    if run_all:
        chosen = distinct
    else:  # round-robin over the policies, so every one runs
        by_policy: dict = {}
        for options in distinct:
            by_policy.setdefault(options.get("policy", "teacache"), []).append(options)
        assert set(by_policy) == set(cachepass.POLICIES), sorted(by_policy)
        pools = [rng.sample(v, len(v)) for _, v in sorted(by_policy.items())]
        chosen = []
        while len(chosen) < min(RUN_SAMPLE, len(distinct)):
            for pool in pools:
                if pool and len(chosen) < RUN_SAMPLE:
                    chosen.append(pool.pop())
    for j, options in enumerate(chosen):
        try:
            runner.run(options, "backend" if j % 2 == 0 else "options")
        except Exception as exc:
            failures.append(f"{options!r}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures[:20])
    return raised, ran_ok, len(distinct), len(chosen)


# --- corrupt profiles -----------------------------------------------------------------------------

_JSON_JUNK = [math.nan, math.inf, -math.inf, "0.1", "", [], {}, None, True, False, 1e300, -1, 0, 10**30, [[[]]],
              {"a": [1]}, "x" * 5000, 2.5, [math.nan], [1.0] * 20_000, "__import__('os').system('true')"]
_PATHS = ["format", "version", "policy", "num_steps", "model", "model.class", "model.parameters", "model.digest",
          "options", "options.threshold", "report", "report.fit", "extra"]
_TEA_PATHS = ["options.indicator", "options.coefficients", "options.coefficients.0", "options.ret_steps"]
_MAG_PATHS = ["options.mag_ratios", "options.mag_ratios.0", "options.mag_ratios.0.1", "options.max_skip_steps",
              "options.retention_ratio"]


def _set(data, path: str, value, delete=False):
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            return
    key = int(last) if isinstance(node, list) else last
    if delete:
        if isinstance(node, dict):
            node.pop(key, None)
        elif key < len(node):
            node.pop(key)
    elif isinstance(node, dict) or key < len(node):
        node[key] = value


def corrupt_profile(rng: random.Random, base: dict, text: str) -> bytes:
    kind = rng.randrange(14)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 400)))
    if kind == 1:  # invalid UTF-8 inside otherwise valid JSON
        i = rng.randrange(len(text))
        return text[:i].encode() + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xe9"]) + text[i:].encode()
    if kind == 2:
        return text[:rng.randrange(len(text) - 2)].encode()  # truncated
    if kind == 3:
        depth = rng.choice([10**5, 10**4, 3000])
        inner = rng.choice(["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth])
        return (inner if rng.random() < 0.5 else text.replace('"threshold": ', '"threshold": ' + inner + ", \"t\": ", 1)).encode()
    if kind == 4:
        return rng.choice([b"[]", b"[1, 2]", b"3", b'"profile"', b"null", b"true", b"", b"   \n", b"{} x", b"NaN"])
    if kind == 5:  # a known binary format renamed .json
        return rng.choice([gzip.compress(text.encode()), pickle.dumps(base), text.encode("utf-16"),
                           b"\x89PNG\r\n\x1a\n" + bytes(64), b"PK\x03\x04" + bytes(30)])
    if kind == 6:  # a number token replaced by a non-finite or out-of-range one
        token = rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 5000, "-0", "1e-400"])
        numbers = [i for i, c in enumerate(text) if c.isdigit() and not text[i - 1].isdigit()
                   and text[i - 1] in " [-"]
        i = rng.choice(numbers)
        j = i
        while j < len(text) and (text[j].isdigit() or text[j] in ".eE+-"):
            j += 1
        return (text[:i] + token + text[j:]).encode()
    if kind == 7:
        return ("\ufeff" + text).encode()  # a BOM: accepted
    data = json.loads(text)
    paths = _PATHS + (_TEA_PATHS if base["policy"] == "teacache" else _MAG_PATHS)
    for _ in range(rng.randint(1, 2)):
        path = rng.choice(paths)
        if kind == 8:
            _set(data, path, None, delete=True)
        else:
            _set(data, path, rng.choice(_JSON_JUNK))
    return json.dumps(data).encode()


def fuzz_profiles(tmp_path, run_count: int):
    rng = random.Random(SEED + 1)
    profiles = _valid_profiles(tmp_path)
    runner = Runner()
    bases = {p: (json.loads(open(path).read()), open(path).read()) for p, path in profiles.items()}
    raised, accepted, failures = 0, [], []
    for i in range(N_PROFILES):
        policy = rng.choice(["teacache", "magcache"])
        base, text = bases[policy]
        path = tmp_path / f"corrupt-{i}.json"
        path.write_bytes(corrupt_profile(rng, base, text))
        options = {"policy": policy if rng.random() < 0.8 or policy == "magcache" else "customcache",
                   "profile": str(path), "inner": "eager"}
        try:
            parse_options(options)
        except OptionError as exc:
            raised += 1
            if str(path) not in str(exc):
                failures.append(f"{path.name}: the message does not name the file: {exc}")
            continue
        except Exception as exc:
            failures.append(f"{path.name}: {type(exc).__name__}: {str(exc)[:300]}")
            continue
        accepted.append(options)
    assert not failures, "\n".join(failures)
    for j, options in enumerate(accepted[:run_count]):
        runner.run(options, "backend" if j % 2 == 0 else "options")
    return raised, len(accepted)


# --- the tests ------------------------------------------------------------------------------------

def test_fuzz_options(tmp_path, capsys):
    start = time.perf_counter()
    raised, accepted, distinct, ran = fuzz_options(tmp_path, run_all=False)
    assert raised + accepted == N_DICTS
    assert raised >= 100 and distinct >= RUN_SAMPLE, (raised, distinct)  # the generator exercises both outcomes
    with capsys.disabled():
        print(f"\noptions fuzz: {N_DICTS} dicts, {raised} raised OptionError, {accepted} accepted "
              f"({distinct} distinct), {ran} compiled and run, {time.perf_counter() - start:.1f} s")


def test_fuzz_profiles(tmp_path, capsys):
    start = time.perf_counter()
    raised, accepted = fuzz_profiles(tmp_path, PROFILE_RUN_SAMPLE)
    assert raised >= N_PROFILES // 2, raised
    with capsys.disabled():
        print(f"\nprofile fuzz: {N_PROFILES} corrupt files, {raised} raised OptionError naming the file, "
              f"{accepted} accepted, {min(accepted, PROFILE_RUN_SAMPLE)} run, {time.perf_counter() - start:.1f} s")


@pytest.mark.slow
def test_fuzz_options_every_accepted_dict_runs(tmp_path):
    fuzz_options(tmp_path, run_all=True)


@pytest.mark.slow
def test_fuzz_profiles_every_accepted_profile_runs(tmp_path):
    fuzz_profiles(tmp_path, N_PROFILES)
