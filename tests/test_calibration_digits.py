"""Calibration on the embedded trained model: 50 steps with CFG through the real WanPipeline, inner eager.

Stated claims: a calibrated TeaCache beats the uncalibrated default (Wan2.1 T2V 1.3B preset
coefficients, threshold 0.2) in PSNR at the same computed steps; a compute target is hit within one
computed step per branch in a real cached generation (here exactly, as the replay predicts).
"""

import pytest
import torch

import cachepass
from cachepass.calibration import record
from cachepass.demo import generate, load_digits_model, make_pipeline
from cachepass.metrics import psnr

DIGITS = [0, 3, 5, 8]


@pytest.fixture(scope="module")
def digits():
    model = load_digits_model()
    pipe = make_pipeline(model)

    def run():
        return generate(pipe, DIGITS, num_inference_steps=50, seed=0)

    torch._dynamo.reset()
    return model, pipe, run, record(run, model)  # one full generation: the trajectories and the reference


def cached(digits, options):
    model, pipe, run, _ = digits
    pipe.transformer = torch.compile(model, backend="cachepass", options={"inner": "eager", "num_steps": 50, **options})
    try:
        with torch.no_grad():
            out = run()
        return [len(s.computed_steps) for s in cachepass.stats(pipe.transformer).branches], out
    finally:
        pipe.transformer = model


def test_calibrated_teacache_beats_the_preset_at_the_same_computed_steps(digits):
    _, _, run, rec = digits
    full = rec.outputs[0]
    default_steps, default_out = cached(digits, {"policy": "teacache"})
    profile = cachepass.calibrate(run, digits[0], target_steps=default_steps[0], recording=rec, check=False)
    assert profile.report["fit"]["r2"] > 0.9 and profile.report["predicted"]["computed_steps"] == default_steps
    steps, out = cached(digits, {"policy": "teacache", "profile": profile})
    assert steps == default_steps
    assert psnr(out, full) > psnr(default_out, full) + 1.0, (psnr(out, full), psnr(default_out, full))


@pytest.mark.parametrize("policy", ["teacache", "magcache"])
def test_compute_target_is_hit_in_a_real_generation(digits, policy, tmp_path):
    model, _, run, rec = digits
    profile = cachepass.calibrate(run, model, policy=policy, target_speedup=3.0, recording=rec)
    report = profile.report
    assert report["target"]["computed_steps"] == 16 and report["predicted"]["computed_steps"] == [16, 16]
    assert all(abs(m - 16) <= 1 for m in report["measured"]["computed_steps"]), report
    assert report["measured"]["output_rel_l1"] < 0.1
    saved = cachepass.calibration.load_profile(profile.save(tmp_path / "p.json"))
    assert saved.options == profile.options and saved.check_model(model)
    if policy == "magcache":  # K = 4 cannot reach 16 computed steps after 10 retained ones: raised
        assert saved.options["max_skip_steps"] > 4


def test_cli_calibrates_the_embedded_model(tmp_path, capsys):
    from cachepass.cli import main

    out = tmp_path / "digits.json"
    assert main(["calibrate", "--steps", "8", "--digits", "2", "--target-steps", "5", "--out", str(out)]) == 0
    profile = cachepass.calibration.load_profile(out)
    assert profile.num_steps == 8 and profile.report["measured"]["computed_steps"] == [5, 5]
    assert "wrote" in capsys.readouterr().out
