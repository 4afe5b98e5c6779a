"""What deciding on the device costs per call, against deciding on the host (issue 14).

    python benchmarks/device_decisions.py [--inner eager|inductor] [--steps 20] [--repeats 5]

On the embedded digits model in diffusers' WanPipeline (CFG: two calls per step), per policy
(teacache, fbcache at their defaults), the same compiler for every path:

* ``host``: ``decisions="host"``, the policy decides in Python between the compiled pieces;
* ``device``: ``decisions="device"``, one step graph decides with ``torch.cond`` (both variants compiled
  in it, one runs); a forced call (first / last steps) runs the compute variant alone;
* ``select``: the step graph with both variants run and selected by ``torch.where`` (no read back, no
  work skipped): what ``cond`` saves.

Each path is compiled and run once (warm-up), then ``--repeats`` generations are timed, alternating the
paths; a forward hook times every transformer call. Printed per policy and path: the computed calls per
generation, the median time of a computed call (forced ones included) and of a reused call, the median
time per generation, the host reads per call
(``tests/test_host_reads.count_host_reads``, less the pipeline's own). The paths take the same decisions,
so the differences are the decision mechanism's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ("host", "device", "select")


def _pipeline(policy: str, path: str, inner: str, steps: int):
    from cachepass.demo import load_digits_model, make_pipeline
    from cachepass.runtime import device_program

    model = load_digits_model()
    pipe = make_pipeline(model)
    options = {"policy": policy, "inner": inner, "decisions": "host" if path == "host" else "device"}
    if path == "select":  # another option set, so another Dynamo cache entry than "device" (the pipeline's
        options["num_steps"] = steps  # step count, the same, wins anyway)
    device_program.BRANCH = "select" if path == "select" else "cond"
    pipe.transformer = torch.compile(model, backend="cachepass", options=options)
    return pipe


class CallTimer:
    """Wall time of every call of ``module``, in call order."""

    def __init__(self, module) -> None:
        self.times: list[float] = []
        self._start = 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, module, args):
        self._start = time.perf_counter()

    def _post(self, module, args, out):
        self.times.append(time.perf_counter() - self._start)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inner", default="eager")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--policies", nargs="+", default=["teacache", "fbcache"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_host_reads import count_host_reads

    import cachepass
    from cachepass.demo import generate

    def run(pipe):
        with torch.no_grad():
            return generate(pipe, [3, 7], num_inference_steps=args.steps, seed=0)

    from cachepass.demo import load_digits_model, make_pipeline

    plain = make_pipeline(load_digits_model())
    run(plain)
    plain_reads = count_host_reads(lambda: run(plain))
    calls = 2 * args.steps
    print(f"embedded model, WanPipeline, {args.steps} steps with CFG ({calls} calls), inner={args.inner!r}, "
          f"{args.threads} thread(s), median of {args.repeats} generations")
    print(f"{'policy':<10} {'path':<7} {'computed':>8} {'ms/computed':>11} {'ms/reuse':>9} {'ms/gen':>8} "
          f"{'reads/call':>10}")
    for policy in args.policies:
        torch._dynamo.reset()
        pipes, timers, generations, computed, reads = {}, {}, {}, {}, {}
        for path in PATHS:  # one cache entry per path (per backend): none recompiles once timing starts
            pipes[path] = _pipeline(policy, path, args.inner, args.steps)  # BRANCH is read when the graph compiles
            run(pipes[path])  # compiles, warms up
            reads[path] = (count_host_reads(lambda p=pipes[path]: run(p)) - plain_reads) / calls
            stats = cachepass.stats(pipes[path].transformer)
            # call i is step i // 2 of the branch of index i % 2 (the pipeline calls cond, then uncond)
            computed[path] = [i // 2 in stats.branches[i % 2].computed_steps for i in range(calls)]
            timers[path] = CallTimer(pipes[path].transformer)
            generations[path] = []
        for _ in range(args.repeats):
            for path in PATHS:
                start = time.perf_counter()
                run(pipes[path])
                generations[path].append(time.perf_counter() - start)
        for path in PATHS:
            flags = computed[path] * args.repeats
            times = timers[path].times

            def median_ms(want, flags=flags, times=times):
                picked = [t for t, c in zip(times, flags) if c == want]
                return 1e3 * statistics.median(picked) if picked else float("nan")

            print(f"{policy:<10} {path:<7} {sum(computed[path]):>8} {median_ms(True):>11.3f} {median_ms(False):>9.3f} "
                  f"{1e3 * statistics.median(generations[path]):>8.1f} {reads[path]:>10.3f}")


if __name__ == "__main__":
    main()
