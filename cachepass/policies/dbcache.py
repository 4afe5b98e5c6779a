"""``dbcache``: First-Block-Cache generalised to ``Fn`` front and ``Bn`` back blocks (cache-dit).

The first ``Fn`` blocks and the last ``Bn`` blocks run on every call; the middle span is cached. The
indicator is the front blocks' residual (stream at boundary ``Fn`` minus stream entering block 0,
cache-dit's ``Fn`` residual): the call reuses while its relative L1 change against the last computed
call stays under ``threshold``. A reuse call rebuilds the
middle span from its cached residual, or by a Taylor prediction of it with ``taylor=order``.
Defaults follow cache-dit (F1B0, 8 warmup steps; its headline settings are F8B0 and F4B0 on 57-block
FLUX; a stack must keep at least one block between the front and back ones) except the threshold:
0.12, not 0.08, which computes 31 of 50 steps on the embedded model (docs/policies.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..reconstruction import MAX_ORDER, Reconstruction, ResidualReuse, TaylorReuse
from .base import MAX_BLOCKS, Requirements, check_int, check_optional_int
from .fbcache import FBCacheConfig, FBCachePolicy


@dataclass(frozen=True)
class DBCacheConfig(FBCacheConfig):
    Fn: int = 1
    Bn: int = 0
    taylor: int | None = None  # Taylor order of the reconstruction; None: plain residual reuse
    warmup: int = 8
    threshold: float = 0.12

    def validate(self) -> None:
        super().validate()
        check_int("Fn", self.Fn, minimum=1, maximum=MAX_BLOCKS)
        check_int("Bn", self.Bn, minimum=0, maximum=MAX_BLOCKS)
        check_optional_int("taylor", self.taylor, minimum=1, maximum=MAX_ORDER)


class DBCachePolicy(FBCachePolicy):
    name = "dbcache"
    config_class = DBCacheConfig
    examples = {
        "tiny": {"Fn": 1, "Bn": 1, "warmup": 2, "threshold": 0.05, "taylor": 1},
        "sequence_parallel": {"Fn": 1, "Bn": 1, "warmup": 2, "threshold": 0.45},
    }

    def reconstruction(self) -> Reconstruction:
        return ResidualReuse() if self.config.taylor is None else TaylorReuse(order=self.config.taylor)

    def requirements(self) -> Requirements:
        c = self.config
        return Requirements(indicator="front_residual", compute_first=c.Fn, compute_last=c.Bn,
                            reconstruction=self.reconstruction())
