"""``cachepass demo``: the embedded digits models (Wan video in ``WanPipeline``, FLUX image in
``FluxPipeline`` with true CFG), full compute and every policy, one table per model.

Every row, the full one included, runs under the same compiler: ``torch.compile(model,
backend="cachepass", options={"policy": P, "inner": inner})``, where the full row is policy ``none``
(the same graph pieces, every step computed). Each row gets one warm-up generation (it compiles),
then ``repeats`` timed ones; the table shows their median, the measured speedup against the full
row, and beside it the ideal speedup: the block work of full compute over the block work the policy
ran (a cached step still runs the blocks a policy computes on every call, e.g. fbcache's first one).
The gap between the two is the per-call work a cached step still does (head, decision, epilogue,
the pipeline's own loop). Fidelity (PSNR, relative L1) is against the full row's output.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import stats as cache_stats
from ..metrics import psnr, relative_l1
from ..options import parse_options
from ..policies import POLICIES

#: Options each policy runs with in the demo: its documented defaults unless a policy needs a value.
DEMO_OPTIONS: dict[str, dict] = {"interval": {"interval": 3}}
#: The policy the full row runs: every step computed, through the same compiled pieces as the others.
FULL_POLICY = "none"
MODELS = ("wan", "flux")


@dataclass
class DemoModel:
    """One embedded model as the demo runs it."""

    name: str
    title: str
    steps: int  # default denoising steps
    num_blocks: int  # blocks of the stack the policies cache
    load: Callable[[], torch.nn.Module]
    make_pipe: Callable[[torch.nn.Module], object]
    generate: Callable[[object, list[int], int, int], torch.Tensor]  # (pipe, digits, steps, seed)
    pictures: Callable[[torch.Tensor], np.ndarray]  # uint8 (B, F, H, W); F = 1 for images
    options: dict[str, dict] = field(default_factory=dict)  # per policy, over DEMO_OPTIONS


def _wan() -> DemoModel:
    from .model import MODEL_CONFIG, generate, load_digits_model, make_pipeline, to_frames

    return DemoModel(
        "wan", "Wan video (WanPipeline, CFG 4)", 50, MODEL_CONFIG["num_layers"], load_digits_model, make_pipeline,
        lambda pipe, digits, steps, seed: generate(pipe, digits, num_inference_steps=steps, seed=seed), to_frames)


def _flux() -> DemoModel:
    from .flux_model import FLUX_CONFIG, generate_flux, load_digits_flux_model, make_flux_pipeline, to_images

    return DemoModel(
        "flux", "FLUX image (FluxPipeline, true CFG 4)", 28,
        FLUX_CONFIG["num_layers"] + FLUX_CONFIG["num_single_layers"], load_digits_flux_model, make_flux_pipeline,
        lambda pipe, digits, steps, seed: generate_flux(pipe, digits, num_inference_steps=steps, seed=seed),
        lambda latents: to_images(latents)[:, None],
        options={"adacache": {"motion": False}})  # an image: no frames for AdaCache's motion term


DEMO_MODELS: dict[str, Callable[[], DemoModel]] = {"wan": _wan, "flux": _flux}


@dataclass
class DemoRow:
    policy: str
    computed: list[int]  # computed steps per branch
    seconds: float  # median of the timed generations
    speedup: float  # measured: the full row's seconds over this row's
    ideal: float  # block work of full compute over the block work this row ran
    psnr: float
    rel_l1: float
    schedule: list[list[int]]
    compiled_policy: str | None = None  # the policy cachepass.stats reports: proof of the path timed
    times: list[float] = field(default_factory=list)  # every timed generation, seconds
    note: str | None = None  # e.g. why caching was off


@dataclass
class DemoResult:
    model: str
    title: str
    steps: int
    digits: list[int]
    inner: str
    repeats: int
    rows: list[DemoRow]
    files: list[Path] = field(default_factory=list)
    pictures: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # row -> uint8 (B, F, H, W)
    failed: dict[str, str] = field(default_factory=dict)  # policy -> the error it raised


def block_work(policy: str, options: dict, computed: list[int], steps: int, num_blocks: int) -> float:
    """Blocks run over the generation, as a fraction of full compute's (all branches together): a
    computed step runs all ``num_blocks``; a cached one still runs the ones the policy computes on
    every call (``compute_first`` + ``compute_last``: fbcache's first block, dbcache's Fn + Bn)."""
    req = parse_options({"policy": policy, **options}).policy.requirements()
    always = min(num_blocks, req.compute_first + req.compute_last) if req.reuses else num_blocks
    ran = sum(c * num_blocks + (steps - c) * always for c in computed)
    return ran / (len(computed) * steps * num_blocks)


def _time_generations(run: Callable[[], torch.Tensor], repeats: int) -> tuple[list[float], torch.Tensor]:
    times, out = [], None
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        out = run()
        times.append(time.perf_counter() - start)
    return times, out


def run_model(
    model_name: str = "wan",
    steps: int | None = None,
    digits: tuple[int, ...] = (0, 3, 5, 8),
    policies: list[str] | None = None,
    inner: str = "eager",
    seed: int = 0,
    repeats: int = 3,
    log=print,
) -> DemoResult:
    """One embedded model, full compute then every policy, all under cachepass with the same ``inner``."""
    spec = DEMO_MODELS[model_name]()
    steps = steps or spec.steps
    policies = [p for p in (policies or POLICIES) if p != FULL_POLICY]
    model = spec.load()
    pipe = spec.make_pipe(model)
    digits = list(digits)
    total = len(policies) + 1
    rows: list[DemoRow] = []
    pictures: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    run = lambda: spec.generate(pipe, digits, steps, seed)  # noqa: E731
    reference = None  # the full row's output
    for i, name in enumerate([FULL_POLICY, *policies], start=1):
        full = name == FULL_POLICY
        what = f"full computation (cachepass policy {FULL_POLICY!r})" if full else f"policy {name}"
        log(f"[{spec.name} {i}/{total}] {what}" + (f": {steps} steps, CFG, {len(digits)} samples, inner={inner}, "
                                                   f"median of {repeats} after a warm-up" if full else ""))
        try:
            row, out = _run_row(spec, name, model, pipe, run, steps, inner, repeats, log, reference,
                                rows[0].seconds if rows else None)
        except Exception as e:  # one policy that breaks is reported; the others still run
            if full:
                raise
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            log(f"    failed: {failed[name]}")
            continue
        finally:
            pipe.transformer = model
        if full:
            reference = out
        rows.append(row)
        pictures[row.policy] = spec.pictures(out)
    return DemoResult(spec.name, spec.title, steps, digits, inner, repeats, rows, pictures=pictures, failed=failed)


def _run_row(spec: DemoModel, name: str, model, pipe, run, steps: int, inner: str, repeats: int, log,
             reference: torch.Tensor | None, full_seconds: float | None) -> tuple[DemoRow, torch.Tensor]:
    """One row: compile under cachepass with ``name``, warm up, time ``repeats`` generations. The full row
    (``reference=None``) is its own reference."""
    torch._dynamo.reset()
    options = {"inner": inner, **DEMO_OPTIONS.get(name, {}), **spec.options.get(name, {})}
    if name == "magcache":  # its ratios are per model: measured from one full generation
        from ..calibration import magnitude_ratios, record

        pipe.transformer = model
        options["mag_ratios"] = magnitude_ratios(record(run, model, inner=inner))
    pipe.transformer = torch.compile(model, backend="cachepass", options={"policy": name, **options})
    with torch.no_grad():
        warmup = time.perf_counter()
        run()  # warm-up: compiles
        warmup = time.perf_counter() - warmup
        times, out = _time_generations(run, repeats)
    log(f"    warm-up (compiles) {warmup:.1f} s, timed " + ", ".join(f"{t:.3f}" for t in times) + " s")
    stats = cache_stats(pipe.transformer)
    schedule = [s.computed_steps for s in stats.branches]
    note = None
    if reference is not None and not stats.caching:
        note = f"caching off, every step computed: {stats.fallback_reason}"
        schedule = [list(range(steps))] * max(1, len(schedule))
    computed = [len(s) for s in schedule]
    seconds = statistics.median(times)
    reference = out if reference is None else reference
    options.pop("inner")
    ideal = 1.0 / block_work(name, options, computed, steps, spec.num_blocks) if computed else 1.0
    row = DemoRow("full" if name == FULL_POLICY else name, computed, seconds,
                  full_seconds / seconds if full_seconds else 1.0, ideal, psnr(out, reference),
                  relative_l1(out, reference), schedule, compiled_policy=stats.policy, times=times, note=note)
    return row, out


def write_pictures(result: DemoResult, out_dir: Path) -> list[Path]:
    from .render import computed_steps_chart, side_by_side_gif, side_by_side_png

    out_dir.mkdir(parents=True, exist_ok=True)
    schedules = {r.policy: r.schedule for r in result.rows[1:]}
    if result.model == "wan":  # the names the README promises
        files = [side_by_side_gif(result.pictures, out_dir / "demo.gif"),
                 computed_steps_chart(schedules, result.steps, out_dir / "steps.png")]
    else:
        files = [side_by_side_png(result.pictures, out_dir / f"{result.model}.png"),
                 computed_steps_chart(schedules, result.steps, out_dir / f"{result.model}-steps.png")]
    return files


def run_demo(
    models: tuple[str, ...] | list[str] = MODELS,
    steps: int | None = None,
    digits: tuple[int, ...] = (0, 3, 5, 8),
    policies: list[str] | None = None,
    inner: str = "eager",
    seed: int = 0,
    repeats: int = 3,
    out_dir: str | Path | None = "cachepass-out",
    log=print,
) -> list[DemoResult]:
    """Run the demo on each model; returns one result per model (its rows: the full row first).
    ``steps=None``: each model's default (Wan 50, FLUX 28). ``out_dir=None`` writes nothing."""
    results = []
    start = time.perf_counter()
    for name in models:
        if name not in DEMO_MODELS:
            raise ValueError(f"unknown demo model {name!r}; choose from {', '.join(DEMO_MODELS)}")
        result = run_model(name, steps, digits, policies, inner, seed, repeats, log)
        log("")
        log(format_result(result))
        if out_dir is not None:
            result.files = write_pictures(result, Path(out_dir))
            log("wrote " + ", ".join(map(str, result.files)))
        log("")
        results.append(result)
    log(f"demo took {time.perf_counter() - start:.0f} s")
    return results


def format_result(result: DemoResult) -> str:
    head = (f"{result.title}: {result.steps} steps, {len(result.digits)} samples, every row "
            f"torch.compile(backend='cachepass', inner={result.inner!r}), the full row with policy "
            f"{FULL_POLICY!r}; seconds: median of {result.repeats} after a warm-up")
    failed = [f"{name}: failed: {why}" for name, why in result.failed.items()]
    return "\n".join([head, format_table(result.rows), *failed])


def format_table(rows: list[DemoRow]) -> str:
    header = (f"{'policy':<12} {'computed/branch':>16} {'seconds':>8} {'ideal':>7} {'measured':>9} "
              f"{'PSNR dB':>8} {'rel L1':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.policy:<12} {'/'.join(map(str, r.computed)):>16} {r.seconds:>8.3f} {r.ideal:>6.2f}x "
                     f"{r.speedup:>8.2f}x {r.psnr:>8.2f} {r.rel_l1:>8.4f}")
    lines += [f"{r.policy}: {r.note}" for r in rows if r.note]
    return "\n".join(lines)
