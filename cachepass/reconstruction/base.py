"""How a skipped call rebuilds what it skipped: the graph side and the cache side together.

A reconstruction owns both halves so they cannot disagree: ``predict`` adds the cache-read
placeholders and the nodes that predict each cached tensor to the reuse variant's graph, and
``new_cache`` makes the runtime object that stores what compute calls wrote and feeds those
placeholders on reuse calls.

What is cached depends on the ``granularity``:

* ``stack``: the residual ``out - in`` of the cached block span, one per residual-stream tensor; the
  reuse variant adds the prediction to the span's input;
* ``block``: the outputs of every block's expensive parts (attention, feed-forward; see
  :mod:`cachepass.analysis.block_parts`); the reuse variant substitutes the predictions for those
  parts and recomputes the rest of each block (norms, modulation, gates) with the current inputs.

Invariant: ``len(cache.read(...))`` equals the number of placeholders ``predict`` created, and each
tensor read has the dtype, device and layout of its placeholder's example (compiled pieces may assume
them). :func:`check_cache_layout` checks it once per graph, when the variants are built, by writing
empty stand-ins of the cache writes into a fresh cache and reading them back: nothing is checked per
call.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.fx as fx

from ..errors import UnsupportedStructure


class ReuseCache(ABC):
    """Runtime storage of one branch's cached tensors."""

    @abstractmethod
    def write(self, residuals: Sequence[torch.Tensor], step: int) -> None:
        """Record a computed call's cache writes: the span residuals (``stack``) or the block parts'
        outputs (``block``), in the compute variant's order."""

    @abstractmethod
    def read(self, step: int) -> list[torch.Tensor]:
        """The tensors the reuse variant's cache placeholders take, for a reuse call at ``step``."""

    @abstractmethod
    def ready(self) -> bool:
        """Whether a reuse call can be served (something was written)."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes held by this cache."""

    def note_time(self, step: int, timestep: float | None) -> None:
        """The call at ``step`` runs at ``timestep`` (``None`` when unknown): told before every ``write`` /
        ``read`` of that call, for predictions in real time (:mod:`cachepass.reconstruction.foca`). Ignored by
        default."""


GRANULARITIES = ("stack", "block")

#: The prefix of the name of every node cachepass adds to a graph variant (the variants' own nodes and a
#: reconstruction's placeholders and prediction nodes): a copied node keeps its original name, so no
#: added node takes one and a graph dump reads unambiguously (``cp_cached_0``, ``cp_residual_add_7``).
ADDED_PREFIX = "cp_"


class Reconstruction(ABC):
    """A way of predicting the cached tensors of a skipped call from what compute calls stored."""

    name: str
    granularity: str

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")

    @abstractmethod
    def predict(
        self,
        graph: fx.Graph,
        examples: Sequence[object],
        add_placeholder: Callable[[str, object], fx.Node],
    ) -> list[fx.Node]:
        """Add cache-read placeholders and the nodes predicting each cached tensor (``examples``: their
        example values, in cache-write order); return one prediction node per cached tensor. Name every
        node added ``ADDED_PREFIX + ...`` (``add_placeholder(name, example)`` takes the full name; a node
        made with ``graph.call_function(..., name=...)``)."""

    @abstractmethod
    def new_cache(self) -> ReuseCache:
        """A fresh cache for one branch."""


def _tensor_nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class _LastResidualCache(ReuseCache):
    def __init__(self) -> None:
        self.residuals: list[torch.Tensor] | None = None

    def write(self, residuals, step):
        self.residuals = list(residuals)

    def read(self, step):
        if self.residuals is None:
            raise RuntimeError("cachepass: reuse before any compute: the runtime must compute first")
        return self.residuals

    def ready(self):
        return self.residuals is not None

    def nbytes(self):
        return _tensor_nbytes(self.residuals or ())


@dataclass(frozen=True)
class ResidualReuse(Reconstruction):
    """Reuse the last computed value as it is (``stack``: ``out = in + (out_last - in_last)``)."""

    name: str = "residual"
    granularity: str = "stack"

    def predict(self, graph, examples, add_placeholder):
        return [add_placeholder(f"{ADDED_PREFIX}cached_{i}", example) for i, example in enumerate(examples)]

    def new_cache(self):
        return _LastResidualCache()


def _stand_in(example: torch.Tensor) -> torch.Tensor:
    """A tensor of no elements with ``example``'s dtype, device and layout."""
    return torch.empty((0,), dtype=example.dtype, device=example.device, layout=example.layout)


def check_cache_layout(reconstruction: Reconstruction, writes: Sequence[fx.Node],
                       placeholders: Sequence[fx.Node]) -> None:
    """The invariant of the module docstring, checked once when the variants are built: a fresh cache
    that stored the compute variant's ``writes`` (their example values, as empty stand-ins) reads back
    one tensor per cache placeholder of the reuse variant (``placeholders``, those ``predict``
    created), each with the dtype, device and layout of the placeholder's example. Raises
    :class:`UnsupportedStructure` naming the reconstruction and the placeholders."""
    examples = [w.meta.get("example_value", w.meta.get("val")) for w in writes]
    if not all(isinstance(e, torch.Tensor) for e in examples):
        return  # nothing to stand in for a non-tensor write: only tensors reach a cache
    name = getattr(reconstruction, "name", type(reconstruction).__name__)
    try:
        stand_ins = [_stand_in(e) for e in examples]
    except Exception:  # a layout or device that has no empty tensor: nothing to check it with
        return
    cache = reconstruction.new_cache()
    try:
        cache.write(stand_ins, 0)
        read = list(cache.read(1))
    except Exception as exc:
        raise UnsupportedStructure(
            f"reconstruction {name!r}: its cache fails on the compute variant's cache writes "
            f"({', '.join(repr(w.name) for w in writes) or 'none'}): {type(exc).__name__}: {exc}") from exc
    if len(read) != len(placeholders):
        raise UnsupportedStructure(
            f"reconstruction {name!r}: its cache reads {len(read)} tensor(s) but predict made "
            f"{len(placeholders)} cache placeholder(s) ({', '.join(repr(p.name) for p in placeholders) or 'none'}) "
            f"for the cache writes {', '.join(repr(w.name) for w in writes) or 'none'}")
    for placeholder, value in zip(placeholders, read):
        example = placeholder.meta.get("example_value", placeholder.meta.get("val"))
        if not isinstance(example, torch.Tensor):
            continue
        if not isinstance(value, torch.Tensor):
            raise UnsupportedStructure(
                f"reconstruction {name!r}: its cache reads a {type(value).__name__} for the tensor "
                f"placeholder {placeholder.name!r}")
        for attr in ("dtype", "device", "layout"):
            if getattr(value, attr) != getattr(example, attr):
                raise UnsupportedStructure(
                    f"reconstruction {name!r}: its cache reads a tensor of {attr} {getattr(value, attr)} for the "
                    f"placeholder {placeholder.name!r}, whose example has {attr} {getattr(example, attr)}")
