"""``adacache``: after each computed step, choose how many steps to reuse from how much a feature moved.

AdaCache (arXiv 2411.02397), as the reference implements it for Wan2.1. On every computed step of a
branch the policy reads one body feature (default: the middle block's self-attention output) and
compares it with the previous computed step's:

* ``d = |prev - now|_1 / |prev|_1``, divided by the gap between the two computed steps;
* motion regularisation for steps in ``[int(0.1 N), int(0.9 N)]`` (``s`` = tokens per frame):
  ``mo = |r[s:] - r[:-s]|_1 / (|r[s:]|_1 + |r[:-s]|_1)``, ``moreg = (mo / 0.385)^8`` (1 outside the
  window), ``mograd = 10 (moreg - prev_moreg) / gap``, ``moreg += |mograd|``, ``d *= moreg``;
* the codebook maps ``d`` to the next interval: the first upper bound above ``d`` wins (else the last).

The branch then reuses the cached residual until that interval has elapsed. The ``warmup`` first
steps (``0, 1``) and the ``final_steps`` last ones are computed (the last ones only when the step
count is known; motion regularisation too, since its window is a fraction of it).

Tokens per frame come from the latent's shape (``frame_grid`` feature); the reference hard-codes the
model width (1536), which is a defect. ``tokens_per_frame=`` overrides, for models whose latent the
analysis does not find. A model without such a latent (an image model) runs without the motion term,
and one warning on the ``cachepass`` logger says so and what to pass.

Under sequence parallelism (:mod:`cachepass.runtime.distributed`) all sums of one step travel in one
``all_reduce``. The distance is exact (the whole sequence's). The motion term pairs token ``i`` with
``i + s``; a pair whose tokens sit on two ranks is not seen by either (exchanging them would move
activations, not statistics), so ``mo`` is the same formula over the pairs that lie within one rank's
shard: ``(world - 1) * s`` of the ``L - s`` pairs per channel are left out (none on one process).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .._logging import get_logger, warn_once
from ..analysis.features import BLOCK_FEATURE
from ..errors import OptionError
from .base import (
    MAX_CODEBOOK,
    MAX_STEPS,
    MAX_TOKENS,
    CallContext,
    Invalid,
    Policy,
    PolicyConfig,
    Requirements,
    check_bool,
    check_int,
    check_optional_int,
    finite_number,
    integer,
    is_forced_step,
    show,
)
from .distance import l1_ratio, l1_sums

log = get_logger(__name__)

CODEBOOK_100 = {0.03: 12, 0.05: 10, 0.07: 8, 0.09: 6, 0.11: 4, 1.0: 3}
CODEBOOK_30_FAST = {0.08: 6, 0.16: 5, 0.24: 4, 0.32: 3, 0.40: 2, 1.0: 1}
CODEBOOK_30_SLOW = {0.08: 3, 0.16: 2, 0.24: 1, 0.32: 1, 0.40: 1, 1.0: 1}


def interpolate_codebook(a: dict, steps_a: int, b: dict, steps_b: int, steps: int) -> dict:
    """Entry-wise geometric interpolation between two codebooks of the same length, at ``steps``
    placed on a log scale between ``steps_a`` and ``steps_b``. Bounds round to 2 decimals, intervals
    to the nearest integer (at least 1)."""
    u = math.log(steps_a / steps) / math.log(steps_a / steps_b)
    out = {}
    for (ta, ia), (tb, ib) in zip(a.items(), b.items()):
        bound = round(ta ** (1 - u) * tb**u, 2)
        out[bound] = max(1, round(ia ** (1 - u) * ib**u))
    return out


#: No 50-step codebook was published: interpolated between the 100- and the 30-step (fast) ones.
CODEBOOK_50 = interpolate_codebook(CODEBOOK_100, 100, CODEBOOK_30_FAST, 30, 50)

CODEBOOKS = {"100": CODEBOOK_100, "50": CODEBOOK_50, "30-fast": CODEBOOK_30_FAST, "30-slow": CODEBOOK_30_SLOW}
CODEBOOK_STEPS = {"100": 100, "50": 50, "30-fast": 30}

MOREG_SCALE, MOREG_POWER, MOGRAD_MUL = 0.385, 8, 10.0
MOREG_WINDOW = (0.1, 0.9)


def auto_codebook(num_steps: int | None) -> dict:
    """The codebook made for the nearest step count (log scale); 50 steps when unknown."""
    if num_steps is None:
        return CODEBOOK_50
    name = min(CODEBOOK_STEPS, key=lambda k: abs(math.log(num_steps / CODEBOOK_STEPS[k])))
    return CODEBOOKS[name]


@dataclass(frozen=True)
class AdaCacheConfig(PolicyConfig):
    feature: str = "attention_output:middle"
    codebook: Any = "auto"  # "auto", a name in CODEBOOKS, or {upper bound: interval}
    motion: bool = True
    tokens_per_frame: int | None = None  # None: read from the latent's shape
    warmup: int = 2
    final_steps: int = 2

    def validate(self) -> None:
        if not isinstance(self.feature, str) or not BLOCK_FEATURE.fullmatch(self.feature):
            raise OptionError(
                "option 'feature' must be 'block_output:K' or 'attention_output:K' (K an integer of at most 5 "
                f"digits, negative from the end, or 'middle'); got {show(self.feature)}"
            )
        check_bool("motion", self.motion)
        check_optional_int("tokens_per_frame", self.tokens_per_frame, minimum=1, maximum=MAX_TOKENS)
        check_int("warmup", self.warmup, minimum=1, maximum=MAX_STEPS)
        check_int("final_steps", self.final_steps, minimum=0, maximum=MAX_STEPS)
        self.resolved_codebook(None)

    def resolved_codebook(self, num_steps: int | None) -> dict:
        book = self.codebook
        if isinstance(book, str) and book == "auto":
            return auto_codebook(num_steps)
        if isinstance(book, str) and book in CODEBOOKS:
            return CODEBOOKS[book]
        if isinstance(book, dict) and 1 <= len(book) <= MAX_CODEBOOK:
            try:
                out = {finite_number(k, minimum=0.0, strict=True): integer(v, minimum=1, maximum=MAX_STEPS)
                       for k, v in book.items()}
            except Invalid:
                pass
            else:
                return dict(sorted(out.items()))
        raise OptionError(
            f"option 'codebook' must be 'auto', one of {', '.join(map(repr, CODEBOOKS))}, or a dict of 1 to "
            f"{MAX_CODEBOOK} entries {{distance upper bound, a finite number > 0: interval, an integer in "
            f"[1, {MAX_STEPS}]}}; got {show(book)}"
        )


@dataclass
class AdaCacheState:
    next_step: int = 0  # first step that computes again
    last_step: int | None = None  # last computed step
    previous: torch.Tensor | None = None  # the feature at the last computed step
    previous_moreg: float = 1.0
    intervals: list = field(default_factory=list)  # (step, distance, interval) per computed step


def codebook_interval(book: dict, distance: float) -> int:
    for bound, interval in book.items():
        if distance < bound:
            return interval
    return list(book.values())[-1]


def motion_sums(feature: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """``[|r[s:] - r[:-s]|_1, |r[s:]|_1 + |r[:-s]|_1, has_pairs]`` along the token axis (dim 1 of
    ``(B, L, C)``), as sums that add up across token shards; ``has_pairs`` is 0 when the tensor holds no
    token ``s`` apart from another (one frame, or a shard shorter than a frame)."""
    s = tokens_per_frame
    work = torch.promote_types(feature.dtype, torch.float32)
    r = feature.to(work)
    if r.dim() != 3 or s >= r.shape[1]:
        return r.new_zeros(3)
    later, earlier = r[:, s:], r[:, :-s]
    return torch.stack([(later - earlier).abs().sum(), later.abs().sum() + earlier.abs().sum(), r.new_ones(())])


def motion_ratio(num: float, den: float, has_pairs: float) -> float | None:
    """The motion score ``mo`` from (summed) :func:`motion_sums`; ``None`` when no pair was seen."""
    if has_pairs == 0:
        return None
    return num / den if den > 0 else 0.0


class AdaCachePolicy(Policy):
    name = "adacache"
    config_class = AdaCacheConfig
    examples = {
        "tiny": {},
        "image": {"motion": False},  # no video latent to count tokens per frame on
        # motion on, on the residual stream (token-local, so the churned half moves more): at step 1 the
        # distance is ~15 on rank 0's shard alone, ~110 on rank 1's, ~45 on the whole sequence; the
        # codebook's bounds put the two shards in different intervals
        "sequence_parallel": {"feature": "block_output:middle", "tokens_per_frame": 4, "warmup": 2,
                              "final_steps": 1, "codebook": {3.0: 3, 30.0: 2, 1e4: 1}},
    }

    def sequence_parallel_exact(self) -> bool:
        return not self.config.motion  # the motion term leaves out the token pairs across shards

    def requirements(self) -> Requirements:
        observe, optional = (self.config.feature,), ()
        if self.config.motion and self.config.tokens_per_frame is None:
            observe += ("frame_grid",)
            optional = ("frame_grid",)  # an image model has none: then no motion term (warned once)
        return Requirements(indicator=None, observe=observe, optional=optional)

    def new_state(self) -> AdaCacheState:
        return AdaCacheState()

    def decide(self, state: AdaCacheState, ctx: CallContext, indicator) -> bool:
        if is_forced_step(ctx, self.config.warmup, self.config.final_steps) or state.previous is None:
            return True
        return ctx.step >= state.next_step

    def after_compute(self, state: AdaCacheState, ctx: CallContext, observed: dict) -> None:
        feature = observed[self.config.feature].detach()
        previous, last_step = state.previous, state.last_step
        state.previous, state.last_step = feature.clone(), ctx.step
        if previous is None or last_step is None or ctx.step <= last_step:
            state.next_step = ctx.step + 1
            state.intervals.append((ctx.step, None, 1))
            return
        gap = ctx.step - last_step
        tokens = self._motion_tokens(ctx, observed)
        sums = [l1_sums(feature, previous)]
        if tokens is not None:
            sums.append(motion_sums(feature, tokens))
        stats = ctx.sync.reduce(torch.cat(sums)).tolist()  # one collective for every sum of this step
        distance = l1_ratio(*stats[:2]) / gap
        score = motion_ratio(*stats[2:]) if tokens is not None else None
        distance *= self._motion(state, score, gap)
        interval = codebook_interval(self.config.resolved_codebook(ctx.num_steps), distance)
        state.next_step = ctx.step + interval
        state.intervals.append((ctx.step, distance, interval))
        log.debug("adacache: branch %d step %d: distance %.4g -> next compute at step %d",
                  ctx.branch_index, ctx.step, distance, state.next_step)

    def _motion_tokens(self, ctx: CallContext, observed: dict) -> int | None:
        """Tokens per frame when this step's distance is motion-regularised, else ``None``."""
        if not self.config.motion or ctx.num_steps is None:
            return None
        lo, hi = (int(f * ctx.num_steps) for f in MOREG_WINDOW)
        if not lo <= ctx.step <= hi:
            return None
        if self.config.tokens_per_frame is not None:
            return self.config.tokens_per_frame
        grid = observed.get("frame_grid")
        if grid is None:
            warn_once(log, ("adacache-no-frames", self.config.feature),
                      "adacache: the model has no 5-d (batch, channels, frames, height, width) latent (an image "
                      "model?), so the motion term is off and the distance alone picks the intervals; pass "
                      "motion=False to say so, or tokens_per_frame=... to give the motion term its frame size")
            return None
        return int(grid.shape[-2] * grid.shape[-1])

    def _motion(self, state: AdaCacheState, score: float | None, gap: int) -> float:
        moreg = 1.0 if score is None else (score / MOREG_SCALE) ** MOREG_POWER
        mograd = MOGRAD_MUL * (moreg - state.previous_moreg) / gap
        state.previous_moreg = moreg
        return moreg + abs(mograd)
