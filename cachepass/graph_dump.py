"""Graph dumps on demand: what the pass saw and what it made, for one graph at a time.

* The ``cachepass.graphs`` logger, at DEBUG: the input graph's code before the first stage, one line per
  analysis stage (they read the graph and leave it unchanged), the region of every node once the
  ``partition`` stage has cut the blocks, the predicted parts (granularity ``block``), and the code of
  the head, compute and reuse graphs after ``variants``. Turn it on with
  ``logging.getLogger("cachepass.graphs").setLevel(logging.DEBUG)`` (and a handler).
* The ``debug_dir`` option: per graph the backend compiles, a folder ``graph-NNN-<Model>`` (numbered
  after the folders already there) holding ``input.py`` (the graph Dynamo handed over), ``head.py``,
  ``compute.py``, ``reuse.py`` (the variants; ``reuse.py`` only for a policy that reuses), ``regions.txt``
  (per node, in graph order: the region it went to, the partition's ``head`` / ``cached`` / ``after``
  with ``epilogue`` for what runs after the block stack, or the analysis' ``prologue`` / ``body`` /
  ``epilogue`` when no cut was made, its op, target, block and role) and
  ``stages.txt`` (each stage's time and outcome, and whether caching is on or why not).

Code is ``GraphModule.code``: the Python torch.fx generates for the graph, node names as in
``regions.txt``; the nodes the variants add are named ``cp_...`` (:mod:`cachepass.transform.variants`).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch.fx as fx

from ._logging import get_logger, warn_once

if TYPE_CHECKING:
    from .stages import PassState

glog = get_logger("cachepass.graphs")
log = get_logger("cachepass.graph_dump")

_ANALYSIS = ("block_stack", "regions", "checks", "residual_stream", "timestep", "indicators", "features",
             "exports")
_folder_lock = threading.Lock()
_FOLDER = re.compile(r"^graph-(\d+)")


def enabled() -> bool:
    return glog.isEnabledFor(logging.DEBUG)


def _model(state: "PassState") -> str:
    return type(state.root).__name__ if state.root is not None else "unknown model"


def log_input(state: "PassState") -> None:
    if enabled():
        glog.debug("input graph of %s (%d nodes):\n%s", _model(state), len(state.gm.graph.nodes), state.gm.code)


def log_stage(state: "PassState", stage: str) -> None:
    """What the graph looks like after ``stage`` (called by the runner once the stage succeeded)."""
    if not enabled():
        return
    if stage in _ANALYSIS:
        glog.debug("after stage %s: the graph is unchanged (the stage only reads it)", stage)
    elif stage == "partition":
        glog.debug("after stage partition: the cut\n%s", regions_text(state))
    elif stage == "block_parts":
        parts = "\n".join(f"  {p.name}: {len(p.nodes)} node(s), outputs {', '.join(n.name for n in p.outputs)}"
                          for p in state.block_parts) or "  none (granularity 'stack')"
        glog.debug("after stage block_parts: the predicted parts\n%s", parts)
    elif stage == "variants":
        for name, piece in _variant_graphs(state):
            glog.debug("after stage variants: the %s graph (%d nodes):\n%s", name, len(piece.graph.nodes),
                       piece.code)
    else:
        glog.debug("after stage %s: no graph changed", stage)


def _variant_graphs(state: "PassState") -> list[tuple[str, fx.GraphModule]]:
    v = state.variants
    if v is None:
        return []
    names = ["head", "compute"]
    if state.requirements is None or state.requirements.reuses:
        names.append("reuse")
    return [(name, getattr(v, name)) for name in names]


# --- regions -------------------------------------------------------------------------------------------

def _target(node: fx.Node) -> str:
    if node.op == "call_function":
        try:
            return fx.node._get_qualified_name(node.target)
        except Exception:
            return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def _roles(state: "PassState") -> dict[fx.Node, list[str]]:
    roles: dict[fx.Node, list[str]] = {}

    def add(node, role):
        roles.setdefault(node, []).append(role)

    for s in state.stream:
        add(s.input, "stream in")
        add(s.output, "stream out")
    if state.timestep_input is not None:
        add(state.timestep_input, "timestep")
    for name, node in state.indicators.items():
        add(node, f"indicator {name}")
    partition = state.partition
    if partition is not None:
        if partition.indicator is not None:
            minus = " (minus its base)" if partition.indicator_base is not None else ""
            add(partition.indicator, "decision indicator" + minus)
        if partition.indicator_base is not None:
            add(partition.indicator_base, "indicator base")
        for start, end in partition.pairs:
            add(start, "residual start")
            add(end, "residual end")
        for node in partition.part_outputs:
            add(node, "cached part output")
        for node in partition.predicted:
            add(node, "predicted (reuse drops it)")
        names = state.requirements.observe if state.requirements is not None else ()
        for name, node in zip(names, partition.observed):
            add(node, f"observed {name}")
        for node in partition.exported:
            add(node, "exported by the head")
    return roles


def regions_text(state: "PassState", title: str | None = None) -> str:
    """Per node, in graph order: region, name, op, target, block, roles; a header saying where the cut
    fell. Regions: the partition's ``head`` / ``cached`` / ``after``, with the structure's ``epilogue``
    (after the block stack) told apart from ``after``, once partitioned; else the analysis' ``prologue`` /
    ``body`` / ``epilogue``; placeholders are ``input``, the output node ``output``."""
    nodes = list(state.gm.graph.nodes)
    blocks = {n: b.module.qualified_name for s in state.stacks for b in s.blocks for n in b.nodes}
    partition = state.partition
    lines = [f"# {title}"] if title else []
    if state.stacks:
        for s in state.stacks:
            lines.append(f"# block stack: {len(s.blocks)} x {s.class_name} in {s.parent!r} "
                         f"({s.blocks[0].module.qualified_name} .. {s.blocks[-1].module.qualified_name})")
    if partition is not None:
        n = sum(len(s.blocks) for s in state.stacks)
        a, b = partition.span
        epilogue = [x for x in partition.after if x in state.epilogue]
        unet = getattr(state, "unet", None)
        if unet is not None:
            lines.append(f"# cut (U-Net): the deep feature {unet.deep_feature.name} is cached; the head and "
                         "what it feeds (the epilogue) run on every call")
        else:
            lines.append(f"# cut: blocks [0, {a}) run in the head, [{a}, {b}) are cached, [{b}, {n}) and the "
                         "epilogue run after the decision")
        lines.append(f"# nodes: head {len(partition.head)}, cached {len(partition.cached)}, "
                     f"after {len(partition.after) - len(epilogue)}, epilogue {len(epilogue)}")
        if partition.indicator is not None:
            base = f" - {partition.indicator_base.name}" if partition.indicator_base is not None else ""
            lines.append(f"# indicator: {partition.indicator.name}{base}")
        if partition.pairs:
            lines.append("# cache writes (stack): " + ", ".join(f"{e.name} - {s.name}" for s, e in partition.pairs))
        if partition.part_outputs:
            lines.append(f"# cache writes (block): {len(partition.part_outputs)} part output(s)")
    elif state.body:
        lines.append(f"# no cut made ({state.error or 'the partition stage did not run'}); regions of the "
                     "analysis")
    rows = []
    roles = _roles(state)
    for node in nodes:
        if node.op == "placeholder":
            region = "input"
        elif node.op == "output":
            region = "output"
        elif partition is not None:
            region = ("head" if node in partition.head else "cached" if node in partition.cached
                      else "epilogue" if node in state.epilogue else "after" if node in partition.after else "?")
        else:
            region = "prologue" if node in state.prologue else "body" if node in state.body else "epilogue"
        rows.append((region, node.name, node.op, _target(node), blocks.get(node, "-"),
                     "; ".join(roles.get(node, ())) or "-"))
    header = ("region", "node", "op", "target", "block", "role")
    widths = [min(max(len(r[i]) for r in rows + [header]), 40) for i in range(5)]  # long names overflow
    for row in [header, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5])
    return "\n".join(lines) + "\n"


# --- debug_dir -----------------------------------------------------------------------------------------

def _new_folder(root: Path, model: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    label = re.sub(r"[^A-Za-z0-9_.-]", "_", model)
    with _folder_lock:
        while True:
            taken = [int(m.group(1)) for p in root.iterdir() if (m := _FOLDER.match(p.name))]
            folder = root / f"graph-{max(taken, default=-1) + 1:03d}-{label}"
            try:
                folder.mkdir()
                return folder
            except FileExistsError:  # another process took the number: take the next
                continue


def stages_text(state: "PassState", policy: str, outcome: str) -> str:
    from .stages import PIPELINE

    lines = [f"# cachepass stages for {_model(state)}, policy {policy!r}"]
    ran = set(state.timings)
    for name in [s.name for s in PIPELINE] + [n for n in state.timings if n not in {s.name for s in PIPELINE}]:
        if name not in ran:
            lines.append(f"{name:<16} {'':>10}  not run")
            continue
        status = "ok" if name in state.completed else f"failed: {state.error}"
        lines.append(f"{name:<16} {state.timings[name]:>7.2f} ms  {status}")
    lines.append(f"{'total':<16} {sum(state.timings.values()):>7.2f} ms")
    lines.append(outcome)
    return "\n".join(lines) + "\n"


def write(debug_dir: str | os.PathLike, state: "PassState", *, policy: str, outcome: str) -> Path | None:
    """Write one numbered folder for this graph under ``debug_dir``; ``None`` (and one warning) if the
    folder cannot be written: a dump never stops a compile."""
    try:
        folder = _new_folder(Path(debug_dir), _model(state))
        title = f"{folder.name}: {_model(state)}, policy {policy!r}"
        files = {"input.py": f"# {title}: the graph Dynamo handed to cachepass\n{state.gm.code}"}
        for name, piece in _variant_graphs(state):
            files[f"{name}.py"] = f"# {title}: the {name} graph\n{piece.code}"
        if state.body:
            files["regions.txt"] = regions_text(state, title)
        files["stages.txt"] = stages_text(state, policy, outcome)
        for name, text in files.items():
            (folder / name).write_text(text)
    except Exception as exc:  # noqa: BLE001 (an unwritable folder, or anything else: the compile goes on)
        warn_once(log, ("debug_dir", str(debug_dir)), "cachepass: cannot write graph dumps to %s: %s", debug_dir, exc)
        return None
    log.info("cachepass: graph dumps of %s written to %s", _model(state), folder)
    return folder
