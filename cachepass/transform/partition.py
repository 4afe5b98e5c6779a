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
from ..analysis.structure import DenoiserStructure
from ..analysis.values import is_tensor, tensor_signature
from ..errors import UnsupportedStructure
from ..policies.base import Requirements


@dataclass
class Partition:
    head: set[fx.Node]
    cached: set[fx.Node]
    after: set[fx.Node]
    indicator: fx.Node | None
    indicator_base: fx.Node | None  # when set, the head returns ``indicator - indicator_base``
    pairs: list[tuple[fx.Node, fx.Node]]  # stack: (value at boundary a, value at boundary b)
    observed: list[fx.Node]
    exported: list[fx.Node]  # head values the variants read, in graph order
    part_outputs: list[fx.Node] = dataclasses.field(default_factory=list)  # block: the block parts' outputs cached
    predicted: set[fx.Node] = dataclasses.field(default_factory=set)  # block: nodes a reuse call drops
    span: tuple[int, int] = (0, 0)  # block boundaries (a, b): blocks [0, a) head, [a, b) cached, [b, N) after

    @property
    def rest(self) -> set[fx.Node]:
        return self.cached | self.after


def _pair(structure: DenoiserStructure, starts: list[fx.Node], ends: list[fx.Node]) -> list[tuple]:
    pairs, taken = [], set()
    for end in ends:
        ancestors = ancestors_within(structure.dataflow, [end], set(structure.dataflow.nodes))
        match = next((s for s in starts if s not in taken and s in ancestors
                      and tensor_signature(s) == tensor_signature(end)), None)
        if match is None:
            raise UnsupportedStructure(
                f"the value {end.name!r} leaving the cached blocks has no partner of the same shape "
                "entering them, so no residual can be cached for it"
            )
        taken.add(match)
        pairs.append((match, end))
    return pairs


def cut(structure: DenoiserStructure, requirements: Requirements) -> Partition:
    """Stage ``partition``: the three spans, the indicator and, at granularity ``stack``, the residual
    pairs; the block parts (granularity ``block``), the observed tensors and the exported values are
    added by :func:`add_block_parts`, :func:`observed_tensors` and :func:`add_exports`."""
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
        head |= ancestors_within(structure.dataflow, [indicator, indicator_base], structure.body)
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
        pairs = _pair(structure, structure.boundary_values(a), structure.boundary_values(b))
    return Partition(head=head, cached=cached, after=after, indicator=indicator,
                     indicator_base=indicator_base, pairs=pairs, observed=[], exported=[], span=(a, b))


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
    """Stage ``features``: the nodes of the tensors named in ``Requirements.observe``."""
    return [resolve_feature(structure, name) for name in requirements.observe]


def add_exports(structure: DenoiserStructure, partition: Partition) -> None:
    """Stage ``exports``: the head values the variants read (graph order): every head value with a
    user outside the head, and the pair starts and observed tensors the head computes."""
    head = partition.head
    needed_by_variants = {s for s, _ in partition.pairs} | set(partition.observed)
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
