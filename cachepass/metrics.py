"""Fidelity numbers against the full computation: PSNR and relative L1."""

from __future__ import annotations

import math

import torch

# The same measure the adaptive policies decide on: one definition for decisions and for fidelity.
from .policies.distance import relative_l1

__all__ = ["psnr", "relative_l1"]


def psnr(output: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB; ``data_range`` 2 for signals in [-1, 1]. ``inf`` if equal."""
    mse = (output.detach().float() - reference.detach().float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)
