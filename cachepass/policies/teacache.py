"""``teacache``: skip while the accumulated, rescaled change of a cheap indicator stays small.

TeaCache (arXiv 2411.19108), as the reference implements it for Wan2.1. Per call and branch:
``d = mean|m_t - m_prev| / mean|m_prev|`` on the indicator ``m``; ``acc += poly(d)`` with a 4th-order
polynomial (``numpy.poly1d`` order: ``c0*d^4 + ... + c4``) fitted per model, mapping indicator change to
output change; reuse the cached residual while ``acc < threshold``, else compute and set ``acc = 0``.
``m_prev`` follows every call, computed or not. Forced steps (``acc`` reset there too):
``ret_steps=True`` the first 5 steps; ``ret_steps=False`` step 0 and the last step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np

from .._logging import get_logger, warn_once
from ..errors import OptionError
from .base import (
    MAX_COEFFICIENTS,
    Calibration,
    CalibrationFit,
    CallContext,
    Invalid,
    Policy,
    PolicyConfig,
    Requirements,
    check_bool,
    check_choice,
    check_float,
    is_forced_step,
    number_list,
    show,
)
from .distance import relative_l1

log = get_logger(__name__)

#: Wan2.1 coefficients from the reference (``-ret``: fitted with ``use_ret_steps=True``).
COEFFICIENT_PRESETS: dict[str, tuple[float, ...]] = {
    "wan2.1-t2v-1.3b-ret": (-5.21862437e4, 9.23041404e3, -5.28275948e2, 1.36987616e1, -4.99875664e-2),
    "wan2.1-t2v-1.3b": (2.39676752e3, -1.31110545e3, 2.01331979e2, -8.29855975, 1.37887774e-1),
    "wan2.1-t2v-14b-ret": (-3.03318725e5, 4.90537029e4, -2.65530556e3, 5.87365115e1, -3.15583525e-1),
    "wan2.1-t2v-14b": (-5784.54975374, 5449.50911966, -1811.16591783, 256.27178429, -13.02252404),
    "wan2.1-i2v-480p-ret": (2.57151496e5, -3.54229917e4, 1.40286849e3, -1.35890334e1, 1.32517977e-1),
    "wan2.1-i2v-480p": (-3.02331670e2, 2.23948934e2, -5.25463970e1, 5.87348440, -2.01973289e-1),
    "wan2.1-i2v-720p-ret": (8.10705460e3, 2.13393892e3, -3.72934672e2, 1.66203073e1, -4.17769401e-2),
    "wan2.1-i2v-720p": (-114.36346466, 65.26524496, -18.82220707, 4.91518089, -0.23412683),
    "identity": (0.0, 0.0, 0.0, 1.0, 0.0),  # no rescaling: acc sums the raw relative change
}

INDICATOR_CHOICES = ("timestep_embedding", "modulated_input")
RET_WARMUP = 5  # steps forced with ret_steps=True


#: What ``threshold``, ``indicator`` and ``ret_steps`` mean when neither the user nor a profile sets them.
UNSET_DEFAULTS = {"threshold": 0.2, "indicator": "timestep_embedding", "ret_steps": False}


@dataclass(frozen=True)
class TeaCacheConfig(PolicyConfig):
    threshold: float | None = None  # None: the profile's, else 0.2
    indicator: str | None = None  # None: the profile's, else "timestep_embedding"
    coefficients: Any = None  # preset name or floats; None: the profile's, else "wan2.1-t2v-1.3b" (+"-ret")
    ret_steps: bool | None = None  # None: the profile's, else False
    profile: Any = None  # calibration profile (path or cachepass.calibration.Profile) from cachepass.calibrate

    def validate(self) -> None:
        self.resolved()

    def resolved(self) -> "TeaCacheConfig":
        """The options in effect: those given win, a profile fills the rest, defaults fill what is left.

        The profile's coefficients were fitted on its indicator, so asking for another indicator with it
        is an error rather than a silent mismatch."""
        from ..calibration.profile import fill_options

        if self.indicator is not None:  # checked before the profile's is compared with it
            check_choice("indicator", self.indicator, INDICATOR_CHOICES)
        # only options whose class default is None are filled: a subclass's own default (customcache's
        # threshold 0.26) stays, and None given for it is still an error
        fillable = {f.name for f in fields(self) if f.default is None}
        defaults = {k: v for k, v in {**UNSET_DEFAULTS, "coefficients": None}.items() if k in fillable}
        config, profile = fill_options(self, "teacache", defaults)
        if profile is not None and self.indicator is not None and self.indicator != profile.options["indicator"]:
            raise OptionError(
                f"option 'indicator' is {self.indicator!r} but the profile {profile.source} was fitted on "
                f"{profile.options['indicator']!r}; leave 'indicator' unset or calibrate with "
                f"indicator={self.indicator!r}"
            )
        threshold = check_float("threshold", config.threshold, minimum=0.0)
        check_choice("indicator", config.indicator, INDICATOR_CHOICES)
        ret_steps = check_bool("ret_steps", config.ret_steps)
        resolve_coefficients(config.coefficients, ret_steps)
        return replace(config, threshold=threshold, ret_steps=ret_steps)


def resolve_coefficients(value: Any, ret_steps: bool, warn: bool = False) -> tuple[float, ...]:
    """The polynomial coefficients for the option ``coefficients`` (``None``: the T2V 1.3B set that
    matches ``ret_steps``), highest power first. A preset fitted for the other ``ret_steps`` setting only
    warns (once per preset and setting). Presets have 5 (degree 4); a calibrated polynomial may have
    another degree, up to ``MAX_COEFFICIENTS - 1``. A list (or tuple, or 1-d numpy array) of finite numbers:
    a dict, a set, a string other than a preset name or a scalar is an error."""
    if value is None:
        value = "wan2.1-t2v-1.3b-ret" if ret_steps else "wan2.1-t2v-1.3b"
    if isinstance(value, str):
        if value not in COEFFICIENT_PRESETS:
            raise OptionError(
                f"option 'coefficients' must be a list of 5 numbers or one of "
                f"{', '.join(map(repr, COEFFICIENT_PRESETS))}; got {show(value)}"
            )
        if warn and value != "identity" and value.endswith("-ret") != ret_steps:
            warn_once(log, ("teacache-preset", value, bool(ret_steps)),
                      "teacache: coefficients %r were fitted with use_ret_steps=%s but ret_steps=%s",
                      value, not ret_steps, ret_steps)
        return COEFFICIENT_PRESETS[value]
    try:
        return tuple(number_list(value, max_length=MAX_COEFFICIENTS))
    except Invalid as exc:
        raise OptionError(
            f"option 'coefficients' must be one of {', '.join(map(repr, COEFFICIENT_PRESETS))} or a list of 1 to "
            f"{MAX_COEFFICIENTS} finite numbers (numpy.poly1d order, highest power first; 5 for TeaCache's degree "
            f"4); {exc.problem}"
        ) from None


@dataclass
class TeaCacheState:
    accumulated: float = 0.0
    previous: Any = None  # the indicator of the previous call (computed or not)
    distances: list[float] = field(default_factory=list)  # rescaled change per call, for inspection


class TeaCacheCalibration(Calibration):
    """``cachepass.calibrate(policy="teacache")``: the rescale polynomial fitted on the chosen indicator
    (``r2_by_indicator`` reports every recorded one), ``ret_steps=False``; a profile stores ``indicator``,
    ``coefficients`` and ``ret_steps`` besides the threshold (docs/calibration.md)."""

    def fit(self, recording, *, indicator, degree, options, budget) -> CalibrationFit:
        from ..calibration.fit import fit_teacache

        fit = fit_teacache(recording, indicator, degree)
        others = {i: round(fit_teacache(recording, i, degree).r2, 6) for i in recording.indicators}
        fixed = {"indicator": indicator, "coefficients": list(fit.coefficients), "ret_steps": False}
        return CalibrationFit(self.search(recording, fixed, indicator), fixed,
                              {**fit.to_dict(), "r2_by_indicator": others})

    def profile_options(self, fields) -> dict:
        return {"indicator": fields.choice("indicator", INDICATOR_CHOICES),
                "coefficients": fields.numbers("coefficients", max_length=MAX_COEFFICIENTS),
                "ret_steps": fields.boolean("ret_steps")}


class TeaCachePolicy(Policy):
    name = "teacache"
    config_class = TeaCacheConfig
    calibration = TeaCacheCalibration()
    examples = {
        "tiny": {},  # the defaults: Wan2.1 T2V 1.3B coefficients, threshold 0.2
        "tiny:modulated": {"indicator": "modulated_input", "coefficients": "identity", "threshold": 0.3},
        # on the modulated input, which each sequence-parallel rank sees only its shard of
        "sequence_parallel": {"indicator": "modulated_input", "coefficients": "identity", "threshold": 0.1},
    }

    def __init__(self, config: TeaCacheConfig) -> None:
        config = config.resolved()
        super().__init__(config)
        self.poly = np.poly1d(resolve_coefficients(config.coefficients, config.ret_steps, warn=True))

    def check_model(self, model) -> None:
        if self.config.profile is not None:
            self.config.profile.check_model(model)

    def requirements(self) -> Requirements:
        return Requirements(indicator=self.config.indicator)

    def new_state(self) -> TeaCacheState:
        return TeaCacheState()

    def forced(self, ctx: CallContext) -> bool:
        if self.config.ret_steps:
            return is_forced_step(ctx, RET_WARMUP)
        return is_forced_step(ctx, 1, 1)

    def decide(self, state: TeaCacheState, ctx: CallContext, indicator) -> bool:
        if ctx.step == 0 and self.config.profile is not None:
            self.config.profile.check_steps(ctx.num_steps)
        previous, state.previous = state.previous, indicator.detach().clone()
        if self.forced(ctx) or previous is None:
            state.accumulated = 0.0
            return True
        change = float(self.poly(relative_l1(indicator, previous, ctx.sync)))
        state.distances.append(change)
        state.accumulated += change
        if math.isfinite(change) and state.accumulated < self.config.threshold:
            return False
        state.accumulated = 0.0
        return True

    def device_rule(self):
        """``decisions="device"``: the same rule on the device (``cachepass/transform/device_variant.py``):
        ``acc += poly(relative L1 against the previous call's indicator)``, reuse while finite and below the
        threshold; the forced steps of :meth:`forced`."""
        from ..transform.device_variant import DeviceRule

        c = self.config
        first, last = (RET_WARMUP, 0) if c.ret_steps else (1, 1)
        return DeviceRule(threshold=c.threshold, reference="previous", accumulate=True,
                          coefficients=tuple(float(x) for x in self.poly.coeffs), first=first, last=last,
                          check_steps=c.profile.check_steps if c.profile is not None else None)
