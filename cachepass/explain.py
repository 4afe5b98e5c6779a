"""``cachepass.explain(model, *args, policy=..., options={...}, **kwargs)``: what the pass finds in a
model, in words.

It traces the model once with Dynamo under ``torch.no_grad()`` and an analysis-only backend (the model
runs eagerly; nothing is cached or compiled by inductor), runs the analysis stages and the cut stages of
:mod:`cachepass.stages` on each captured graph, and reports: the blocks, the residual stream, the
timestep input, the indicators, where the policy's cut falls (with its options: ``{"Fn": 8}`` for
dbcache), the residual pairs of the cut (``end - start``; a joined one names its join), the
head/cached/after sizes (prologue/body/epilogue when no cut is made), and why caching would be off if it
would be.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from . import graph_dump
from ._dynamo import unwrap
from .analysis.block_parts import find_block_parts
from .analysis.blocks import find_block_stack
from .analysis.values import example_value, input_name, is_user_input
from .backend import find_root_module
from .errors import NoBlockStack, OptionError, SplitStack, UnsupportedStructure
from .options import Settings, parse_options
from .runtime import fragments
from .runtime.identity import find_outer_module
from .stages import ANALYSIS, CUT, PassState, run_stages
from .transform.partition import JoinedStart


@dataclass
class GraphReport:
    caching: bool
    reason: str | None = None
    stacks: list[tuple[str, str, int]] = field(default_factory=list)  # (parent list, class, count)
    blocks: list[str] = field(default_factory=list)
    stream: list[tuple[str, list[str], str]] = field(default_factory=list)  # (name, shape, dtype)
    side_inputs: list[str] = field(default_factory=list)
    timestep_input: str | None = None
    indicators: dict[str, str] = field(default_factory=dict)
    indicator_used: str | None = None
    node_counts: dict[str, int] = field(default_factory=dict)
    block_parts: list[str] = field(default_factory=list)  # child names, e.g. attn1, attn2, ffn
    block_part_outputs: int = 0
    cut: tuple[int, int] | None = None  # block boundaries (a, b): [0, a) in the head, [a, b) cached
    joins: dict[str, str] = field(default_factory=dict)  # joined stream's name -> the join (cat) between the blocks
    pairs: list[tuple[str, str, str | None]] = field(default_factory=list)  # (end, start, join or None) per cache write
    fragment: str | None = None  # a graph holding part of a stack split by graph breaks: what it is and does
    unet: list[str] = field(default_factory=list)  # a U-Net: its DeepCache cut in words (no block stack)

    def _unet_lines(self) -> list[str]:
        out = list(self.unet)
        out.append(f"timestep input: {self.timestep_input or 'not found (each call counts as a step)'}")
        for key, node in self.indicators.items():
            mark = "  <- used by the policy" if key == self.indicator_used else ""
            out.append(f"indicator {key}: {node}{mark}")
        for end, _, _ in self.pairs:
            out.append(f"cache write: {end} (a value: the deep feature itself, no residual partner)")
        out.append("nodes: " + ", ".join(f"{k} {v}" for k, v in self.node_counts.items()))
        out.append("caching: on" if self.caching else f"caching off: {self.reason}")
        return out

    def lines(self) -> list[str]:
        if self.fragment is not None:
            return [f"fragment of a split block stack: {self.fragment}",
                    "caching: on (as a fragment)" if self.caching else "caching off (this graph always computes)"]
        if self.unet:
            return self._unet_lines()
        if not self.stacks:
            return [f"caching off: {self.reason}"]
        out = []
        for parent, cls, count in self.stacks:
            out.append(f"block stack: {count} x {cls} in {parent!r}")
        out.append(f"  blocks: {self.blocks[0]} .. {self.blocks[-1]}")
        for name, shape, dtype in self.stream:
            join = self.joins.get(name)
            joined = f" (joined: {join!r} concatenates the stream between the blocks)" if join else ""
            out.append(f"residual stream: {name} {shape} {dtype}{joined}")
        out.append(f"side inputs of the blocks: {', '.join(self.side_inputs) or 'none'}")
        out.append(f"timestep input: {self.timestep_input or 'not found (each call counts as a step)'}")
        for key, node in self.indicators.items():
            mark = "  <- used by the policy" if key == self.indicator_used else ""
            out.append(f"indicator {key}: {node}{mark}")
        parts = ", ".join(self.block_parts) or "none"
        out.append(f"block parts (predicted at granularity 'block'): {parts}; "
                   f"{self.block_part_outputs} cached output(s) over all blocks")
        if self.cut is not None:
            a, b = self.cut
            n = len(self.blocks)
            out.append(f"cut: blocks [0, {a}) run in the head, [{a}, {b}) are cached, [{b}, {n}) run after "
                       "the decision")
        for end, start, join in self.pairs:
            joined = (f" (joined: {join!r} applied to the values entering the cached blocks, a node the variants "
                      "add)") if join else ""
            out.append(f"residual pair: {end} - {start}{joined}")
        out.append("nodes: " + ", ".join(f"{k} {v}" for k, v in self.node_counts.items()))
        out.append("caching: on" if self.caching else f"caching off: {self.reason}")
        return out


@dataclass
class Report:
    policy: str
    graphs: list[GraphReport]

    @property
    def caching(self) -> bool:
        return any(g.caching for g in self.graphs)

    def __str__(self) -> str:
        out = [f"cachepass.explain (policy {self.policy!r}): {len(self.graphs)} graph(s)"]
        for i, graph in enumerate(self.graphs):
            out.append(f"graph {i}:")
            out.extend("  " + line for line in graph.lines())
        return "\n".join(out)


def _describe(gm, settings: Settings) -> GraphReport:
    state = PassState(gm, find_root_module(gm))
    report = _report(state, settings.policy)
    if not report.caching and state.failed == "block_stack":  # a graph holding part of a split stack?
        report = _fragment(gm, state.root, settings, report)
    if settings.debug_dir is not None:
        graph_dump.write(settings.debug_dir, state, policy=settings.policy_name,
                         outcome="caching: on" if report.caching else f"caching off: {report.reason}")
    return report


def _fragment(gm, root, settings: Settings, report: GraphReport) -> GraphReport:
    try:
        find_block_stack(gm)
        error = SplitStack("", "")  # the graph holds blocks: some of a list split by graph breaks
    except NoBlockStack as exc:
        error = exc
    outer = find_outer_module(root, sys._getframe()) if root is not None else None
    found = fragments.describe_graph(gm, root, outer, settings, error)
    if found is None:
        return report
    return GraphReport(caching=found[0], reason=report.reason, fragment=found[1])


def _report(state: PassState, policy) -> GraphReport:
    try:
        run_stages(state, ANALYSIS)
    except UnsupportedStructure as exc:
        return GraphReport(caching=False, reason=str(exc))
    structure = state.structure
    report = GraphReport(caching=True)
    if structure.unet is not None:
        return _unet_report(state, policy, report)
    report.stacks = [(s.parent, s.class_name, len(s.blocks)) for s in structure.stacks]
    report.blocks = [b.module.qualified_name for b in structure.blocks]
    for s in structure.stream:
        value = example_value(s.output)
        report.stream.append((s.start_name, [str(d) for d in value.shape], str(value.dtype).replace("torch.", "")))
        if s.join is not None:
            report.joins[s.start_name] = s.join.name
    report.side_inputs = [
        n.name for n in structure.side_inputs
        if n.op != "placeholder" or is_user_input(n)
    ]
    # every block's parts (what granularity 'block' would predict with no block computed always)
    parts = find_block_parts(structure, 0, len(structure.blocks), structure.body)
    block_names = [b.module.qualified_name for b in structure.blocks]
    report.block_parts = list(dict.fromkeys(p.name[len(block_names[p.block]) + 1:] for p in parts))
    report.block_part_outputs = sum(len(p.outputs) for p in parts)
    partition = _cut(state, policy, report, uncut=("prologue", "body", "epilogue"))
    if partition is not None:
        report.cut = partition.span
        report.pairs = [(end.name, start.name, start.join.name if isinstance(start, JoinedStart) else None)
                        for start, end in partition.pairs]
        if partition.indicator_base is not None:
            base = partition.indicator_base
            report.indicators[report.indicator_used] = f"{partition.indicator.name} - {base.name}"
    return report


def _cut(state: PassState, policy, report: GraphReport, uncut: tuple[str, str, str]):
    """The timestep input, the indicators and the policy's cut into ``report`` (the cut's node counts), shared
    by stacks and U-Nets; ``None`` when the cut declines (the reason, and the regions' node counts named
    ``uncut``), else the partition."""
    structure = state.structure
    if structure.timestep_input is not None:
        report.timestep_input = input_name(structure.timestep_input)
    report.indicators = {k: v.name for k, v in structure.indicators.items()}
    state.requirements = policy.requirements()
    report.indicator_used = state.requirements.indicator
    try:
        run_stages(state, CUT)
    except UnsupportedStructure as exc:
        report.caching, report.reason = False, str(exc)
        regions = (structure.prologue, structure.body, structure.epilogue)
        report.node_counts = {name: len(nodes) for name, nodes in zip(uncut, regions)}
        return None
    partition = state.partition
    report.node_counts = {"head": len(partition.head), "cached": len(partition.cached), "after": len(partition.after)}
    return partition


def _unet_report(state: PassState, policy, report: GraphReport) -> GraphReport:
    cut = state.structure.unet
    deep = example_value(cut.deep_feature)
    skips = ", ".join(s.skip.name for s in cut.level)
    report.unet = [
        f"U-Net (no block stack): {len(cut.skips)} skip connection(s) (a cat of a down-path tensor into the up "
        f"path) at {cut.levels} spatial size(s)",
        f"  shallowest level: {len(cut.level)} skip(s) at [{', '.join(cut.level[0].spatial)}] ({skips}): with the "
        "input layers, the first down level, the last up level and the output layers, computed on every call",
        f"  deep feature: {cut.deep_feature.name} {[str(d) for d in deep.shape]} "
        f"{str(deep.dtype).replace('torch.', '')}, entering the last up level: cached as a value (DeepCache); a "
        "reuse call skips the deeper down levels, the middle and the deeper up levels",
    ]
    partition = _cut(state, policy, report, uncut=("head", "cached", "after"))
    if partition is not None:
        report.pairs = [(end.name, start.name, None) for start, end in partition.pairs]
    return report


def explain(model, *args: Any, policy: str = "none", options: Mapping[str, Any] | None = None,
            **kwargs: Any) -> Report:
    """Trace ``model(*args, **kwargs)`` and report what cachepass would do with ``policy``.

    ``options``: the policy's options (``{"Fn": 8}`` for dbcache: the cut with 8 front blocks), and the
    common ``num_steps`` and ``debug_dir`` (the graph dumps of what explain found: input graph and regions;
    no variant is built). They come as a dict because the keyword arguments are the model's inputs."""
    given = dict(options) if options is not None else {}
    for name in ("policy", "inner"):
        if name in given:
            raise OptionError(f"option {name!r} does not go in explain's options: "
                              + ("pass policy=... itself" if name == "policy" else "explain compiles nothing"))
    settings = parse_options({**given, "policy": policy, "inner": "eager"})
    module = unwrap(model)
    graphs: list[GraphReport] = []

    def recorder(gm, example_inputs):
        graphs.append(_describe(gm, settings))
        return gm.forward

    with torch.no_grad():
        torch.compile(module, backend=recorder)(*args, **kwargs)
    if not graphs:
        graphs.append(GraphReport(caching=False, reason="Dynamo captured no graph"))
    return Report(policy, graphs)
