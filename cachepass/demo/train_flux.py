"""Trains the embedded FLUX digits model: `python -m cachepass.demo.train_flux [--out PATH] [--minutes M]`.

Recipe (FLUX's rectified flow, scaled down): x_t = (1 - s) x0 + s * noise, the model predicts
noise - x0. FluxPipeline hands the transformer `timestep / 1000`, i.e. s itself (the transformer
multiplies by 1000 inside), so training passes s. Data: scikit-learn's 8x8 handwritten digits
(shipped inside sklearn, no download), upscaled to 12x12 and placed on a 16x16 canvas with a random
sub-pixel shift of up to 2 px per axis, then packed into 2x2 patches as FluxPipeline packs its
latents. Class conditioning through the fixed prompt and pooled tables, dropped to the null row for
CFG.

The loop, data and judge are the Wan trainer's (`cachepass.demo.train`). Seeded and deterministic
for a given step count on one thread. Needs the `train` extra (scikit-learn).
"""

from __future__ import annotations

import argparse
import copy
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel

from cachepass.demo.flux_model import (
    FLUX_CONFIG,
    FLUX_WEIGHTS_PATH,
    LATENT_SIZE,
    PROMPT_TOKENS,
    generate_flux,
    image_ids,
    make_flux_pipeline,
    make_flux_tables,
    pack,
)
from cachepass.demo.model import NULL_CLASS, NUM_CLASSES
from cachepass.demo.train import (
    classify_frames,
    load_digit_canvases,
    make_parser,
    optimise,
    render_videos,
    sample_sigmas,
    setup,
    write_weight_file,
)

logger = logging.getLogger("cachepass.demo")


def render_images(canvases: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each canvas shifted by a random sub-pixel offset (up to 2 px per axis): (B, 1, H, W) in [-1, 1]."""
    return render_videos(canvases, generator, frames=1)[:, :, 0]


def evaluate_flux(model, tables, canvases, labels, per_class: int, steps: int, true_cfg_scale: float) -> float:
    """Generates `per_class` images per digit through FluxPipeline; returns the classifier accuracy."""
    pipe = make_flux_pipeline(copy.deepcopy(model).eval())
    digits = [d for d in range(NUM_CLASSES) for _ in range(per_class)]
    latents = generate_flux(
        pipe, digits, num_inference_steps=steps, true_cfg_scale=true_cfg_scale, seed=123, tables=tables
    )
    pred = classify_frames(latents[:, 0].float().cpu().clamp(-1, 1), canvases, labels)
    return float((pred == torch.tensor(digits).numpy()).mean())


def train(args: argparse.Namespace) -> dict:
    """Runs the training loop and saves the EMA weights; returns the training record."""
    generator, device = setup(args)
    canvases, labels = load_digit_canvases()
    prompt_table, pooled_table = make_flux_tables()
    model = FluxTransformer2DModel(**FLUX_CONFIG).to(device).train()
    img_ids = image_ids(device)
    txt_ids = torch.zeros(PROMPT_TOKENS, 3, device=device)  # FluxPipeline gives every text token position 0

    def batch_loss(model: FluxTransformer2DModel) -> torch.Tensor:
        idx = torch.randint(len(labels), (args.batch_size,), generator=generator)
        x0 = render_images(canvases[idx], generator)
        cls = torch.where(torch.rand(args.batch_size, generator=generator) < args.p_uncond, NULL_CLASS, labels[idx])
        noise = torch.randn(x0.shape, generator=generator)
        s = sample_sigmas(args.batch_size, generator, args.train_shift)
        x_t = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * noise
        pred = model(
            hidden_states=pack(x_t).to(device),
            timestep=s.to(device),  # as FluxPipeline passes it: timestep / 1000 = the noise level
            encoder_hidden_states=prompt_table[cls].to(device),
            pooled_projections=pooled_table[cls].to(device),
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        return F.mse_loss(pred.float(), pack(noise - x0).to(device))

    ema, info, final_loss = optimise(model, batch_loss, args, len(labels))
    info["final_loss"] = round(final_loss, 4)
    info["latent"] = f"{FLUX_CONFIG['in_channels'] // 4} x {LATENT_SIZE} x {LATENT_SIZE}"
    if args.eval_per_class:
        tables = (prompt_table, pooled_table)
        info["eval_accuracy"] = evaluate_flux(
            ema, tables, canvases, labels, args.eval_per_class, args.eval_steps, args.eval_guidance
        )
        info["eval_setting"] = f"{args.eval_per_class}/class, {args.eval_steps} steps, true CFG {args.eval_guidance}"
        logger.info("sample accuracy (logistic-regression judge): %.3f", info["eval_accuracy"])
    config = {**FLUX_CONFIG, "axes_dims_rope": list(FLUX_CONFIG["axes_dims_rope"])}
    tables = {"prompt_embeds": prompt_table, "pooled_prompt_embeds": pooled_table}
    write_weight_file(ema, tables, config, Path(args.out), info)
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The Wan trainer's options (`cachepass.demo.train`), with this model's defaults."""
    p = make_parser(__doc__.splitlines()[0])
    p.set_defaults(out=str(FLUX_WEIGHTS_PATH), steps=4000, batch_size=32, minutes=18.0, eval_steps=28)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    train(parse_args(argv))


if __name__ == "__main__":
    main()
