"""A sequence-parallel DiT of our own, for the distributed tests (no accelerator needed).

Each rank holds a contiguous shard of the tokens. Attention computes queries for the local tokens and
all-gathers keys and values over the process group (one functional collective per block, which Dynamo
traces into the graph without a break), so every rank's output rows equal the rows one process would
compute over the whole sequence. With ``group=None`` the same module runs the whole sequence in one
process: the reference the sharded run is compared against.

The shape mirrors a video DiT: patch tokens, a sin/cos timestep embedding through an MLP, AdaLN
modulation of every block, blocks in an ``nn.ModuleList``; the analysis finds the stack, the timestep
and the indicators as it does on diffusers' models.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tiny_models import PlainDiT
from torch import nn


class GatheredAttention(nn.Module):
    """Self-attention over the whole sequence from a token shard: keys and values are all-gathered."""

    def __init__(self, dim: int, heads: int, group=None) -> None:
        super().__init__()
        self.heads = heads
        self.group = group
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, kv = self.qkv(x).split([c, 2 * c], dim=-1)
        if self.group is not None:
            from torch.distributed._functional_collectives import all_gather_tensor

            kv = all_gather_tensor(kv.contiguous(), gather_dim=1, group=self.group)
        k, v = kv.chunk(2, dim=-1)
        q, k, v = (y.unflatten(-1, (self.heads, -1)).transpose(1, 2) for y in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class SPBlock(nn.Module):
    """AdaLN-modulated attention and MLP, each gated, on the residual stream."""

    def __init__(self, dim: int, heads: int, group=None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = GatheredAttention(dim, heads, group)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).unsqueeze(1).chunk(6, dim=-1)
        x = x + gate1 * self.attn(self.norm1(x) * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class SequenceParallelDiT(PlainDiT):
    """``PlainDiT`` whose blocks attend over the whole sequence from a shard: ``forward(x, t)`` takes
    ``x`` as ``(batch, tokens, channels)``, this rank's shard when ``group`` is set."""

    def __init__(self, channels: int = 4, dim: int = 32, depth: int = 4, heads: int = 2, group=None) -> None:
        super().__init__(channels, dim, depth, heads)
        self.layers = nn.ModuleList(SPBlock(dim, heads, group) for _ in range(depth))


def build(group=None, seed: int = 0) -> SequenceParallelDiT:
    """The same weights on every rank and in the single-process reference."""
    torch.manual_seed(seed)
    return SequenceParallelDiT(group=group).eval()


# --- the sampling loop and the per-rank worker of tests/test_distributed.py -------------------------

STEPS = 14
TOKENS = 32  # divisible by 2 and 4 ranks
TOKENS_PER_FRAME = 4  # 8 "frames" of 4 tokens, for adacache's motion term (its example's tokens_per_frame)
PROGRAM_LOGGER = "cachepass.runtime.program"  # logs each call's decision at debug level
CHURN = 0.1  # noise added to half of the tokens per step: shards change by different amounts
SPLIT_POLICY = "fbcache"  # the policy run on two sequence-parallel groups with different latents


def case(policy: str) -> dict:
    """The options ``policy`` runs with here: its declared ``sequence_parallel`` example (schedules on which
    the adaptive policies really skip within ``STEPS`` steps; default its ``tiny`` example)."""
    from cachepass import POLICIES
    from cachepass.policies.base import EXAMPLE_SEQUENCE_PARALLEL

    return POLICIES[policy].example(EXAMPLE_SEQUENCE_PARALLEL)


def initial_latent(seed: int = 0) -> torch.Tensor:
    """The full ``(1, TOKENS, 4)`` latent, the same in every process."""
    return torch.randn(1, TOKENS, 4, generator=torch.Generator().manual_seed(seed))


def denoise(call, x: torch.Tensor, steps: int = STEPS, churn: float = 0.0):
    """Euler steps of a flow-matching sampler, ``x <- x + (sigma_next - sigma) v``; ``call(x, t)`` returns
    the velocity of the whole sequence. Yields after every step (so a caller can record decisions).
    ``churn``: fresh noise of that scale added to the second half of the tokens after every step (the
    same in every process), so that the halves, hence the ranks' shards, change by different amounts."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    noise = torch.Generator().manual_seed(1)
    for i in range(steps):
        v = call(x, (sigmas[i] * 1000).reshape(1))
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        if churn:
            x[:, TOKENS // 2:] += churn * torch.randn(x[:, TOKENS // 2:].shape, generator=noise)
        yield x


class DecisionLog(logging.Handler):
    """Collects the runtime's per-call decisions (its debug log, written before the chosen variant runs),
    and appends each to ``path`` at once, so a rank killed inside a collective has still told its story."""

    def __init__(self, path: str | None = None) -> None:
        super().__init__(logging.DEBUG)
        self.path = path
        self.decisions: list[bool] = []

    def emit(self, record: logging.LogRecord) -> None:
        compute = record.getMessage().endswith("compute")
        self.decisions.append(compute)
        if self.path:
            with open(self.path, "a") as f:
                f.write("C" if compute else ".")

    def __enter__(self) -> "DecisionLog":
        logger = logging.getLogger(PROGRAM_LOGGER)
        self._level = logger.level
        logger.setLevel(logging.DEBUG)
        logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logger = logging.getLogger(PROGRAM_LOGGER)
        logger.removeHandler(self)
        logger.setLevel(self._level)


def run_policy(policy: str, options: dict, group=None, seed: int = 0, churn: float = CHURN,
               log_path: str | None = None) -> dict:
    """Sample with ``policy``, sequence-parallel over ``group`` (this rank's shard; the whole sequence in
    one process when ``group`` is None). Returns the final latent, the decision of every step (``True``:
    blocks computed), the steps ``cachepass.stats`` counts as computed and the fallback reason if any."""
    import torch.distributed as dist

    import cachepass

    rank, world = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))
    torch._dynamo.reset()  # a fresh compile per policy (one module, many backends)
    model = build(group)
    compiled = torch.compile(model, backend="cachepass",
                             options={"policy": policy, "inner": "eager", "num_steps": STEPS, **options})
    shard = TOKENS // world

    def call(x, t):
        out = compiled(x[:, rank * shard:(rank + 1) * shard].contiguous(), t)
        if group is None:
            return out
        parts = [torch.empty_like(out) for _ in range(world)]
        dist.all_gather(parts, out.contiguous(), group=group)
        return torch.cat(parts, dim=1)

    x = initial_latent(seed)
    with torch.no_grad(), DecisionLog(log_path) as decisions:
        for x in denoise(call, x, churn=churn):  # noqa: B007, B020 - runs the loop, keeps the last latent
            pass
    stats = cachepass.stats(model)
    return {"decisions": decisions.decisions, "x": x, "fallback": stats.fallback_reason,
            "computed_steps": stats.branches[0].computed_steps if stats.branches else None}


def shard_statistics(group) -> dict:
    """The summed statistics of fixed tensors from this rank's token shard (``cachepass.distributed``):
    the relative L1 and adacache's motion sums, for the test to compare with the whole tensors."""
    import torch.distributed as dist

    from cachepass.policies.adacache import motion_sums
    from cachepass.policies.distance import relative_l1
    from cachepass.runtime.distributed import DecisionSync

    now, before = statistic_tensors()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    n = now.shape[1] // world
    part = slice(rank * n, (rank + 1) * n)
    sync = DecisionSync("auto", group)
    return {"relative_l1": relative_l1(now[:, part], before[:, part], sync),
            "motion": sync.reduce(motion_sums(now[:, part], TOKENS_PER_FRAME)).tolist()}


def statistic_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    before = torch.randn(2, TOKENS, 8, generator=g)
    return before + 0.3 * torch.randn(2, TOKENS, 8, generator=g) * torch.linspace(0, 2, TOKENS)[:, None], before


def worker(rank: int, world: int, init_file: str, out_dir: str, policies: list, extra: dict, churn: float,
           timeout_s: float, split: bool = False) -> None:
    """One rank: join the gloo group, run every policy on the whole group, then (``split``) one policy
    on two half-size groups that sample different latents with ``process_group`` set to their own
    group. Saves ``rank{r}.pt``; each run's decisions also go to ``rank{r}-{label}.log`` as they are
    taken, so a rank that dies in a mismatched collective has still told what it decided."""
    import datetime
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    messages = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("cachepass.distributed").addHandler(handler)
    logging.getLogger("cachepass.distributed").setLevel(logging.INFO)
    world_group = dist.group.WORLD
    results = {"statistics": shard_statistics(world_group)}
    for policy in policies:
        results[policy] = run_policy(policy, {**case(policy), **extra}, world_group, 0, churn,
                                     os.path.join(out_dir, f"rank{rank}-{policy}.log"))
    if split:
        halves = [dist.new_group(list(range(i, i + world // 2))) for i in (0, world // 2)]
        index = 2 * rank // world
        results["split"] = run_policy(SPLIT_POLICY, {**case(SPLIT_POLICY), "process_group": halves[index]},
                                      halves[index], index, churn)
    torch.save({"results": results, "log": messages}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
