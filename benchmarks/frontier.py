"""Budget -> fidelity frontier of every cachepass policy on both embedded models (issue 15).

For each model (the Wan digits video model through WanPipeline, the FLUX digits image model through
FluxPipeline, both with CFG) and each policy, a sweep of the policy's budget knob (interval, threshold):
two generations with one compiled model (the first and the second: both must be good), each scored by
PSNR against the full computation (``cachepass.metrics.psnr``, range 2) and by its block work:

* ``work``: computed steps / steps, averaged over the branches (the issue's measure);
* ``blocks``: the fraction of block calls run, counting the front / back blocks a reuse call still
  computes (fbcache, dbcache, speca: ``compute_first`` of ``N`` blocks on every call).

Fast settings (inner ``eager``, one thread, two digits): a few minutes on a CPU::

    python benchmarks/frontier.py                       # every policy, both models
    python benchmarks/frontier.py --models flux --policies foca speca --steps 50
    python benchmarks/frontier.py --json out.json

FluxPipeline's step count comes from its progress bar (:mod:`cachepass.runtime.signals`); the FLUX runs
also pass ``num_steps`` (``--no-num-steps`` leaves it out: the same rows).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cachepass  # noqa: E402
from cachepass.metrics import psnr  # noqa: E402
from cachepass.options import parse_options  # noqa: E402

#: Per policy: the budget knob and its sweep, plus fixed options.
SWEEPS: dict[str, tuple[str, list, dict]] = {
    "interval": ("interval", [2, 3, 4, 5, 6, 8], {}),
    "teacache": ("threshold", [0.1, 0.2, 0.3, 0.5, 0.8], {}),
    "taylorseer": ("interval", [2, 3, 4, 5, 6, 8], {}),
    "adacache": ("codebook", ["30-slow", "auto", "100", "30-fast"], {}),
    "customcache": ("threshold", [0.1, 0.2, 0.26, 0.4, 0.6], {}),
    "fbcache": ("threshold", [0.05, 0.1, 0.2, 0.3], {}),
    "dbcache": ("threshold", [0.05, 0.12, 0.2, 0.3], {}),
    "foca": ("interval", [2, 3, 4, 5, 6, 7, 8, 10], {}),
    "speca": ("threshold", [0.02, 0.05, 0.1, 0.2, 0.4], {}),
}


def load(model_name: str):
    if model_name == "wan":
        from cachepass.demo.model import generate, load_digits_model, make_pipeline

        model = load_digits_model()
        return model, make_pipeline, lambda pipe, digits, steps: generate(pipe, digits, num_inference_steps=steps)
    from cachepass.demo.flux_model import generate_flux, load_digits_flux_model, make_flux_pipeline

    model = load_digits_flux_model()
    return model, make_flux_pipeline, lambda pipe, digits, steps: generate_flux(pipe, digits,
                                                                               num_inference_steps=steps)


def work_of(branches, front_fraction: float) -> tuple[float, float]:
    """(computed steps / steps, block calls run / block calls) averaged over the branches."""
    steps = [len(b.computed_steps) + len(b.reused_steps) for b in branches]
    computed = [len(b.computed_steps) for b in branches]
    work = sum(c / s for c, s in zip(computed, steps)) / len(branches)
    blocks = sum((c + (s - c) * front_fraction) / s for c, s in zip(computed, steps)) / len(branches)
    return work, blocks


def front_blocks(policy: str, options: dict) -> int:
    req = parse_options({"policy": policy, **options}).policy.requirements()
    return req.compute_first + req.compute_last


def run_one(model, make_pipe, gen, ref, digits, steps, policy, options, num_blocks):
    torch._dynamo.reset()
    pipe = make_pipe(model)
    pipe.transformer = torch.compile(model, backend="cachepass", options={"policy": policy, "inner": "eager",
                                                                         **options})
    row = {"policy": policy, "options": options}
    fraction = front_blocks(policy, options) / num_blocks
    for g in (1, 2):
        with torch.no_grad():
            out = gen(pipe, digits, steps)
        stats = cachepass.stats(pipe.transformer)
        work, blocks = work_of(stats.branches, fraction)
        row[f"psnr{g}"], row[f"work{g}"], row[f"blocks{g}"] = psnr(out, ref), work, blocks
        row["cache_bytes"] = stats.cache_bytes
    torch._dynamo.reset()
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=["wan", "flux"], default=["wan", "flux"])
    p.add_argument("--policies", nargs="+", default=list(SWEEPS))
    p.add_argument("--digits", type=int, nargs="+", default=[3, 8])
    p.add_argument("--steps", type=int, default=None, help="steps (default: 50 for wan, 28 for flux)")
    p.add_argument("--no-num-steps", action="store_true", help="FLUX: do not pass num_steps")
    p.add_argument("--set", nargs="*", default=[], metavar="K=V",
                   help="extra options for every run (python literals), e.g. clock='step'")
    p.add_argument("--values", nargs="*", default=None, help="override the knob's sweep (python literals)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import ast

    extra = {k: ast.literal_eval(v) for k, v in (s.split("=", 1) for s in args.set)}
    rows = []
    for model_name in args.models:
        model, make_pipe, gen = load(model_name)
        steps = args.steps or (50 if model_name == "wan" else 28)
        num_blocks = len(list(getattr(model, "blocks", []))) or (
            len(model.transformer_blocks) + len(model.single_transformer_blocks))
        with torch.no_grad():
            ref = gen(make_pipe(model), args.digits, steps)
        print(f"\n== {model_name}: {steps} steps, digits {args.digits}, {num_blocks} blocks ==")
        print(f"{'policy':12s} {'option':>20s} {'work1':>6s} {'blocks1':>7s} {'PSNR1':>7s} "
              f"{'work2':>6s} {'PSNR2':>7s}  {'cache':>8s}  secs")
        for policy in args.policies:
            knob, values, fixed = SWEEPS[policy]
            if args.values is not None:
                values = [ast.literal_eval(v) for v in args.values]
            for value in values:
                options = {**fixed, **extra, knob: value}
                if model_name == "flux" and not args.no_num_steps:
                    options.setdefault("num_steps", steps)
                t0 = time.perf_counter()
                try:
                    row = run_one(model, make_pipe, gen, ref, args.digits, steps, policy, options, num_blocks)
                except Exception as exc:  # a sweep keeps going; the row says why
                    print(f"{policy:12s} {knob}={value!s:>14}  failed: {type(exc).__name__}: {exc}")
                    continue
                row.update(model=model_name, steps=steps, knob=knob, value=value)
                rows.append(row)
                shown = f"{knob}={value}"
                print(f"{policy:12s} {shown:>20s} {row['work1']:6.1%} {row['blocks1']:7.1%} {row['psnr1']:7.2f} "
                      f"{row['work2']:6.1%} {row['psnr2']:7.2f}  {row['cache_bytes'] / 2**10:6.0f}K"
                      f"  {time.perf_counter() - t0:4.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                       for r in rows], f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
