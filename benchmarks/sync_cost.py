"""What synchronising cache decisions costs: one all_reduce of a few statistics per decision.

    python benchmarks/sync_cost.py --world 2 4

For each world size, gloo ranks on this machine (CPU) measure

* the latency of ``DecisionSync.reduce`` on the tensor a decision sends (2 floats: relative L1;
  5 floats: adacache with motion), median of ``--iters`` back-to-back calls;
* a sampling step of the sequence-parallel test model (``tests/sp_model.py``, customcache, whose
  indicator is the same on every rank so that ``sync=False`` is safe for the comparison) with
  ``sync='auto'`` and ``sync=False``, alternated: best over ``--repeats`` generations of the wall time
  per step (compiled before timing).

Rank 0 prints one line per world size. Numbers are for this CPU and gloo over loopback; NCCL on GPUs
has other latencies (see docs/distributed.md).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rank(rank: int, world: int, init_file: str, iters: int, repeats: int) -> None:
    import torch.distributed as dist

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import sp_model

    from cachepass.runtime.distributed import DecisionSync

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    sync = DecisionSync("auto")
    reduce_us = {}
    for size in (2, 5):
        stats = torch.rand(size)
        for _ in range(50):
            sync.reduce(stats)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            sync.reduce(stats).tolist()
            times.append(time.perf_counter() - t0)
        reduce_us[size] = statistics.median(times) * 1e6

    shard = sp_model.TOKENS // world
    parts = [torch.empty(1, shard, 4) for _ in range(world)]
    compiled = {}
    for mode in ("auto", False):
        options = {"policy": "customcache", "inner": "eager", "num_steps": sp_model.STEPS,
                   **sp_model.CASES["customcache"], "sync": mode}
        compiled[mode] = torch.compile(sp_model.build(dist.group.WORLD), backend="cachepass", options=options)

    def generation(model) -> float:
        def call(x, t):
            dist.all_gather(parts, model(x[:, rank * shard:(rank + 1) * shard].contiguous(), t))
            return torch.cat(parts, dim=1)

        dist.barrier()
        t0 = time.perf_counter()
        for _ in sp_model.denoise(call, sp_model.initial_latent(), churn=sp_model.CHURN):
            pass
        return (time.perf_counter() - t0) / sp_model.STEPS

    per_step = {mode: [] for mode in compiled}
    with torch.no_grad():
        for i in range(repeats + 1):  # alternate the modes, so that load from other jobs hits both alike
            for mode, model in compiled.items():
                seconds = generation(model)
                if i:  # the first round compiles
                    per_step[mode].append(seconds)
    if rank == 0:
        print(f"world {world}: all_reduce of 2 floats {reduce_us[2]:.0f} us, of 5 floats {reduce_us[5]:.0f} us "
              f"(median); sampling step (call + output gather), best of {repeats} generations: "
              f"sync {min(per_step['auto']) * 1e3:.2f} ms, no sync {min(per_step[False]) * 1e3:.2f} ms", flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for world in args.world:
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_rank, args=(world, os.path.join(tmp, "init"), args.iters, args.repeats), nprocs=world)


if __name__ == "__main__":
    main()
