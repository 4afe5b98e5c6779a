"""Pass ``partition``: decide which nodes run before the cache decision and which after.

Reads a :class:`DenoiserStructure` and a policy's :class:`Requirements`; writes a :class:`Partition`.
The blocks are cut into three spans at block boundaries ``a = compute_first`` and
``b = len(blocks) - compute_last``:

* ``head``: the prologue (everything before the body), blocks ``[0, a)``, and the body nodes the requested indicator
  depends on (``modulated_input``: a few nodes of block 0): what runs before every decision. The
  indicator ``front_residual`` is the residual of blocks ``[0, a)``: the stream value at boundary
  ``a`` minus its partner entering block 0, a node the head graph adds;
* ``cached``: blocks ``[a, b)`` less what the head took: what a reuse call skips;
* ``after``: blocks ``[b, N)`` and the epilogue: what every call runs after the decision.

What the cache holds depends on the reconstruction's granularity: ``stack``: per stream value
crossing boundary ``b``, the residual against its partner value at boundary ``a`` (same shape and
dtype, an ancestor); ``block``: the outputs of the predictable parts of blocks ``[a, b)``
(:mod:`cachepass.analysis.block_parts`), whose nodes the reuse variant drops.

A value at boundary ``b`` of a joined stream (text and image tokens concatenated between two stacks,
:mod:`cachepass.analysis.residual_stream`) made after the join has no partner among the values at
boundary ``a`` when the join lies in ``[a, b)``: its partner is then a :class:`JoinedStart`, the same
join applied to the partners of the join's inputs at boundary ``a``, a node the variants add
(``cp_join_END``; the head adds it for a ``front_residual`` base, ``cp_join_NAME``).

A U-Net (:mod:`cachepass.analysis.unet`) has no blocks: its spans are the analysis' regions (head: the
shallow branch's inputs and the timestep embedding; cached: the deep part; after: the last up level and
the output layers) and it has one *value* pair, ``(VALUE, deep feature)``: the cache holds the deep
feature itself and a reuse call reads it instead of computing it (DeepCache). Policies that compute
blocks always (``compute_first`` / ``compute_last``) or predict block parts do not apply to it.

Invariants: ``head`` is closed under ancestors, so the head graph runs alone; the ``after`` nodes read
only boundary-``b`` values, head values and graph inputs, so a reuse call can run them.

The runner (:mod:`cachepass.stages`) calls this module as four stages: ``partition`` (:func:`cut`: the
spans, the indicator, the residual pairs), ``block_parts`` (:func:`add_block_parts`), ``features``
(:func:`observed_tensors`) and ``exports`` (:func:`add_exports`); :func:`partition` runs the four in one
call, in that order (which is also the order their errors take precedence in).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.fx as fx

from ..analysis.block_parts import BlockPart, find_block_parts
from ..analysis.dataflow import ancestors_within
from ..analysis.features import resolve_feature
from ..analysis.residual_stream import join_name, join_parts
from ..analysis.structure import DenoiserStructure
from ..analysis.values import is_tensor, tensor_signature
from ..errors import UnsupportedStructure
from ..policies.base import Requirements


@dataclass(frozen=True)
class JoinedStart:
    """The partner at boundary ``a`` of a value made after a join in the cached span: ``join`` (a
    concatenation in the body) applied to ``parts`` (the boundary-``a`` partners of its tensor inputs, in
    order) instead of its own inputs. No node of the graph holds it; the variant that reads it adds it."""

    join: fx.Node
    parts: tuple[fx.Node, ...]

    @property
    def name(self) -> str:
        return join_name(self.parts)


@dataclass(frozen=True)
class ValueStart:
    """The start of a *value* pair (a U-Net's deep feature, :mod:`cachepass.analysis.unet`): nothing. The
    cache holds the value itself (a residual against zero) and a reuse call's value is the prediction."""

    name: str = "0"


#: The one start of every value pair.
VALUE = ValueStart()


def start_nodes(start) -> tuple[fx.Node, ...]:
    """The graph values a pair start (or ``indicator_base``) is made of: itself, a join's parts, or
    none (a value pair)."""
    if start is None or isinstance(start, ValueStart):
        return ()
    return start.parts if isinstance(start, JoinedStart) else (start,)


def start_signature(start):
    """The shape and dtype of a pair start (a join's: its output's)."""
    return tensor_signature(start.join if isinstance(start, JoinedStart) else start)


@dataclass
class Partition:
    head: set[fx.Node]
    cached: set[fx.Node]
    after: set[fx.Node]
    indicator: fx.Node | None
    indicator_base: fx.Node | JoinedStart | None  # when set, the head returns ``indicator - indicator_base``
    pairs: list[tuple[fx.Node | JoinedStart | ValueStart, fx.Node]]  # stack: (value at boundary a, at boundary b)
    observed: list[fx.Node]
    exported: list[fx.Node]  # head values the variants read, in graph order
    part_outputs: list[fx.Node] = dataclasses.field(default_factory=list)  # block: the block parts' outputs cached
    predicted: set[fx.Node] = dataclasses.field(default_factory=set)  # block: nodes a reuse call drops
    span: tuple[int, int] = (0, 0)  # block boundaries (a, b): blocks [0, a) head, [a, b) cached, [b, N) after

    @property
    def rest(self) -> set[fx.Node]:
        return self.cached | self.after


def _direct(structure: DenoiserStructure, starts: list[fx.Node], end: fx.Node, taken: set) -> fx.Node | None:
    """The first start not taken with ``end``'s shape and dtype that is ``end`` or one of its ancestors."""
    ancestors = ancestors_within(structure.dataflow, [end], set(structure.dataflow.nodes))
    return next((s for s in starts if s not in taken and s in ancestors
                 and tensor_signature(s) == tensor_signature(end)), None)


def _joined(structure: DenoiserStructure, starts: list[fx.Node], end: fx.Node, taken: set,
            not_before: int) -> JoinedStart | None:
    """``end``'s partner through a join of the stream (graph order: the first that pairs) made at or
    after position ``not_before`` (boundary ``a``): the join applied to its inputs' partners."""
    order = structure.order
    ancestors = ancestors_within(structure.dataflow, [end], set(structure.dataflow.nodes))
    for join in structure.joins:
        if join not in ancestors or order[join] < not_before or tensor_signature(join) != tensor_signature(end):
            continue
        parts: list[fx.Node] = []
        for value in join_parts(join):
            partner = _direct(structure, starts, value, taken | set(parts))
            if partner is None:
                break
            parts.append(partner)
        else:
            return JoinedStart(join, tuple(parts))
    return None


def _pair(structure: DenoiserStructure, starts: list[fx.Node], ends: list[fx.Node], not_before: int = 0) -> list[tuple]:
    """Each end with its partner among ``starts`` (graph order, each start taken once); the ends left
    without one, with a :class:`JoinedStart` of a join at or after ``not_before``."""
    pairs, taken = {}, set()
    for end in ends:
        match = _direct(structure, starts, end, taken)
        if match is not None:
            taken.add(match)
            pairs[end] = match
    for end in ends:
        if end in pairs:
            continue
        match = _joined(structure, starts, end, taken, not_before)
        if match is None:
            raise UnsupportedStructure(
                f"the value {end.name!r} leaving the cached blocks has no partner of the same shape "
                "entering them, so no residual can be cached for it"
            )
        taken.update(match.parts)
        pairs[end] = match
    return [(pairs[end], end) for end in ends]


def cut(structure: DenoiserStructure, requirements: Requirements) -> Partition:
    """Stage ``partition``: the three spans, the indicator and, at granularity ``stack``, the residual
    pairs; the block parts (granularity ``block``), the observed tensors and the exported values are
    added by :func:`add_block_parts`, :func:`observed_tensors` and :func:`add_exports`."""
    if structure.unet is not None:
        return _unet_cut(structure, requirements)
    n = len(structure.blocks)
    a, b = requirements.compute_first, n - requirements.compute_last
    if not 0 <= a < b <= n:
        raise UnsupportedStructure(
            f"the policy computes {requirements.compute_first} first and {requirements.compute_last} last "
            f"blocks always, which leaves nothing to cache in a stack of {n}"
        )
    order = structure.order
    pos_a, pos_b = structure.boundary_position(a), structure.boundary_position(b)
    head = set(structure.prologue) | {x for x in structure.body if order[x] < pos_a}

    indicator = indicator_base = None
    if requirements.indicator == "front_residual":
        if a == 0:
            raise UnsupportedStructure("indicator 'front_residual' needs compute_first >= 1 (blocks run before it)")
        # the first boundary tensor (under dynamic shapes a SymInt can cross the boundary before it)
        boundary = structure.boundary_values(a)
        indicator = next((v for v in boundary if is_tensor(v)), boundary[0])
        indicator_base = _pair(structure, structure.boundary_values(0), [indicator])[0][0]
        head |= ancestors_within(structure.dataflow, [indicator, *start_nodes(indicator_base)], structure.body)
    elif requirements.indicator is not None:
        indicator = structure.indicators.get(requirements.indicator)
        if indicator is None:
            found = ", ".join(sorted(structure.indicators)) or "none"
            raise UnsupportedStructure(
                f"the policy needs the indicator {requirements.indicator!r}, which this model does not "
                f"provide (found: {found})"
            )
        head |= ancestors_within(structure.dataflow, [indicator], structure.body)

    cached = {x for x in structure.body if pos_a <= order[x] < pos_b} - head
    after = ({x for x in structure.body if order[x] >= pos_b} | set(structure.epilogue)) - head
    pairs = []
    if requirements.reconstruction.granularity != "block":
        pairs = _pair(structure, structure.boundary_values(a), structure.boundary_values(b), pos_a)
    return Partition(head=head, cached=cached, after=after, indicator=indicator,
                     indicator_base=indicator_base, pairs=pairs, observed=[], exported=[], span=(a, b))


def _unet_cut(structure: DenoiserStructure, requirements: Requirements) -> Partition:
    """A U-Net's partition: the analysis' regions (head: prologue; cached: the deep part; after: what the
    deep feature feeds) and one value pair, the deep feature itself (DeepCache)."""
    name = "a U-Net (no block stack; its deep feature is cached as a value)"
    if requirements.compute_first or requirements.compute_last:
        raise UnsupportedStructure(
            f"the policy computes {requirements.compute_first} first and {requirements.compute_last} last blocks "
            f"always, which {name} cannot do: use a policy that computes no blocks always (interval, taylorseer, "
            "teacache on the timestep embedding, ...)")
    if requirements.reconstruction.granularity != "stack":
        raise UnsupportedStructure(
            f"granularity {requirements.reconstruction.granularity!r} predicts block parts, which {name} does not "
            "have; use granularity='stack'")
    head = set(structure.prologue)
    indicator = None
    if requirements.indicator is not None:
        indicator = structure.indicators.get(requirements.indicator)
        if indicator is None:
            found = ", ".join(sorted(structure.indicators)) or "none"
            raise UnsupportedStructure(
                f"the policy needs the indicator {requirements.indicator!r}, which {name} does not provide "
                f"(found: {found})")
        head |= ancestors_within(structure.dataflow, [indicator], structure.body)
    cached = set(structure.body) - head
    after = set(structure.epilogue) - head
    deep = structure.deep_feature
    if deep not in cached:
        raise UnsupportedStructure(
            f"the U-Net's deep feature {deep.name!r} is computed before the cache decision (the policy's indicator "
            "needs it), so nothing is left to cache")
    return Partition(head=head, cached=cached, after=after, indicator=indicator, indicator_base=None,
                     pairs=[(VALUE, deep)], observed=[], exported=[], span=(0, 0))


def add_block_parts(structure: DenoiserStructure, partition: Partition,
                    requirements: Requirements) -> list[BlockPart]:
    """Stage ``block_parts`` (granularity ``block`` only): the predictable parts of the cached blocks;
    their outputs become the cache writes (``partition.part_outputs``), their nodes what a reuse drops."""
    if requirements.reconstruction.granularity != "block":
        return []
    a, b = partition.span
    parts = find_block_parts(structure, a, b, partition.cached)
    partition.part_outputs = [n for p in parts for n in p.outputs]
    partition.predicted = set().union(*(p.nodes for p in parts))
    if not partition.part_outputs:
        raise UnsupportedStructure(
            "granularity 'block' found no attention or feed-forward sub-module to predict in the "
            "cached blocks (no child module doing matrix work on the residual stream); use "
            "granularity='stack'"
        )
    return parts


def observed_tensors(structure: DenoiserStructure, requirements: Requirements) -> list[fx.Node]:
    """Stage ``features``: the nodes of the tensors named in ``Requirements.observe`` (an optional one the
    model lacks, ``Requirements.optional``, is left out: it is one of the last)."""
    out = []
    for name in requirements.observe:
        try:
            out.append(resolve_feature(structure, name))
        except UnsupportedStructure:
            if name not in requirements.optional:
                raise
            break
    return out


def add_exports(structure: DenoiserStructure, partition: Partition) -> None:
    """Stage ``exports``: the head values the variants read (graph order): every head value with a
    user outside the head, and the pair starts and observed tensors the head computes."""
    head = partition.head
    needed_by_variants = {n for s, _ in partition.pairs for n in start_nodes(s)} | set(partition.observed)
    partition.exported = sorted(
        {x for x in head if any(u not in head for u in x.users)}
        | {x for x in needed_by_variants if x in head},
        key=structure.order.__getitem__,
    )


def partition(structure: DenoiserStructure, requirements: Requirements) -> Partition:
    """The stages ``partition``, ``block_parts``, ``features`` and ``exports`` in one call."""
    partition = cut(structure, requirements)
    add_block_parts(structure, partition, requirements)
    partition.observed = observed_tensors(structure, requirements)
    add_exports(structure, partition)
    return partition
