"""Fidelity numbers against the full computation: PSNR and relative L1."""

from __future__ import annotations

import math

import torch


def relative_l1(output: torch.Tensor, reference: torch.Tensor) -> float:
    """``mean|output - reference| / mean|reference|``."""
    output, reference = output.detach().float(), reference.detach().float()
    return ((output - reference).abs().mean() / reference.abs().mean().clamp_min(1e-12)).item()


def psnr(output: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB; ``data_range`` 2 for signals in [-1, 1]. ``inf`` if equal."""
    mse = (output.detach().float() - reference.detach().float()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)
