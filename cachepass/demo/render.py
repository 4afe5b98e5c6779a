"""Pictures of a demo run: side by side (an animation for videos, a grid for images) and a chart of
which steps each policy computed.

Pillow only (it comes with diffusers), so the demo needs no plotting library.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SCALE = 6
LABEL_HEIGHT = 14


def _side_by_side(videos: dict[str, np.ndarray]) -> list[Image.Image]:
    """One canvas per frame: one column per label, one row per sample."""
    labels = list(videos)
    batch, frames, h, w = videos[labels[0]].shape
    cell_w, cell_h = w * SCALE, h * SCALE
    width = max(cell_w, 80) * len(labels)
    col_w = width // len(labels)
    images = []
    for f in range(frames):
        canvas = Image.new("L", (width, LABEL_HEIGHT + batch * cell_h), color=0)
        draw = ImageDraw.Draw(canvas)
        for c, label in enumerate(labels):
            draw.text((c * col_w + 2, 1), label[:14], fill=255)
            for b in range(batch):
                tile = Image.fromarray(videos[label][b, f]).resize((cell_w, cell_h), Image.NEAREST)
                canvas.paste(tile, (c * col_w + (col_w - cell_w) // 2, LABEL_HEIGHT + b * cell_h))
        images.append(canvas)
    return images


def side_by_side_gif(videos: dict[str, np.ndarray], path: Path, ms_per_frame: int = 250) -> Path:
    """``videos``: label -> uint8 frames (B, F, H, W). One column per label, one row per sample."""
    images = _side_by_side(videos)
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0)
    return path


def side_by_side_png(images: dict[str, np.ndarray], path: Path) -> Path:
    """``images``: label -> uint8 images (B, 1, H, W) (or (B, H, W)). One column per label, one row per sample."""
    images = {k: v[:, None] if v.ndim == 3 else v for k, v in images.items()}
    _side_by_side(images)[0].save(path)
    return path


def computed_steps_chart(schedules: dict[str, list[list[int]]], num_steps: int, path: Path) -> Path:
    """``schedules``: label -> computed steps per branch. A row per (label, branch); filled = computed."""
    rows = [(f"{label} s{i}", set(steps)) for label, branches in schedules.items() for i, steps in enumerate(branches)]
    cell, left = 8, 130
    img = Image.new("RGB", (left + num_steps * cell + 4, 16 + len(rows) * (cell + 2)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((2, 2), "computed steps (filled) per policy and branch", fill="black")
    for r, (label, steps) in enumerate(rows):
        y = 16 + r * (cell + 2)
        draw.text((2, y - 2), label[:20], fill="black")
        for s in range(num_steps):
            x = left + s * cell
            box = (x, y, x + cell - 2, y + cell - 1)
            draw.rectangle(box, fill="#1f77b4" if s in steps else "#e8e8e8")
    img.save(path)
    return path
