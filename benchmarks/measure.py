"""Measurements of one generation: time, attention calls (block work), memory, Dynamo's counters.

Why these means:

* block work: every Wan block runs two ``scaled_dot_product_attention`` (self and cross), in eager and
  in compiled code alike (inductor calls the aten kernel), so the profiler's count of attention
  calls over a generation, divided by the full run's, is the fraction of block executions that ran,
  whichever tool skipped them. Only the aten kernel ops are counted: inductor's fused Triton kernels
  can carry ``scaled_dot_product`` in their names too (see :func:`count_attention`).
* memory: the peak of allocated bytes during the generation above what was allocated when it began
  (CUDA: the caching allocator's peak; CPU: the running sum of the allocations and frees the
  profiler records, ``profile_memory=True``). The generation starts with the tool's state dropped,
  so a cache built during it is counted.
* compile: ``torch._dynamo.utils.counters`` (graph breaks, unique graphs) and Dynamo's compilation
  metrics (a compile with a ``recompile_reason`` is a recompile).
"""

from __future__ import annotations

import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass

import torch


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, torch.Tensor]:
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def median_seconds(fn, device: str, repeats: int) -> tuple[float | None, list[torch.Tensor]]:
    if repeats < 1:
        return None, []
    runs = [timed(fn, device) for _ in range(repeats)]
    return statistics.median(t for t, _ in runs), [o for _, o in runs]


@dataclass
class Profiled:
    output: torch.Tensor
    attention_calls: int
    attention_names: dict  # per op name, for checking the count
    peak_bytes: int  # above the bytes allocated when the generation began


def attention_events(events) -> dict[str, int]:
    """How many times each attention op ran: the names hold ``scaled_dot_product``."""
    return dict(Counter(e.name for e in events if "scaled_dot_product" in e.name))


def count_attention(names: dict[str, int]) -> int:
    """Attention calls: the kernel-level ops (``aten::_scaled_dot_product_*``: flash, efficient, cuDNN,
    math, CPU flash), which eager and compiled code both end in; the ``aten::scaled_dot_product_attention``
    wrapper only where no kernel-level op was recorded."""
    kernels = sum(n for name, n in names.items() if name.startswith("aten::_scaled_dot_product"))
    return kernels or sum(names.values())


def cpu_peak_bytes(events) -> int:
    """Peak of the running sum of CPU allocations, in time order. The profiler books an allocation made
    inside an op on that op (``self_cpu_memory_usage``, net of what it freed) and a free outside any op
    as a ``[memory]`` event; both are needed."""
    deltas = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                    for e in events)
    running = peak = 0
    for _, delta in deltas:
        running += delta
        peak = max(peak, running)
    return peak


def profiled(fn, device: str) -> Profiled:
    """Run ``fn`` once under the profiler: its output, attention calls and peak extra memory."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    if cuda:
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=not cuda) as prof:
        out = fn()
        synchronize(device)
    events = prof.events()
    peak = torch.cuda.max_memory_allocated() - before if cuda else cpu_peak_bytes(events)
    names = attention_events(events)
    return Profiled(out, count_attention(names), names, peak)


def reset_dynamo() -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch._dynamo.utils.clear_compilation_metrics()


def _brief(reason: str) -> str:
    """A graph-break reason's explanation (or headline), without the hints and links."""
    lines = [ln.strip() for ln in reason.splitlines() if ln.strip()]
    explained = [ln.removeprefix("Explanation: ") for ln in lines if ln.startswith("Explanation:")]
    return re.sub(r" at 0x[0-9a-f]+", "", (explained or lines or [""])[0])[:200]


def dynamo_counts() -> dict:
    """Graph breaks, unique graphs and recompiles since the last :func:`reset_dynamo`."""
    counters = torch._dynamo.utils.counters
    metrics = torch._dynamo.utils.get_compilation_metrics()
    return {
        "graph_breaks": sum(counters["graph_break"].values()),
        "graph_break_reasons": [_brief(r) for r in sorted(counters["graph_break"])[:5]],
        "graphs": counters["stats"]["unique_graphs"],
        "recompiles": sum(1 for m in metrics if m.recompile_reason),
    }


def setup_dynamo_metrics() -> None:
    """Keep every compile's metrics for the row (the default keeps the last 64)."""
    torch._dynamo.utils.set_compilation_metrics_limit(100_000)
