"""``cachepass calibrate``: calibration on the embedded digits model, as an example to copy.

Calibrates ``teacache`` (or ``magcache``) on the digits Wan through the real ``WanPipeline`` (CFG, two
branches), saves the profile and prints it with predicted against measured computed steps and error.
``compare=True`` also runs the uncalibrated ``teacache`` default and the calibrated profile at the same
computed steps and prints their PSNR against the full generation (the numbers in docs/calibration.md).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..api import stats
from ..metrics import psnr, relative_l1
from .api import calibrate
from .record import record


def _cached(pipe, model, run, options) -> tuple[list[int], torch.Tensor]:
    torch._dynamo.reset()
    pipe.transformer = torch.compile(model, backend="cachepass", options=options)
    try:
        with torch.no_grad():
            out = run(0)
        return [len(s.computed_steps) for s in stats(pipe.transformer).branches], out
    finally:
        pipe.transformer = model


def calibrate_digits(policy: str = "teacache", steps: int = 50, digits: tuple[int, ...] = (0, 3, 5, 8),
                     out: str | Path = "cachepass-out/digits-profile.json", compare: bool = False,
                     inner: str = "eager", log=print, **calibrate_options):
    """Calibrate on the digits model (generation ``i`` uses seed ``i``); returns the profile."""
    from ..demo import generate, load_digits_model, make_pipeline

    model = load_digits_model()
    pipe = make_pipeline(model)

    def run(generation: int):
        return generate(pipe, list(digits), num_inference_steps=steps, seed=generation)

    recording = record(run, model, generations=calibrate_options.pop("generations", 1), inner=inner)
    profile = calibrate(run, model, policy=policy, recording=recording, inner=inner, **calibrate_options)
    path = profile.save(out)
    log(profile.summary())
    log(f"wrote {path}; use it with torch.compile(model, backend='cachepass', "
        f"options={{'policy': {policy!r}, 'profile': {str(path)!r}}})")
    if compare:
        full = recording.outputs[0]
        base = {"inner": inner, "num_steps": steps}
        default_steps, default_out = _cached(pipe, model, run, {**base, "policy": "teacache"})
        same = calibrate(run, model, policy="teacache", target_steps=default_steps[0], recording=recording,
                         check=False)
        cal_steps, cal_out = _cached(pipe, model, run, {**base, "policy": "teacache", "profile": same})
        log(f"{'teacache':<28} {'computed/branch':>16} {'PSNR dB':>8} {'rel L1':>8}")
        for name, got, o in (("default (Wan2.1 preset, 0.2)", default_steps, default_out),
                             (f"calibrated (threshold {same.options['threshold']:.4f})", cal_steps, cal_out)):
            log(f"{name:<28} {'/'.join(map(str, got)):>16} {psnr(o, full):>8.2f} {relative_l1(o, full):>8.4f}")
    return profile
