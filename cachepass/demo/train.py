"""Trains the embedded digits model: `python -m cachepass.demo.train [--out PATH] [--minutes M]`.

Recipe (Wan's rectified flow, scaled down): x_t = (1 - s) x0 + s * noise, the model predicts
noise - x0 at timestep s * 1000, s drawn logit-normal and shifted. Data: scikit-learn's 8x8
handwritten digits (shipped inside sklearn, no download), upscaled to 12x12 and moved across a
16x16 canvas for LATENT_FRAMES frames with a random start and end per sample, so every sample is a
short video. Class conditioning through the fixed prompt table, dropped to the null row for CFG.

Seeded and deterministic for a given step count on one thread. Needs the `train` extra
(scikit-learn).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel

from cachepass.demo.model import (
    LATENT_FRAMES,
    LATENT_SIZE,
    MODEL_CONFIG,
    NULL_CLASS,
    NUM_CLASSES,
    WEIGHTS_PATH,
    generate,
    make_pipeline,
    make_prompt_table,
)

logger = logging.getLogger("cachepass.demo")

DIGIT_SIZE = 12
MAX_SHIFT = 2.0  # pixels the digit's centre may sit away from the canvas centre, per axis


def load_digit_canvases() -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's digits as centred 16x16 canvases in [0, 1], (N, 1, 16, 16), and their labels (N,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(DIGIT_SIZE, DIGIT_SIZE), mode="bilinear", align_corners=False)
    pad = (LATENT_SIZE - DIGIT_SIZE) // 2
    canvases = F.pad(images, (pad, pad, pad, pad)).clamp(0, 1)
    return canvases, torch.tensor(digits.target, dtype=torch.long)


def render_videos(canvases: torch.Tensor, generator: torch.Generator, frames: int = LATENT_FRAMES) -> torch.Tensor:
    """Moves each canvas in a straight line from a random start to a random end over `frames` frames.

    Returns (B, 1, frames, H, W) in [-1, 1] (background -1). Sub-pixel positions use bilinear
    sampling, so motion is smooth rather than snapped to the pixel grid.
    """
    b, _, h, w = canvases.shape
    start = (torch.rand(b, 2, generator=generator) * 2 - 1) * MAX_SHIFT
    end = (torch.rand(b, 2, generator=generator) * 2 - 1) * MAX_SHIFT
    frac = torch.linspace(0, 1, frames).view(1, frames, 1)
    shift = (start.unsqueeze(1) + (end - start).unsqueeze(1) * frac).reshape(b * frames, 2)
    theta = torch.zeros(b * frames, 2, 3)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    theta[:, 0, 2] = -2 * shift[:, 0] / w
    theta[:, 1, 2] = -2 * shift[:, 1] / h
    grid = F.affine_grid(theta, (b * frames, 1, h, w), align_corners=False)
    src = canvases.repeat_interleave(frames, dim=0)
    video = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return video.view(b, frames, h, w).unsqueeze(1) * 2 - 1


def sample_sigmas(batch: int, generator: torch.Generator, shift: float) -> torch.Tensor:
    """Logit-normal noise levels, shifted towards noise like Wan's flow shift (shift=1: unshifted)."""
    s = torch.sigmoid(torch.randn(batch, generator=generator))
    return shift * s / (1 + (shift - 1) * s)


def center_frames(frames: torch.Tensor) -> torch.Tensor:
    """Shifts each frame (N, H, W) in [-1, 1] so its ink's centre of mass sits at the canvas centre.

    Undoing the motion makes a linear classifier (or a class-mean template) shift-invariant.
    Returns ink in [0, 1].
    """
    ink = ((frames + 1) / 2).clamp(0, 1)
    n, h, w = ink.shape
    mass = ink.sum((1, 2)).clamp_min(1e-6)
    cy = (ink.sum(2) * (torch.arange(h) - (h - 1) / 2)).sum(1) / mass
    cx = (ink.sum(1) * (torch.arange(w) - (w - 1) / 2)).sum(1) / mass
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    theta[:, 0, 2] = 2 * cx / w
    theta[:, 1, 2] = 2 * cy / h
    grid = F.affine_grid(theta, (n, 1, h, w), align_corners=False)
    return F.grid_sample(ink.unsqueeze(1), grid, align_corners=False)[:, 0]


def classify_frames(frames: torch.Tensor, canvases: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Predicts the digit in each frame (N, H, W) with a logistic regression fit on moved real digits.

    The judge of sample quality: 98% right on the real digits moved anew.
    """
    from sklearn.linear_model import LogisticRegression

    reps = 2
    real = render_videos(canvases.repeat(reps, 1, 1, 1), torch.Generator().manual_seed(0))[:, 0]
    x = center_frames(real.reshape(-1, LATENT_SIZE, LATENT_SIZE)).flatten(1).numpy()
    y = labels.repeat(reps).repeat_interleave(LATENT_FRAMES).numpy()
    clf = LogisticRegression(max_iter=500, C=0.1).fit(x, y)
    return clf.predict(center_frames(frames.reshape(-1, LATENT_SIZE, LATENT_SIZE)).flatten(1).numpy())


def evaluate(model, table, canvases, labels, per_class: int, steps: int, guidance_scale: float) -> float:
    """Generates `per_class` videos per digit through WanPipeline; returns the classifier accuracy."""
    model = copy.deepcopy(model).eval()
    pipe = make_pipeline(model)
    digits = [d for d in range(NUM_CLASSES) for _ in range(per_class)]
    latents = generate(
        pipe, digits, num_inference_steps=steps, guidance_scale=guidance_scale, seed=123, prompt_table=table
    )
    frames = latents[:, 0].float().cpu().clamp(-1, 1)
    pred = classify_frames(frames, canvases, labels)
    asked = torch.tensor(digits).repeat_interleave(LATENT_FRAMES).numpy()
    return float((pred == asked).mean())


def write_weight_file(
    model: torch.nn.Module, tables: dict[str, torch.Tensor], config: dict, out: Path, info: dict
) -> None:
    """Writes transformer weights (`transformer.*`), the embedding tables, config and training record.

    One fp32 safetensors file; the config and the training record go into its metadata as JSON.
    """
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"transformer.{k}": v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    tensors.update({name: table.contiguous() for name, table in tables.items()})
    save_file(tensors, str(out), metadata={"config": json.dumps(config), "training": json.dumps(info)})
    out.chmod(0o644)  # safetensors writes 0600; package data must be readable by everyone
    logger.info("saved %s (%.2f MB)", out, out.stat().st_size / 1e6)


def save(model: WanTransformer3DModel, table: torch.Tensor, out: Path, info: dict) -> None:
    """Writes transformer weights, prompt table, config and training record into one safetensors file."""
    config = {**MODEL_CONFIG, "patch_size": list(MODEL_CONFIG["patch_size"])}
    write_weight_file(model, {"prompt_embeds": table}, config, out, info)


def setup(args: argparse.Namespace) -> tuple[torch.Generator, torch.device]:
    """Threads and seeds for a deterministic run: (the data generator, the device)."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    return torch.Generator().manual_seed(args.seed), torch.device(args.device)


def optimise(
    model: torch.nn.Module, batch_loss: Callable[[torch.nn.Module], torch.Tensor], args: argparse.Namespace, n_data: int
) -> tuple[torch.nn.Module, dict, float]:
    """The training loop shared by the demo models: AdamW with warm-up, clipped gradients, an EMA copy.

    `batch_loss(model)` draws one batch and returns its loss. Stops after `args.steps` steps or
    `args.minutes`. Returns (the EMA model, the training record, the mean loss of the last log window).
    """
    ema = copy.deepcopy(model).requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "model: %d parameters; data: %d digits; %d steps of batch %d", n_params, n_data, args.steps, args.batch_size
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)

    t0 = time.perf_counter()
    running, step, last_loss = 0.0, 0, float("nan")
    for step in range(1, args.steps + 1):
        loss = batch_loss(model)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)

        running += loss.item()
        elapsed = time.perf_counter() - t0
        if step % args.log_every == 0:
            last_loss = running / args.log_every
            logger.info("step %d/%d  loss %.4f  %.1f s", step, args.steps, last_loss, elapsed)
            running = 0.0
        if args.minutes and elapsed > args.minutes * 60:
            logger.warning(
                "stopping at step %d: --minutes %.1f reached (the result now depends on machine speed)", step, args.minutes
            )
            break

    info = {
        "steps": step,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "ema": args.ema,
        "p_uncond": args.p_uncond,
        "train_shift": args.train_shift,
        "seed": args.seed,
        "threads": args.threads,
        "seconds": round(time.perf_counter() - t0, 1),
        "parameters": n_params,
    }
    return ema, info, last_loss


def train(args: argparse.Namespace) -> dict:
    """Runs the training loop and saves the EMA weights; returns the training record."""
    generator, device = setup(args)
    canvases, labels = load_digit_canvases()
    table = make_prompt_table()
    model = WanTransformer3DModel(**MODEL_CONFIG).to(device).train()

    def batch_loss(model: WanTransformer3DModel) -> torch.Tensor:
        idx = torch.randint(len(labels), (args.batch_size,), generator=generator)
        x0 = render_videos(canvases[idx], generator)
        cls = torch.where(torch.rand(args.batch_size, generator=generator) < args.p_uncond, NULL_CLASS, labels[idx])
        noise = torch.randn(x0.shape, generator=generator)
        s = sample_sigmas(args.batch_size, generator, args.train_shift).view(-1, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        target = noise - x0
        pred = model(
            hidden_states=x_t.to(device),
            timestep=(s.flatten() * 1000).to(device),
            encoder_hidden_states=table[cls].to(device),
            return_dict=False,
        )[0]
        return F.mse_loss(pred.float(), target.to(device))

    ema, info, _ = optimise(model, batch_loss, args, len(labels))
    if args.eval_per_class:
        info["eval_accuracy"] = evaluate(
            ema, table, canvases, labels, args.eval_per_class, args.eval_steps, args.eval_guidance
        )
        info["eval_setting"] = f"{args.eval_per_class}/class, {args.eval_steps} steps, CFG {args.eval_guidance}"
        logger.info("sample accuracy (logistic-regression judge): %.3f", info["eval_accuracy"])
    save(ema, table, Path(args.out), info)
    return info


def make_parser(description: str = __doc__.splitlines()[0]) -> argparse.ArgumentParser:
    """The training options with the Wan model's defaults; other demo trainers override some."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", default=str(WEIGHTS_PATH), help="weight file to write")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--minutes", type=float, default=28.0, help="wall-clock cap; 0 for none")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.add_argument("--train-shift", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--eval-per-class", type=int, default=10, help="0 skips the sample-quality check")
    p.add_argument("--eval-steps", type=int, default=50)
    p.add_argument("--eval-guidance", type=float, default=4.0)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return make_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    train(parse_args(argv))


if __name__ == "__main__":
    main()
