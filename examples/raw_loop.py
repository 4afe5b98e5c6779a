"""cachepass on a hand-written sampling loop around a denoiser of your own (no diffusers pipeline).

    python examples/raw_loop.py

Without a pipeline's signals, cachepass places each call from its timestep: a sequence that goes back up
starts a new generation; ``cachepass.reset(model)`` says so explicitly. ``num_steps`` lets a policy
force the last steps.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import cachepass


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.modulation = nn.Linear(dim, 2 * dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, c):
        scale, shift = self.modulation(c).unsqueeze(1).chunk(2, dim=-1)
        h = self.norm(x) * (1 + scale) + shift
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm(x))


class TinyDiT(nn.Module):
    def __init__(self, channels: int = 4, dim: int = 64, depth: int = 6) -> None:
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(channels, dim)
        self.time = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.out = nn.Linear(dim, channels)

    def forward(self, x, t):
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        angles = t.float()[:, None] * freqs[None]
        c = self.time(torch.cat([angles.sin(), angles.cos()], dim=-1))
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, c)
        return self.out(h)


def sample(model, steps: int, seed: int) -> torch.Tensor:
    """Euler steps of a flow-matching sampler from noise (untrained weights: the point is the schedule)."""
    x = torch.randn(1, 32, 4, generator=torch.Generator().manual_seed(seed))
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        velocity = model(x, (sigmas[i] * 1000).reshape(1))
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity
    return x


def main() -> None:
    torch.manual_seed(0)
    model = TinyDiT().eval()
    steps = 20
    with torch.no_grad():
        reference = sample(model, steps, seed=1)
        fast = torch.compile(model, backend="cachepass",
                             options={"policy": "interval", "interval": 3, "num_steps": steps, "inner": "eager"})
        for seed in (1, 2):  # the second generation is found from the timesteps going back up
            out = sample(fast, steps, seed)
        cachepass.reset(fast)  # explicit, for loops whose timesteps do not tell
        again = sample(fast, steps, seed=1)
    print(cachepass.stats(fast))
    print(f"output seed 2 then seed 1 again: rel L1 vs full compute {float((again - reference).abs().mean() / reference.abs().mean()):.4f}")
    assert out.isfinite().all()


if __name__ == "__main__":
    main()
