"""Identical cache decisions on every rank of a sequence-parallel model.

Under sequence parallelism (Ulysses, ring attention, diffusers' context parallelism, xDiT) each rank
holds a shard of the tokens, so a statistic computed from its own shard differs from its neighbours'.
Ranks that decide differently run different compiled variants: one enters the blocks' collectives
while another skips them, and the job hangs or silently mixes unrelated collectives.

Policies therefore express every statistic a decision reads as a *sum* over elements (for example
``sum|now - before|`` and ``sum|before|``), stack all of one decision's sums into one small tensor and
hand it to :meth:`DecisionSync.reduce`. Summed over the process group, the ratio they form is the
statistic of the whole sequence, not an average of per-rank ratios; a statistic every rank holds whole
(the timestep embedding) is multiplied by the world size on both sides of its ratio, which leaves it
unchanged. One ``all_reduce`` per decision, whatever the number of statistics; nothing else crosses
ranks (the caches stay local: each rank caches its own shard).
"""

from __future__ import annotations

from typing import Any

import torch

from .._logging import get_logger
from ..errors import OptionError

log = get_logger("cachepass.distributed")  # the name users filter on

_announced: set[int] = set()  # world sizes already logged: one line per process, not per graph


def validate_sync_options(sync: Any, process_group: Any) -> bool | str:
    """Check the ``sync`` and ``process_group`` options (see :class:`DecisionSync`); the ``sync`` value to use
    (a ``numpy.bool_`` made a ``bool``)."""
    import numpy as np

    if isinstance(sync, np.bool_):
        sync = bool(sync)
    if not (sync is True or sync is False or (isinstance(sync, str) and sync == "auto")):
        from ..policies.base import show

        raise OptionError(
            "option 'sync' must be 'auto' (sum decision statistics over the ranks when torch.distributed "
            f"runs more than one), True (always; fail if it is not initialised) or False (each rank decides "
            f"alone, for data-parallel serving); got {show(sync)}"
        )
    if process_group is None:
        return sync
    if sync is False:
        raise OptionError("option 'process_group' has no effect with sync=False: drop one of them")
    import torch.distributed as dist

    if not dist.is_available() or not isinstance(process_group, dist.ProcessGroup):
        from ..policies.base import show

        raise OptionError(
            "option 'process_group' must be a torch.distributed ProcessGroup (the group the model's tokens are "
            f"sharded over, e.g. a device mesh's mesh.get_group()) or None for the default group; got "
            f"{show(process_group)}"
        )
    return sync


class DecisionSync:
    """Sums a decision's statistics over the ranks that must decide together.

    ``mode``: ``"auto"`` sums when ``torch.distributed`` is initialised and the group has more than one
    rank; ``True`` does the same but raises if it is not initialised; ``False`` never communicates.
    ``group``: the process group (``None``: the default group). The group is looked up at the first
    decision, not at construction, since models are often compiled before the process group exists.
    """

    def __init__(self, mode: bool | str = "auto", group: Any = None) -> None:
        self.mode = mode
        self.group = group
        self._world: int | None = None if mode is not False else 1

    @property
    def world_size(self) -> int:
        """How many ranks decide together (1: this rank alone)."""
        if self._world is None:
            self._world = self._resolve()
        return self._world

    def _resolve(self) -> int:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            if self.mode is True:
                raise RuntimeError(
                    "cachepass: sync=True but torch.distributed is not initialised; call "
                    "torch.distributed.init_process_group() before the first denoiser call, or pass sync='auto'"
                )
            return 1
        world = dist.get_world_size(self.group)
        if world > 1 and world not in _announced:
            _announced.add(world)
            log.info(
                "cachepass: cache decisions are synchronised over %d ranks (one all_reduce of the statistics "
                "per decision); pass sync=False if the ranks run different prompts (data-parallel serving)",
                world,
            )
        return world

    def reduce(self, stats: torch.Tensor) -> torch.Tensor:
        """``stats`` summed over the group (in place when it communicates); unchanged on one rank."""
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.group)
        return stats


#: The decision statistics of a single process: reduce is the identity.
LOCAL = DecisionSync(False)
