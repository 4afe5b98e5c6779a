"""Side by side, in one process, on the same pipeline, prompts and seeds: full compute (eager and
torch.compile), cachepass with each policy over a sweep, and diffusers' and cache-dit's cache hooks;
on each workload in turn (default: both embedded trained models, Wan in WanPipeline and FLUX in
FluxPipeline with true CFG).

    python benchmarks/compare.py --workload digits flux-digits --methods all --repeats 3 --markdown out.md
    python benchmarks/compare.py --workload large --device cuda --methods full cachepass:interval:interval=2|3|5

Each row gets a fresh copy of the transformer and a fresh pipeline, with Dynamo reset, then runs
one warm-up generation (compiles; its output's fidelity is the first-generation PSNR), one profiled
generation (fidelity, block work, memory, the tool's own stats) and ``--repeats`` timed ones (median).
Fidelity and speedup are against full compute with the same compiler: eager rows against ``eager``,
compiled rows against ``compile``; the two full rows against ``eager``. See docs/benchmarks.md for
what each column means and how it is measured.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import sys
import time
import traceback
from importlib import metadata

import torch

os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")  # its info lines for every row drown the table

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import measure, methods, report  # noqa: E402
from benchmarks.workloads import WORKLOADS, get_workload  # noqa: E402
from cachepass.metrics import psnr, relative_l1  # noqa: E402


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def with_baselines(specs: list[methods.Spec]) -> list[methods.Spec]:
    """Full compute first: ``eager`` always, ``compile`` when any row is compiled."""
    eager, compiled = methods.parse("eager")[0], methods.parse("compile")[0]
    needed = [eager] + ([compiled] if any(s.compiled for s in specs) else [])
    return needed + [s for s in specs if s not in needed]


def run_row(spec, workload, base, args, refs: dict, baseline: dict) -> dict:
    compiler = args.backend if spec.compiled else "eager"
    row = {"method": spec.label, "family": spec.family, "tool": spec.tool, "compiler": compiler,
           "params": dict(spec.params), "steps": args.steps, "status": "ok", "notes": []}
    model = copy.deepcopy(base)
    pipe = workload.make_pipe(model)
    measure.reset_dynamo()
    applied = methods.make(spec, pipe, model, args.backend, args.steps, workload.options_for(spec.tool, spec.algo))
    try:
        applied.apply(lambda: workload.generate(pipe, args.steps))
        row["warmup_seconds"], first = measure.timed(lambda: workload.generate(pipe, args.steps), args.device)
        applied.between_generations()
        prof = measure.profiled(lambda: workload.generate(pipe, args.steps), args.device)
        row["computed"], row["computed_source"] = applied.computed_steps()
        row["cache_mib"] = None if (b := applied.cache_bytes()) is None else b / 2**20
        seconds, outs = measure.median_seconds(lambda: workload.generate(pipe, args.steps), args.device,
                                               args.repeats)
        row.update(measure.dynamo_counts() if spec.compiled else
                   {"graph_breaks": None, "graph_break_reasons": [], "graphs": None, "recompiles": None})
    except methods.Skip as e:
        row["status"] = f"skipped: {e}"
        return row
    except Exception as e:  # a row that breaks is reported, the others still run
        traceback.print_exc()
        row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        return row
    finally:
        try:
            applied.remove()
        except Exception as e:  # noqa: BLE001 - report, don't mask the row's own outcome
            row["notes"].append(f"remove failed: {type(e).__name__}: {e}")
        row["notes"] += applied.notes
        applied = pipe = model = None  # free the row's models before the next row
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


    score(row, spec, workload, prof, seconds, outs, refs, baseline, first)
    return row


def score(row: dict, spec, workload, prof, seconds, outs, refs: dict, baseline: dict, first=None) -> None:
    """Fidelity, speedup, block work and memory against full compute with the same compiler. ``first``:
    the row's first generation (the warm-up), scored too: a tool's state must not change the output of
    later generations, and the first must be as good."""
    out = prof.output.float().cpu()
    same = "compile" if spec.compiled else "eager"
    if spec.tool == "full":
        refs[spec.algo] = out
        baseline[spec.algo] = {"seconds": seconds, "attention": prof.attention_calls, "peak": prof.peak_bytes}
    against = "eager" if spec.tool == "full" else same  # fidelity and speedup; the full rows against eager
    base_seconds = baseline[against]["seconds"]
    row["seconds"] = seconds
    row["speedup"] = base_seconds / seconds if seconds and base_seconds else None
    row["attention_calls"] = prof.attention_calls
    row["attention_ops"] = prof.attention_names
    full_attention = baseline[same]["attention"]
    row["block_work"] = prof.attention_calls / full_attention if full_attention else None
    ref = refs[against]
    row["psnr"] = psnr(out, ref, data_range=workload.psnr_range(ref))
    row["rel_l1"] = relative_l1(out, ref)
    if first is not None:
        first = first.float().cpu()
        row["psnr_first"] = psnr(first, ref, data_range=workload.psnr_range(ref))
        row["rel_l1_first"] = relative_l1(first, ref)
    row["peak_mib"] = prof.peak_bytes / 2**20
    row["extra_mib"] = (prof.peak_bytes - baseline[same]["peak"]) / 2**20
    row["repeat_rel_l1"] = max((relative_l1(o.float().cpu(), out) for o in outs), default=None)
    if row["repeat_rel_l1"]:
        row["notes"].append(f"timed generations differ from the profiled one (rel L1 {row['repeat_rel_l1']:.2g})")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", nargs="+", choices=list(WORKLOADS), default=["digits", "flux-digits"],
                   help="one or more, run in turn (default: both embedded trained models)")
    p.add_argument("--methods", nargs="+", default=["all"],
                   help="methods or groups (full, cachepass, diffusers, cache-dit, all); see benchmarks/methods.py")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per row (median); 0: no timing")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the workload's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA (float32 for digits), float32 on CPU")
    p.add_argument("--backend", default="inductor",
                   help="torch.compile backend of the compiled rows, and cachepass's inner compiler")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 makes CPU timings far steadier on a shared machine)")
    p.add_argument("--json", default=None, metavar="OUT")
    p.add_argument("--markdown", default=None, metavar="OUT")
    p.add_argument("--plot", default=None, metavar="OUT.png")
    return p.parse_args(argv)


def run(args, on_row=None) -> tuple[list[dict], dict]:
    """All rows of the workload ``args.workload`` (one name) in order; ``on_row(rows, meta)`` after each, so
    a run cut short still leaves its results."""
    if args.threads:
        torch.set_num_threads(args.threads)
    workload = get_workload(args.workload)
    args.steps = args.steps or workload.steps
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype) if args.dtype else workload.default_dtype["cuda" if cuda else "cpu"]
    specs = with_baselines(methods.parse_all(args.methods))
    device = (torch.cuda.get_device_name() if cuda else
              f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})")
    meta = {
        "workload": workload.name, "description": workload.description, "weights": workload.weights,
        "steps": args.steps, "repeats": args.repeats, "device": device, "dtype": str(dtype).removeprefix("torch."),
        "backend": args.backend, "torch": torch.__version__, "diffusers": version("diffusers"),
        "cache_dit": version("cache-dit"), "date": time.strftime("%Y-%m-%d"),
    }
    measure.setup_dynamo_metrics()
    base = workload.make_model(args.device, dtype)
    refs, baseline, rows = {}, {}, []
    for i, spec in enumerate(specs):
        start = time.perf_counter()
        row = run_row(spec, workload, base, args, refs, baseline)
        rows.append(row)
        cells = " | ".join(report.table_cells(row))
        print(f"[{i + 1}/{len(specs)}] {time.perf_counter() - start:6.1f}s  {cells}", file=sys.stderr, flush=True)
        if on_row:
            on_row(rows, meta)
        if spec.tool == "full" and row["status"] != "ok":
            raise RuntimeError(f"full-compute row {spec.label} failed: {row['status']}")
    return rows, meta


def main(argv=None) -> int:
    return main_with(parse_args(argv))


def workload_names(args) -> list[str]:
    names = [args.workload] if isinstance(args.workload, str) else list(args.workload)
    return list(dict.fromkeys(names))


def write_outputs(args, runs: list[tuple[list[dict], dict]], final: bool = False) -> None:
    """``runs``: (rows, meta) per workload. One workload: JSON ``{"meta", "rows"}``; several:
    ``{"runs": [{"meta", "rows"}, ...]}``. The markdown has a table per workload, the plot a panel."""
    text = "\n".join(report.markdown(rows, meta) for rows, meta in runs)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        records = [{"meta": meta, "rows": rows} for rows, meta in runs]
        with open(args.json, "w") as f:
            json.dump(records[0] if len(records) == 1 else {"runs": records}, f, indent=1, default=str)
    if final:
        print(text)
        if args.plot:
            report.plot_runs([(rows, f"{meta['workload']}: {meta['description']}") for rows, meta in runs],
                             args.plot)


def main_with(args) -> int:
    names, steps, done = workload_names(args), args.steps, []
    for name in names:
        args.workload, args.steps = name, steps  # steps None: each workload's own count (run sets it)
        rows, meta = run(args, on_row=lambda rows, meta: write_outputs(args, [*done, (rows, meta)]))
        done.append((rows, meta))
    args.workload, args.steps = names, steps
    write_outputs(args, done, final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
