"""The pass as a list of named stages, and the one runner that runs them.

Every stage is a function ``stage(state) -> None`` on a :class:`PassState`: it reads what the stages
before it left on the state and adds its own result; the analysis stages never change the graph.

* ``block_stack``: ``stacks``, the repeated blocks; with the root module known, the whole list; a U-Net's
  ``unet`` cut instead
* ``regions``: the ``prologue`` / ``body`` / ``epilogue`` node sets
* ``checks``: ``dataflow`` (networkx graph); the body is convex and writes into nothing made outside it
* ``residual_stream``: ``stream`` (in/out pairs), ``side_inputs``, ``stream_sources``
* ``timestep``: ``timestep_input``, ``timestep_embedding``
* ``indicators``: ``indicators``, then the :class:`DenoiserStructure` (``structure``)
* ``partition``: ``partition``, the head / cached / after spans, indicator, residual pairs
* ``block_parts``: ``block_parts`` and the partition's ``part_outputs`` (granularity ``block`` only)
* ``features``: the partition's ``observed`` tensors (``Requirements.observe``)
* ``exports``: the partition's ``exported`` head values
* ``variants``: ``variants``, the head, compute and reuse graphs
* ``compile``: ``pieces``, each variant compiled by ``inner``

:func:`run_stages` runs a sequence of them: it logs each at debug level on ``cachepass.stages`` with
its time, logs each stage's graph on ``cachepass.graphs`` (:mod:`cachepass.graph_dump`), and when a
stage raises :class:`~cachepass.errors.UnsupportedStructure` it re-raises the same exception (same type,
so ``NoBlockStack`` and ``SplitStack`` stay what they are) with its message extended by the failing
stage and the ones completed before it; the original reason stays first. Any other exception passes
through unchanged, with a note naming the stage.

The transform stages need ``state.requirements`` (the policy's :class:`Requirements`); ``compile`` also
needs ``example_inputs`` and ``inner``. The backend, ``explain`` and calibration's recording all run
these stages, so each graph is analysed once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import networkx as nx
import torch
import torch.fx as fx

from . import graph_dump
from ._logging import get_logger
from .analysis.block_parts import BlockPart
from .analysis.blocks import BlockStack, find_block_stack, stack_size
from .analysis.dataflow import to_networkx
from .analysis.indicators import find_indicators
from .analysis.residual_stream import (
    StreamTensor,
    body_inputs,
    body_outputs,
    find_residual_stream,
)
from .analysis.structure import (
    DenoiserStructure,
    _check_whole,
    check_body,
    split_regions,
)
from .analysis.timestep import find_timestep_embedding, find_timestep_input
from .analysis.unet import UNetCut, find_unet, unet_regions
from .errors import UnsupportedStructure
from .policies.base import Requirements
from .transform import partition as partition_pass
from .transform.compile import compile_piece, example_inputs_for, inner_name
from .transform.partition import Partition
from .transform.variants import GraphVariants, build_variants

log = get_logger("cachepass.stages")


@dataclass
class PassState:
    """What the stages read and write, for one graph."""

    gm: fx.GraphModule
    root: torch.nn.Module | None = None  # the user's module, when known (checks the whole list is there)
    requirements: Requirements | None = None  # the policy's; needed from ``partition`` on
    example_inputs: Sequence | None = None  # Dynamo's; needed by ``compile``
    inner: Any = "eager"
    inductor_mode: str | None = None
    # analysis
    stacks: list[BlockStack] = field(default_factory=list)
    unet: UNetCut | None = None  # a U-Net (no stacks): its DeepCache cut (``analysis/unet.py``)
    prologue: set[fx.Node] = field(default_factory=set)
    body: set[fx.Node] = field(default_factory=set)
    epilogue: set[fx.Node] = field(default_factory=set)
    dataflow: nx.DiGraph | None = None
    first_block: list[fx.Node] = field(default_factory=list)  # block 0's body nodes, graph order
    stream: list[StreamTensor] = field(default_factory=list)
    side_inputs: list[fx.Node] = field(default_factory=list)
    stream_sources: set[fx.Node] = field(default_factory=set)
    timestep_input: fx.Node | None = None
    timestep_embedding: fx.Node | None = None
    indicators: dict[str, fx.Node] = field(default_factory=dict)
    structure: DenoiserStructure | None = None
    # transform
    partition: Partition | None = None
    block_parts: list[BlockPart] = field(default_factory=list)
    variants: GraphVariants | None = None
    pieces: dict[str, Callable] = field(default_factory=dict)
    # the runner's record
    completed: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # milliseconds per stage run, in run order
    failed: str | None = None  # the stage that raised
    error: str | None = None  # its reason
    outcome: str = ""  # the backend's verdict: "caching: on" or "caching off: <reason>"


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[PassState], None]
    describe: Callable[[PassState], str]  # one line for the debug log: what the stage found


# --- analysis stages -------------------------------------------------------------------------------

def block_stack(state: PassState) -> None:
    """The repeated blocks (``analysis/blocks.py``); with the root module known, a graph that holds only
    some blocks of its list (a graph break splits it) raises ``SplitStack``. A U-Net (skip connections at
    two spatial sizes or more) has no stack: its DeepCache cut instead (``analysis/unet.py``)."""
    state.unet = find_unet(state.gm)
    if state.unet is not None:
        return
    stacks = find_block_stack(state.gm)
    if state.root is not None:
        for stack in stacks:
            _check_whole(state.root, stack.parent, [b.module.index for b in stack.blocks])
    state.stacks = stacks


def regions(state: PassState) -> None:
    """Prologue / body / epilogue node sets (``analysis/structure.py``); a U-Net's: the head, the deep
    part a reuse skips and what its deep feature feeds (``analysis/unet.py``)."""
    if state.unet is not None:
        state.prologue, state.body, state.epilogue = unet_regions(state.gm, to_networkx(state.gm.graph), state.unet)
        return
    state.prologue, state.body, state.epilogue = split_regions(state.gm, state.stacks)


def checks(state: PassState) -> None:
    """The dataflow graph; the body is convex and writes in place into nothing made outside it
    (``check_body``, ``analysis/structure.py``)."""
    state.dataflow = to_networkx(state.gm.graph)
    check_body(state.dataflow, state.body)


def pair_stream(state: PassState, order: dict) -> tuple[list[fx.Node], list]:
    """The body inputs and the stream tensors of the body as ``state`` holds it (``order``: graph positions);
    sets ``state.first_block``. Raises ``UnsupportedStructure`` when a body output pairs with nothing."""
    inputs, outputs = body_inputs(state.body, order), body_outputs(state.body, order)
    state.first_block = [n for n in state.stacks[0].blocks[0].nodes if n in state.body]
    block_nodes = {n for k in state.stacks for b in k.blocks for n in b.nodes}
    return inputs, find_residual_stream(state.dataflow, inputs, outputs, set(state.first_block), state.body,
                                        block_nodes)


def residual_stream(state: PassState) -> None:
    """The stream tensors and their in/out pairing; the body's other inputs (``residual_stream.py``).

    When the body of several adjacent stacks has an output without a partner (Lumina2: two refiner stacks,
    then the joint sequence written into a new tensor by per-sample slices, then the joint stack), the span
    narrows to the longest stack alone, whose boundary tensors pair; the other stacks then always run."""
    order = {n: i for i, n in enumerate(state.gm.graph.nodes)}
    if state.unet is not None:  # a value reuse: no stream, every body input a side input
        inputs = body_inputs(state.body, order)
        state.stream, state.side_inputs, state.stream_sources = [], inputs, set()
        return
    try:
        inputs, state.stream = pair_stream(state, order)
    except UnsupportedStructure as whole:
        if len(state.stacks) < 2:
            raise
        wide = (state.stacks, state.prologue, state.body, state.epilogue)
        state.stacks = [max(state.stacks, key=lambda k: stack_size(k.blocks))]
        state.prologue, state.body, state.epilogue = split_regions(state.gm, state.stacks)
        try:
            check_body(state.dataflow, state.body)
            inputs, state.stream = pair_stream(state, order)
        except UnsupportedStructure:
            state.stacks, state.prologue, state.body, state.epilogue = wide
            raise whole from None
        log.debug("cachepass: %s; the cached span narrows to the stack %r", whole, state.stacks[0].parent)
    stream_inputs = {i for s in state.stream for i in s.inputs}
    state.side_inputs = [i for i in inputs if i not in stream_inputs]
    state.stream_sources = set().union(*(nx.ancestors(state.dataflow, i) | {i} for i in stream_inputs))


def timestep(state: PassState) -> None:
    """The timestep input and the body's timestep embedding (``timestep.py``)."""
    state.timestep_input = find_timestep_input(state.gm, state.dataflow)
    state.timestep_embedding = find_timestep_embedding(
        state.dataflow, state.timestep_input, state.side_inputs, state.stream_sources)


def indicators(state: PassState) -> None:
    """The indicators (``indicators.py``), then the :class:`DenoiserStructure` of the analysis."""
    found = find_indicators(state.dataflow, state.first_block, state.stream, state.timestep_embedding)
    state.indicators = found
    state.structure = DenoiserStructure(
        gm=state.gm, stacks=state.stacks, prologue=state.prologue, body=state.body, epilogue=state.epilogue,
        stream=state.stream, side_inputs=state.side_inputs, timestep_input=state.timestep_input,
        indicators=found, dataflow=state.dataflow, unet=state.unet,
    )


# --- transform stages ------------------------------------------------------------------------------

def _requirements(state: PassState) -> Requirements:
    if state.requirements is None:
        raise ValueError("cachepass: the transform stages need state.requirements (the policy's Requirements)")
    return state.requirements


def partition(state: PassState) -> None:
    """Cut the blocks at ``compute_first`` / ``compute_last``: head, cached and after spans, the
    indicator, and at granularity ``stack`` the residual pairs (``transform/partition.py``)."""
    state.partition = partition_pass.cut(state.structure, _requirements(state))


def block_parts(state: PassState) -> None:
    """Granularity ``block``: the predictable parts of the cached blocks (``analysis/block_parts.py``)."""
    state.block_parts = partition_pass.add_block_parts(state.structure, state.partition, _requirements(state))


def features(state: PassState) -> None:
    """The tensors the policy observes, resolved by name (``analysis/features.py``)."""
    state.partition.observed = partition_pass.observed_tensors(state.structure, _requirements(state))


def exports(state: PassState) -> None:
    """The head values the variants read."""
    partition_pass.add_exports(state.structure, state.partition)


def variants(state: PassState) -> None:
    """The head, compute and reuse graphs (``transform/variants.py``)."""
    state.variants = build_variants(state.gm, state.structure, state.partition, _requirements(state))


def compile_pieces(state: PassState) -> None:
    """Each variant compiled by ``inner`` (the reuse variant only for a policy that reuses)."""
    names = ("head", "compute", "reuse") if _requirements(state).reuses else ("head", "compute")
    for name in names:
        piece = getattr(state.variants, name)
        state.pieces[name] = compile_piece(piece, example_inputs_for(piece, state.example_inputs), state.inner,
                                           state.inductor_mode)


# --- what the debug log says after each stage ------------------------------------------------------

def _stacks(s: PassState) -> str:
    if s.unet is not None:
        return (f"a U-Net: {len(s.unet.skips)} skip connection(s) at {s.unet.levels} level(s); deep feature "
                f"{s.unet.deep_feature.name}")
    return ", ".join(f"{len(k.blocks)} x {k.class_name} in {k.parent!r}" for k in s.stacks)


def _regions(s: PassState) -> str:
    return f"prologue {len(s.prologue)} / body {len(s.body)} / epilogue {len(s.epilogue)} nodes"


def _checks(s: PassState) -> str:
    return f"body convex, no escaping writes ({s.dataflow.number_of_nodes()} dataflow nodes)"


def _stream(s: PassState) -> str:
    pairs = ", ".join(f"{t.start_name} -> {t.output.name}" for t in s.stream)
    return f"{len(s.stream)} stream tensor(s) ({pairs}); {len(s.side_inputs)} side input(s)"


def _timestep(s: PassState) -> str:
    t, e = s.timestep_input, s.timestep_embedding
    return f"input {t.name if t is not None else None}, embedding {e.name if e is not None else None}"


def _indicators(s: PassState) -> str:
    return ", ".join(f"{k} = {v.name}" for k, v in s.indicators.items()) or "none"


def _partition(s: PassState) -> str:
    partition, n = s.partition, len(s.structure.blocks)
    a, b = partition.span
    indicator = partition.indicator
    return (f"blocks [0, {a}) head, [{a}, {b}) cached, [{b}, {n}) after; head {len(partition.head)} / cached "
            f"{len(partition.cached)} / after {len(partition.after)} nodes; indicator "
            f"{indicator.name if indicator is not None else None}; {len(partition.pairs)} residual pair(s)")


def _block_parts(s: PassState) -> str:
    if _requirements(s).reconstruction.granularity != "block":
        return "granularity 'stack': none needed"
    return f"{len(s.block_parts)} part(s), {len(s.partition.part_outputs)} cached output(s)"


def _features(s: PassState) -> str:
    names = _requirements(s).observe
    return ", ".join(f"{k} = {v.name}" for k, v in zip(names, s.partition.observed)) or "none observed"


def _exports(s: PassState) -> str:
    return f"{len(s.partition.exported)} head value(s) exported"


def _variants(s: PassState) -> str:
    v = s.variants
    sizes = ", ".join(f"{k} {len(getattr(v, k).graph.nodes)}" for k in ("head", "compute", "reuse"))
    return f"nodes: {sizes}; {v.num_cache_writes} cache write(s), {v.num_cache_inputs} cache read(s)"


def _compile(s: PassState) -> str:
    return f"{', '.join(s.pieces)} compiled by {inner_name(s.inner)!r}"


BLOCK_STACK = Stage("block_stack", block_stack, _stacks)
REGIONS = Stage("regions", regions, _regions)
CHECKS = Stage("checks", checks, _checks)
RESIDUAL_STREAM = Stage("residual_stream", residual_stream, _stream)
TIMESTEP = Stage("timestep", timestep, _timestep)
INDICATORS = Stage("indicators", indicators, _indicators)
PARTITION = Stage("partition", partition, _partition)
BLOCK_PARTS = Stage("block_parts", block_parts, _block_parts)
FEATURES = Stage("features", features, _features)
EXPORTS = Stage("exports", exports, _exports)
VARIANTS = Stage("variants", variants, _variants)
COMPILE = Stage("compile", compile_pieces, _compile)

#: The read-only analysis of the graph: what ``explain`` reports and ``analyse`` returns.
ANALYSIS: tuple[Stage, ...] = (BLOCK_STACK, REGIONS, CHECKS, RESIDUAL_STREAM, TIMESTEP, INDICATORS)
#: Where the policy's cut falls (needs ``state.requirements``).
CUT: tuple[Stage, ...] = (PARTITION, BLOCK_PARTS, FEATURES, EXPORTS)
#: Everything up to the graphs a compile needs.
TRANSFORM: tuple[Stage, ...] = CUT + (VARIANTS,)
#: The whole pass, in order.
PIPELINE: tuple[Stage, ...] = ANALYSIS + TRANSFORM + (COMPILE,)


def _failure_message(reason: str, stage: str, completed: list[str]) -> str:
    before = ", ".join(completed) if completed else "none"
    return f"{reason} (cachepass stage {stage!r} failed; completed before it: {before})"


def run_stages(state: PassState, stages: Iterable[Stage]) -> PassState:
    """Run ``stages`` in order on ``state`` (a state may go through several calls: the stages of an
    earlier call count as completed). See the module docstring for logging and failures."""
    if not state.timings:
        graph_dump.log_input(state)
    for stage in stages:
        start = time.perf_counter()
        try:
            stage.run(state)
        except UnsupportedStructure as exc:
            ms = (time.perf_counter() - start) * 1e3
            state.timings[stage.name] = ms
            reason = str(exc)
            state.failed, state.error = stage.name, reason
            log.debug("stage %s failed after %.2f ms: %s", stage.name, ms, reason)
            exc.reason, exc.stage, exc.completed = reason, stage.name, list(state.completed)
            exc.args = (_failure_message(reason, stage.name, state.completed), *exc.args[1:])
            raise
        except Exception as exc:
            ms = (time.perf_counter() - start) * 1e3
            state.timings[stage.name] = ms
            state.failed, state.error = stage.name, f"{type(exc).__name__}: {exc}"
            log.debug("stage %s raised %s after %.2f ms", stage.name, type(exc).__name__, ms)
            exc.add_note(f"cachepass: raised in stage {stage.name!r}; completed before it: "
                         f"{', '.join(state.completed) or 'none'}")
            raise
        ms = (time.perf_counter() - start) * 1e3
        state.timings[stage.name] = ms
        state.completed.append(stage.name)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("stage %s: %.2f ms: %s", stage.name, ms, stage.describe(state))
        graph_dump.log_stage(state, stage.name)
    return state


def analyse_graph(gm: fx.GraphModule, root: torch.nn.Module | None = None) -> PassState:
    """The analysis stages on ``gm``; ``state.structure`` holds the result."""
    return run_stages(PassState(gm, root), ANALYSIS)
