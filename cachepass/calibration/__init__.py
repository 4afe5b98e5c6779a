"""Calibration: fit a policy to the user's own model and choose its threshold for a target.

``cachepass.calibrate(run, model, target_speedup=...)`` records full generations, fits TeaCache's rescale
polynomial (or MagCache's magnitude ratios), replays the decision rule to pick the threshold, checks
once with a real cached generation and returns a :class:`Profile` (JSON) that the ``profile`` option of
``teacache`` / ``magcache`` reads. Generic over the policies: what is fitted and what a profile holds is
each calibratable policy's ``Policy.calibration`` (:class:`~cachepass.policies.base.Calibration`). See
docs/calibration.md.
"""

from .api import calibratable, calibrate, compute_budget
from .fit import PolyFit, fit_polynomial, fit_teacache, magnitude_ratios
from .profile import (
    ModelFingerprint,
    Profile,
    ProfileFields,
    calibratable_policies,
    load_profile,
)
from .record import Recording, Trajectory, record
from .threshold import Replay, ThresholdSearch

__all__ = [
    "ModelFingerprint", "PolyFit", "Profile", "ProfileFields", "Recording", "Replay", "ThresholdSearch", "Trajectory",
    "calibratable", "calibratable_policies", "calibrate", "compute_budget", "fit_polynomial", "fit_teacache",
    "load_profile", "magnitude_ratios", "record",
]
