"""``cachepass demo``: the embedded digits model through diffusers' WanPipeline, full and cached.

Runs one full generation and one per policy (same seeds, CFG on), then prints a table of computed
steps, wall time, speedup and fidelity (PSNR, relative L1 against the full run), and writes a
side-by-side animation and a chart of the computed steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import stats as cache_stats
from ..metrics import psnr, relative_l1
from ..policies import POLICIES
from .model import generate, load_digits_model, make_pipeline, to_frames
from .render import computed_steps_chart, side_by_side_gif

#: Options each policy runs with in the demo: its documented defaults unless a policy needs a value.
DEMO_OPTIONS: dict[str, dict] = {"interval": {"interval": 3}}


@dataclass
class DemoRow:
    policy: str
    computed: list[int]  # computed steps per branch
    seconds: float
    speedup: float
    psnr: float
    rel_l1: float
    schedule: list[list[int]]


def _timed(pipe, digits, steps, seed, repeats):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate(pipe, digits, num_inference_steps=steps, seed=seed)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], out


def run_demo(
    steps: int = 50,
    digits: tuple[int, ...] = (0, 3, 5, 8),
    policies: list[str] | None = None,
    inner: str = "eager",
    seed: int = 0,
    repeats: int = 1,
    out_dir: str | Path | None = "cachepass-out",
    log=print,
) -> list[DemoRow]:
    """Run the demo; returns the table rows (the full run first). ``out_dir=None`` writes nothing."""
    policies = [p for p in (policies or POLICIES) if p != "none"]
    model = load_digits_model()
    pipe = make_pipeline(model)
    digits = list(digits)
    total = len(policies) + 1
    log(f"[1/{total}] full computation ({steps} steps, CFG, {len(digits)} videos, inner={inner})")
    if inner != "eager":
        pipe.transformer = torch.compile(model, backend=inner)
    with torch.no_grad():
        generate(pipe, digits, num_inference_steps=steps, seed=seed)  # warm-up / compile
        full_s, reference = _timed(pipe, digits, steps, seed, repeats)
    rows = [DemoRow("full", [steps, steps], full_s, 1.0, float("inf"), 0.0, [list(range(steps))] * 2)]
    videos = {"full": to_frames(reference)}
    for i, name in enumerate(policies, start=2):
        log(f"[{i}/{total}] policy {name}")
        torch._dynamo.reset()
        options = {"policy": name, "inner": inner, **DEMO_OPTIONS.get(name, {})}
        if name == "magcache":  # its ratios are per model: measured from one full generation, defaults otherwise
            from ..calibration import magnitude_ratios, record

            pipe.transformer = model
            run = lambda: generate(pipe, digits, num_inference_steps=steps, seed=seed)  # noqa: E731
            options["mag_ratios"] = magnitude_ratios(record(run, model, inner=inner))
        pipe.transformer = torch.compile(model, backend="cachepass", options=options)
        with torch.no_grad():
            generate(pipe, digits, num_inference_steps=steps, seed=seed)  # warm-up: compiles
            seconds, out = _timed(pipe, digits, steps, seed, repeats)
        branches = cache_stats(pipe.transformer).branches
        schedule = [s.computed_steps for s in branches]
        rows.append(DemoRow(name, [len(s) for s in schedule], seconds, full_s / seconds,
                            psnr(out, reference), relative_l1(out, reference), schedule))
        videos[name] = to_frames(out)
    pipe.transformer = model
    log(format_table(rows))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        gif = side_by_side_gif(videos, out / "demo.gif")
        chart = computed_steps_chart({r.policy: r.schedule for r in rows[1:]}, steps, out / "steps.png")
        log(f"wrote {gif} (full vs each policy, one row per digit) and {chart} (computed steps)")
    return rows


def format_table(rows: list[DemoRow]) -> str:
    header = f"{'policy':<12} {'computed/branch':>16} {'seconds':>8} {'speedup':>8} {'PSNR dB':>8} {'rel L1':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.policy:<12} {'/'.join(map(str, r.computed)):>16} {r.seconds:>8.2f} "
                     f"{r.speedup:>7.2f}x {r.psnr:>8.2f} {r.rel_l1:>8.4f}")
    return "\n".join(lines)
