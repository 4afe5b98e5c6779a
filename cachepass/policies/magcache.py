"""``magcache``: skip while the error predicted from calibrated residual magnitude ratios stays small.

MagCache (Ma et al., arXiv 2506.09045; github.com/Zehong-Ma/MagCache). Calibration measures, per step
``t`` and branch (cond, uncond), the magnitude ratio of successive block-stack residuals
``gamma_t = mean_tokens(|R_t| / |R_{t-1}|)`` (norms over the channel axis). Those ratios are nearly the
same for every prompt of a model, so the decision needs no run-time statistic at all: reusing the
residual of step ``t0`` at step ``t`` is estimated to be off by ``|1 - prod_{t0<s<=t} gamma_s|``. Per
call and branch, after the retention steps:

```
acc_ratio *= gamma_t;  acc_steps += 1;  acc_err += |1 - acc_ratio|
reuse while acc_err <= threshold and acc_steps <= max_skip_steps; otherwise compute and reset all three
```

The first ``int(retention_ratio * N + 0.5)`` steps are always computed. Since the schedule depends only on
the step index, every branch (and every process of a sequence-parallel run) decides the same way from
the same ratios without exchanging anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .._deprecation import renamed_module_attributes
from .._logging import get_logger, warn_once
from ..errors import OptionError
from .base import (
    MAX_BRANCHES,
    MAX_STEPS,
    Calibration,
    CalibrationFit,
    CallContext,
    Invalid,
    Policy,
    PolicyConfig,
    Requirements,
    check_float,
    check_int,
    is_sequence,
    number_list,
    show,
)

log = get_logger(__name__)


#: What the options mean when neither the user nor a profile sets them: MagCache's Wan2.1 T2V 1.3B
#: setting (E012K4R02: threshold 0.12, K 4, retention ratio 0.2).
UNSET_DEFAULTS = {"threshold": 0.12, "max_skip_steps": 4, "retention_ratio": 0.2, "mag_ratios": None}


@dataclass(frozen=True)
class MagCacheConfig(PolicyConfig):
    threshold: float | None = None  # None: the profile's, else 0.12
    max_skip_steps: int | None = None  # K, consecutive reuses at most; None: the profile's, else 4
    retention_ratio: float | None = None  # first steps always computed; None: the profile's, else 0.2
    mag_ratios: Any = None  # per step (all branches) or per branch, per step; None: the profile's
    profile: Any = None  # a calibration profile (path or cachepass.calibration.Profile) with the ratios

    def validate(self) -> None:
        self.resolved()

    def resolved(self) -> "MagCacheConfig":
        """The options in effect: those given win, a profile fills the rest, defaults fill what is left."""
        from ..calibration.profile import fill_options

        config, _ = fill_options(self, "magcache", UNSET_DEFAULTS)
        threshold = check_float("threshold", config.threshold, minimum=0.0)
        max_skip = check_int("max_skip_steps", config.max_skip_steps, minimum=0, maximum=MAX_STEPS)
        retention = check_float("retention_ratio", config.retention_ratio, minimum=0.0, maximum=1.0)
        if config.mag_ratios is None:
            raise OptionError(
                "policy 'magcache' needs the model's magnitude ratios: set option 'profile' (a profile from "
                "cachepass.calibrate(..., policy='magcache') or `cachepass calibrate`) or option 'mag_ratios'"
            )
        return replace(config, threshold=threshold, max_skip_steps=max_skip, retention_ratio=retention,
                       mag_ratios=ratios_per_branch(config.mag_ratios))


def ratios_per_branch(value: Any) -> list[list[float]]:
    """The option ``mag_ratios`` as one list of per-step ratios per branch (a flat list: all branches).

    A list (or tuple, or numpy array) of 1 to ``MAX_STEPS`` finite positive numbers, or a list of 1 to
    ``MAX_BRANCHES`` such lists of one length; a dict, a string or a scalar is an error."""
    want = (f"a list of 1 to {MAX_STEPS} finite positive numbers (one per step) or a list of 1 to {MAX_BRANCHES} "
            "such lists of the same length (one per branch)")
    if isinstance(value, np.ndarray) and value.ndim == 2:
        value = value.tolist()
    if not is_sequence(value) or len(value) == 0:
        raise OptionError(f"option 'mag_ratios' must be {want}; got {show(value)}")
    nested = [is_sequence(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    try:
        if all(nested):
            if len(value) > MAX_BRANCHES:
                raise Invalid(f"got {len(value)} branches")
            rows = []
            for i, row in enumerate(value):
                try:
                    rows.append(number_list(row, max_length=MAX_STEPS, positive=True))
                except Invalid as exc:
                    raise Invalid(f"branch {i}: {exc.problem}") from None
            if len({len(r) for r in rows}) > 1:
                raise Invalid(f"got branches of {', '.join(str(len(r)) for r in rows)} ratios")
            return rows
        if any(nested):
            raise Invalid(f"got a mix of lists and numbers: {show(value)}")
        try:
            return [number_list(value, max_length=MAX_STEPS, positive=True)]
        except Invalid as exc:
            raise Invalid(exc.problem) from None
    except Invalid as exc:
        raise OptionError(f"option 'mag_ratios' must be {want}; {exc.detail}") from None


def nearest_resample(ratios: list[float], length: int) -> list[float]:
    """Ratios calibrated for ``len(ratios)`` steps stretched to ``length`` steps by nearest index, as the
    original implementation does when the step count changes (an approximation: recalibrate instead)."""
    if length == len(ratios):
        return list(ratios)
    if length == 1:
        return [ratios[-1]]
    scale = (len(ratios) - 1) / (length - 1)
    return [ratios[int(round(i * scale))] for i in range(length)]


@dataclass
class MagCacheState:
    ratio: float = 1.0
    steps: int = 0
    error: float = 0.0

    def reset(self) -> None:
        self.ratio, self.steps, self.error = 1.0, 0, 0.0


class MagCacheCalibration(Calibration):
    """``cachepass.calibrate(policy="magcache", max_skip_steps=..., retention_ratio=...)``: the magnitude
    ratios per branch, averaged over the recorded generations; ``max_skip_steps`` left unset is raised
    from 4 until the compute target is reachable. A profile stores ``mag_ratios`` (one list per branch,
    ``num_steps`` long) and optionally ``max_skip_steps`` and ``retention_ratio`` besides the threshold."""

    options = ("max_skip_steps", "retention_ratio")

    def fit(self, recording, *, indicator, degree, options, budget) -> CalibrationFit:
        from ..calibration.fit import magnitude_ratios

        ratios = magnitude_ratios(recording)
        # how far single generations stray from the mean ratios (MagCache's premise: prompt-independent ratios)
        spread = [max(abs(a - b) for a, b in zip(t.magnitude_ratio, ratios[t.branch_index]))
                  for t in recording.trajectories]
        report = {"max_ratio_deviation": round(max(spread), 6)}

        def attempt(options):
            fixed = {key: options.get(key, UNSET_DEFAULTS[key]) for key in self.options}
            fixed["mag_ratios"] = ratios
            return self.search(recording, fixed, None), fixed

        search, fixed = attempt(options)
        if budget is not None and "max_skip_steps" not in options:
            while search.count(math.inf) > budget and fixed["max_skip_steps"] < recording.num_steps:
                options = {**options, "max_skip_steps": fixed["max_skip_steps"] + 1}  # K caps the skipping
                search, fixed = attempt(options)
        return CalibrationFit(search, fixed, report)

    def profile_options(self, fields) -> dict:
        out = {}
        if fields.has("max_skip_steps"):  # optional: the replay's values, used unless the user sets them
            out["max_skip_steps"] = fields.integer("max_skip_steps", minimum=0, maximum=MAX_STEPS)
        if fields.has("retention_ratio"):
            out["retention_ratio"] = fields.number("retention_ratio", minimum=0.0, maximum=1.0)
        ratios = fields.need("mag_ratios")
        if isinstance(ratios, np.ndarray) and ratios.ndim == 2:
            ratios = ratios.tolist()
        if not isinstance(ratios, (list, tuple)) or not 1 <= len(ratios) <= MAX_BRANCHES:
            raise fields.fail(f"field 'options.mag_ratios' must be a list of 1 to {MAX_BRANCHES} per-branch lists, "
                              f"got {show(ratios)}")
        out["mag_ratios"] = [fields.numbers(f"mag_ratios[{i}]", value=r, positive=True) for i, r in enumerate(ratios)]
        bad = [len(r) for r in out["mag_ratios"] if len(r) != fields.num_steps]
        if bad:
            raise fields.fail(f"field 'options.mag_ratios' has {bad[0]} ratios per branch for "
                              f"num_steps={fields.num_steps}")
        return out


class MagCachePolicy(Policy):
    name = "magcache"
    config_class = MagCacheConfig
    calibration = MagCacheCalibration()
    examples = {
        "tiny": {"mag_ratios": [1.0] + [0.97] * 19},  # 20 steps; no default ratios
        "sequence_parallel": {"mag_ratios": [1.0] + [0.97] * 13, "max_skip_steps": 3, "retention_ratio": 0.1},
    }

    def __init__(self, config: MagCacheConfig) -> None:
        super().__init__(config.resolved())
        self.calibrated_steps = len(self.config.mag_ratios[0])
        self._resampled: dict[tuple[int, int], list[float]] = {}
        # what the warnings below are about: these ratios (one warning per ratio table and step count, not
        # per branch, compiled graph or policy instance)
        self._ratios_key = hash(tuple(map(tuple, self.config.mag_ratios)))

    def requirements(self) -> Requirements:
        return Requirements(indicator=None)

    def new_state(self) -> MagCacheState:
        return MagCacheState()

    def check_model(self, model) -> None:
        if self.config.profile is not None:
            self.config.profile.check_model(model)

    def ratios(self, branch_index: int, num_steps: int) -> list[float]:
        """This branch's ratios for ``num_steps`` steps (the last calibrated branch's for extra branches)."""
        key = (branch_index, num_steps)
        if key not in self._resampled:
            table = self.config.mag_ratios
            if branch_index >= len(table) and len(table) > 1:
                warn_once(log, ("magcache-branches", self._ratios_key, len(table), branch_index),
                          "magcache: branch %d has no calibrated ratios (%d branches calibrated); using branch %d's",
                          branch_index, len(table), len(table) - 1)
            if num_steps != self.calibrated_steps:
                warn_once(log, ("magcache-resample", self._ratios_key, num_steps),
                          "magcache: the ratios were calibrated for %d steps but this generation has %d; they are "
                          "resampled by nearest step, which only approximates the model. Calibrate again for %d "
                          "steps (cachepass.calibrate).", self.calibrated_steps, num_steps, num_steps)
            self._resampled[key] = nearest_resample(table[min(branch_index, len(table) - 1)], num_steps)
        return self._resampled[key]

    def decide(self, state: MagCacheState, ctx: CallContext, indicator) -> bool:
        n = ctx.num_steps or self.calibrated_steps
        if ctx.step == 0 or ctx.step < int(self.config.retention_ratio * n + 0.5):
            state.reset()
            return True
        ratios = self.ratios(ctx.branch_index, n)
        state.ratio *= ratios[ctx.step] if ctx.step < len(ratios) else 1.0
        state.steps += 1
        state.error += abs(1.0 - state.ratio)
        if state.error <= self.config.threshold and state.steps <= self.config.max_skip_steps:
            return False
        state.reset()
        return True


#: ``ratios_per_stream`` (deprecated): :func:`ratios_per_branch`
__getattr__ = renamed_module_attributes(__name__, {"ratios_per_stream": "ratios_per_branch"})
