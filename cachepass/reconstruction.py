"""How a skipped call rebuilds the block stack's outputs: the graph side and the cache side together.

A reconstruction owns both halves so they cannot disagree: ``build`` adds the cache-read nodes to the
reuse variant's graph (one placeholder group per residual-stream tensor), and ``new_cache`` makes the
runtime object that stores what compute calls wrote and feeds those placeholders on reuse calls.

Invariant: ``len(cache.read(...))`` equals the number of placeholders ``build`` created.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.fx as fx


class ReuseCache(ABC):
    """Runtime storage of one stream's cached tensors."""

    @abstractmethod
    def write(self, residuals: Sequence[torch.Tensor], step: int) -> None:
        """Record the body residuals (``out - in`` per residual-stream tensor) of a computed call."""

    @abstractmethod
    def read(self, step: int) -> list[torch.Tensor]:
        """The tensors the reuse variant's cache placeholders take, for a reuse call at ``step``."""

    @abstractmethod
    def ready(self) -> bool:
        """Whether a reuse call can be served (something was written)."""

    @abstractmethod
    def nbytes(self) -> int:
        """Bytes held by this cache."""


class Reconstruction(ABC):
    """A way of rebuilding body outputs from body inputs and cached tensors."""

    name: str

    @abstractmethod
    def build(
        self,
        graph: fx.Graph,
        stream_inputs: Sequence[fx.Node],
        add_placeholder: Callable[[str, object], fx.Node],
    ) -> list[fx.Node]:
        """Add cache-read placeholders and reconstruction nodes; return the rebuilt body outputs."""

    @abstractmethod
    def new_cache(self) -> ReuseCache:
        """A fresh cache for one stream."""


def _tensor_nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


class _LastResidualCache(ReuseCache):
    def __init__(self) -> None:
        self.residuals: list[torch.Tensor] | None = None

    def write(self, residuals, step):
        self.residuals = list(residuals)

    def read(self, step):
        assert self.residuals is not None, "reuse before any compute: the runtime must compute first"
        return self.residuals

    def ready(self):
        return self.residuals is not None

    def nbytes(self):
        return _tensor_nbytes(self.residuals or ())


@dataclass(frozen=True)
class ResidualReuse(Reconstruction):
    """Reuse the last computed residual: ``out = in + (out_last - in_last)``."""

    name: str = "residual"

    def build(self, graph, stream_inputs, add_placeholder):
        outputs = []
        for i, x in enumerate(stream_inputs):
            residual = add_placeholder(f"cached_residual_{i}", x.meta.get("example_value"))
            out = graph.call_function(operator.add, (x, residual))
            out.meta["example_value"] = x.meta.get("example_value")
            outputs.append(out)
        return outputs

    def new_cache(self):
        return _LastResidualCache()
