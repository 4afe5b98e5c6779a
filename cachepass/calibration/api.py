"""``cachepass.calibrate``: record, fit, choose the threshold, check once, return a :class:`Profile`.

Generic over the policies: a policy is calibratable when its class declares a
:class:`~cachepass.policies.base.Calibration` (``Policy.calibration``), which fits it to the recording
and returns the threshold search and the options to store; this module records, picks the threshold for
the target, writes and checks the profile.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .._logging import get_logger
from ..api import stats
from ..backend import CachepassBackend
from ..errors import OptionError
from ..policies.base import CalibrationFit, Policy
from ..policies.distance import relative_l1
from .profile import Profile, calibratable_policies
from .record import (
    INDICATOR_CANDIDATES,
    Recording,
    call_run,
    intercept,
    output_tensor,
    plain_module,
    record,
)

log = get_logger(__name__)


def calibratable(policy) -> type[Policy]:
    """The registered policy class named ``policy`` if it declares a calibration, else an
    :class:`OptionError` saying which policies do."""
    from ..policies import POLICIES

    policies = calibratable_policies()
    if isinstance(policy, str) and policy in policies:
        return policies[policy]
    names = ", ".join(map(repr, policies))
    if isinstance(policy, str) and policy in POLICIES:
        raise OptionError(f"calibrate: policy must be one of {names}; policy {policy!r} declares no calibration "
                          "(only policies with a Policy.calibration can be fitted to a model)")
    raise OptionError(f"calibrate: policy must be one of {names}; got {policy!r}")


def compute_budget(num_steps: int, target_speedup: float | None, target_steps: int | None) -> int:
    """Computed steps per branch allowed by a target: ``floor(num_steps / target_speedup)`` (so the
    speedup in computed steps is at least the target) or ``target_steps`` as given."""
    if target_steps is not None:
        return target_steps
    return max(1, math.floor(num_steps / target_speedup + 1e-9))


def _check_targets(target_speedup, target_steps, max_error) -> tuple:
    given = [n for n, v in (("target_speedup", target_speedup), ("target_steps", target_steps),
                            ("max_error", max_error)) if v is not None]
    if len(given) > 1:
        raise OptionError(f"give one target, not {' and '.join(given)}")
    if not given:
        target_speedup = 2.0
    if target_speedup is not None and not (isinstance(target_speedup, (int, float)) and target_speedup >= 1):
        raise OptionError(f"target_speedup must be a number >= 1, got {target_speedup!r}")
    if target_steps is not None and (isinstance(target_steps, bool) or not isinstance(target_steps, int)
                                     or target_steps < 1):
        raise OptionError(f"target_steps must be a positive integer, got {target_steps!r}")
    if max_error is not None and not (isinstance(max_error, (int, float)) and max_error > 0):
        raise OptionError(f"max_error must be a number > 0 (relative L1), got {max_error!r}")
    return target_speedup, target_steps, max_error


def _fit(policy: str, recording: Recording, indicator: str, degree: int, options: dict,
         budget: int | None = None) -> CalibrationFit:
    """The policy's own fit (``Policy.calibration.fit``) on ``recording``."""
    return calibratable(policy).calibration.fit(recording, indicator=indicator, degree=degree, options=options,
                                                budget=budget)


def _search(policy: str, recording: Recording, indicator: str, degree: int, options: dict):
    """The policy family to search over, its fixed options and the fit report (no compute budget)."""
    fit = _fit(policy, recording, indicator, degree, options)
    return fit.search, fit.fixed, fit.report


def _check(run, model, profile: Profile, recording: Recording, inner) -> dict:
    """One real generation with the calibrated policy: computed steps per branch, and the output's relative
    L1 against the first recorded (fully computed) generation when ``run`` returns a tensor."""
    backend = CachepassBackend(policy=profile.policy, profile=profile, inner=inner, num_steps=profile.num_steps)
    with intercept(model, backend):
        out = output_tensor(call_run(run, 0))
        branches = stats(model).branches
    measured: dict = {"computed_steps": [len(s.computed_steps) for s in branches]}
    reference = recording.outputs[0] if recording.outputs else None
    if out is not None and reference is not None and out.shape == reference.shape:
        measured["output_rel_l1"] = round(relative_l1(out, reference), 6)
    return measured


def calibrate(
    run: Callable,
    model: torch.nn.Module,
    *,
    policy: str = "teacache",
    target_speedup: float | None = None,
    target_steps: int | None = None,
    max_error: float | None = None,
    indicator: str = "timestep_embedding",
    degree: int = 4,
    generations: int = 1,
    window: int = 8,
    check: bool = True,
    inner="eager",
    recording: Recording | None = None,
    **options,
) -> Profile:
    """Fit ``policy`` (one that declares a calibration: ``"teacache"`` or ``"magcache"``) to ``model`` and pick
    its threshold for a target.

    ``run`` does one whole generation with ``model`` (``lambda: pipe(...)``; a callable taking one argument
    gets the generation index). It is run ``generations`` times with every step computed (seed it: the
    check compares against the first), the fit and the threshold come from replaying those trajectories,
    and with ``check`` one more cached generation measures what the prediction said. Give one target:
    ``target_speedup`` (computed steps per branch at most ``floor(steps / target_speedup)``; 2.0 when no
    target is given), ``target_steps`` (that many computed steps per branch) or ``max_error`` (predicted
    mean relative L1 error of the block-stack output per call). ``recording`` reuses an earlier
    :func:`record` instead of recording again. ``options``: the policy's own (its ``Calibration.options``):
    ``max_skip_steps``, ``retention_ratio`` for magcache (``max_skip_steps`` left unset is raised from 4 until
    the compute target is reachable). Returns a :class:`Profile`; ``profile.save(path)`` and
    ``options={"profile": path}``. A policy that declares no calibration is an :class:`OptionError`.
    """
    calibration = calibratable(policy).calibration
    unknown = sorted(set(options) - set(calibration.options))
    if unknown:
        raise OptionError(f"calibrate: unknown option(s) {', '.join(map(repr, unknown))} for policy {policy!r}")
    if indicator not in INDICATOR_CANDIDATES:
        raise OptionError(f"calibrate: indicator must be one of {', '.join(map(repr, INDICATOR_CANDIDATES))}; "
                          f"got {indicator!r}")
    target_speedup, target_steps, max_error = _check_targets(target_speedup, target_steps, max_error)
    model = plain_module(model)
    if recording is None:
        recording = record(run, model, generations=generations, window=window, inner=inner)
    n = recording.num_steps
    budget = None if max_error is not None else compute_budget(n, target_speedup, target_steps)
    fit = _fit(policy, recording, indicator, degree, options, budget)
    search, fixed, fit_report = fit.search, fit.fixed, fit.report
    if budget is None:
        chosen, target = search.for_error(max_error), {"max_error": max_error}
    else:
        chosen = search.for_steps(budget)
        target = {"computed_steps": budget, **({"speedup": target_speedup} if target_speedup else {})}
    report = {
        "fit": fit_report,
        "target": target,
        "predicted": {"computed_steps": chosen.computed_per_branch(), "stack_error": round(chosen.error, 6)},
        "recording": {"generations": len({t.generation for t in recording.trajectories}),
                      "branches": recording.num_branches, "window": recording.window},
    }
    profile = Profile(policy, {"threshold": chosen.threshold, **fixed}, n, recording.model, report)
    profile = Profile.from_dict(profile.to_dict(), "<calibrated>")  # what a saved profile would load as
    if check:
        report["measured"] = _check(run, model, profile, recording, inner)
        profile.report = report
    log.info("calibration: %s threshold %.6g; predicted %s, measured %s", policy, chosen.threshold,
             report["predicted"], report.get("measured"))
    return profile
