"""Draws the embedded model's samples as one PNG: a row per digit, a column per frame.

`python -m cachepass.demo.grid [--out docs/images/digits_samples.png]` regenerates the image
shown in docs/embedded-model.md, so a reader can see what the cached and uncached runs produce.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cachepass.demo.model import (
    DEFAULT_GENERATION,
    NUM_CLASSES,
    generate,
    make_pipeline,
    to_frames,
)

logger = logging.getLogger("cachepass.demo")


def save_grid(frames: np.ndarray, path: str | Path, scale: int = 5, gap: int = 6) -> Path:
    """Writes uint8 frames (rows, samples, F, H, W) as a grey PNG; row r is labelled with digit r.

    Frames of one sample sit side by side (1 px apart); samples are `gap` px apart.
    """
    rows, samples, n_frames, h, w = frames.shape
    cell_h, cell_w = h * scale, w * scale
    label_w = 14
    sample_w = n_frames * cell_w + (n_frames - 1)
    width = label_w + samples * sample_w + (samples - 1) * gap
    height = rows * cell_h + (rows - 1)
    canvas = Image.new("L", (width, height), color=255)
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        y = r * (cell_h + 1)
        draw.text((3, y + cell_h // 2 - 5), str(r), fill=0)
        for s in range(samples):
            for f in range(n_frames):
                x = label_w + s * (sample_w + gap) + f * (cell_w + 1)
                tile = Image.fromarray(frames[r, s, f]).resize((cell_w, cell_h), Image.NEAREST)
                canvas.paste(tile, (x, y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, optimize=True)
    return path


def render_samples(samples: int = 2, seed: int = 0, **generation) -> np.ndarray:
    """Generates `samples` videos per digit with the shipped model; uint8 (10, samples, F, H, W)."""
    settings = {**DEFAULT_GENERATION, **generation}
    digits = [d for d in range(NUM_CLASSES) for _ in range(samples)]
    latents = generate(
        make_pipeline(),
        digits,
        num_inference_steps=settings["num_inference_steps"],
        guidance_scale=settings["guidance_scale"],
        seed=seed,
    )
    frames = to_frames(latents)
    return frames.reshape(NUM_CLASSES, samples, *frames.shape[1:])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/images/digits_samples.png")
    p.add_argument("--samples", type=int, default=2, help="videos per digit")
    p.add_argument("--steps", type=int, default=DEFAULT_GENERATION["num_inference_steps"])
    p.add_argument("--guidance", type=float, default=DEFAULT_GENERATION["guidance_scale"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    frames = render_samples(args.samples, args.seed, num_inference_steps=args.steps, guidance_scale=args.guidance)
    out = save_grid(frames, args.out)
    logger.info("wrote %s (%.1f kB)", out, out.stat().st_size / 1e3)


if __name__ == "__main__":
    main()
