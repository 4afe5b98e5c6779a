"""Pass ``partition``: decide which nodes run before the cache decision and which after.

Reads a :class:`DenoiserStructure` and a policy's :class:`Requirements`; writes a :class:`Partition`.

* ``head``: everything before the body, plus the body nodes the requested indicator depends on
  (for ``modulated_input`` a few nodes of block 0; for ``first_block_output`` all of block 0);
* ``rest``: the remaining body nodes and the tail: what a compute call runs after the decision;
* ``tail``: what a reuse call runs after rebuilding the body outputs from the cache.

Invariant: ``head`` is closed under ancestors (it never needs a node of ``rest``), so the head graph
can run alone and its outputs feed both variants.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from ..analysis.dataflow import ancestors_within
from ..analysis.structure import DenoiserStructure
from ..errors import UnsupportedStructure
from ..policies.base import Requirements


@dataclass
class Partition:
    head: set[fx.Node]
    rest: set[fx.Node]
    tail: set[fx.Node]
    indicator: fx.Node | None
    exported: list[fx.Node]  # head values the variants read, in graph order


def partition(structure: DenoiserStructure, requirements: Requirements) -> Partition:
    indicator = None
    head = set(structure.head)
    if requirements.indicator is not None:
        indicator = structure.indicators.get(requirements.indicator)
        if indicator is None:
            found = ", ".join(sorted(structure.indicators)) or "none"
            raise UnsupportedStructure(
                f"the policy needs the indicator {requirements.indicator!r}, which this model does not "
                f"provide (found: {found})"
            )
        head |= ancestors_within(structure.dataflow, [indicator], structure.body)
    rest = (structure.body | structure.tail) - head
    order = structure.order
    stream_inputs = {s.input for s in structure.stream if s.input.op != "placeholder"}
    exported = sorted(
        {n for n in head if any(u not in head for u in n.users)} | stream_inputs,
        key=order.__getitem__,
    )
    return Partition(head=head, rest=rest, tail=set(structure.tail), indicator=indicator, exported=exported)
