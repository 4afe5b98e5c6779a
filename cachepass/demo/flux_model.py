"""A small FLUX image denoiser, trained on handwritten digits, that ships with cachepass.

The second embedded model, next to the Wan one (`cachepass.demo.model`): the real diffusers
`FluxTransformer2DModel` with both of its block stacks (double-stream `transformer_blocks`, where
text and image tokens keep separate weights and attend jointly, then single-stream
`single_transformer_blocks` on the concatenated sequence), 2-D rotary positions and AdaLN
modulation from the timestep plus a pooled text embedding. It runs inside a real `FluxPipeline`
with true classifier-free guidance (two transformer calls per step, "cond" and "uncond").

Conditioning: each class (digits 0-9, plus a null entry for the negative prompt) has a fixed,
seeded "prompt embedding" of a few tokens, fed as `prompt_embeds` (where FLUX receives T5's
token embeddings), and a pooled vector, fed as `pooled_prompt_embeds` (where FLUX receives CLIP's
pooled embedding). Both tables are stored in the weight file.

Loading never touches the network: the weights live in `cachepass/demo/weights/`.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from cachepass.demo.model import (
    NULL_CLASS,
    NUM_CLASSES,
    PROMPT_TOKENS,
    build_transformer,
    prompt_embeds_for,
    read_weight_file,
    to_frames,
)

logger = logging.getLogger("cachepass.demo")

FLUX_WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "digits_flux.safetensors"

FLUX_CONFIG: dict = {
    "patch_size": 1,
    "in_channels": 4,  # FluxPipeline packs 2x2 patches of the 1-channel latent into 4 channels per token
    "num_layers": 2,  # double-stream blocks
    "num_single_layers": 4,  # single-stream blocks
    "attention_head_dim": 32,
    "num_attention_heads": 3,  # width 96
    "joint_attention_dim": 32,  # width of the prompt tokens (T5's place)
    "pooled_projection_dim": 32,  # width of the pooled prompt (CLIP's place)
    "guidance_embeds": False,  # not guidance-distilled: guidance is true CFG
    "axes_dims_rope": (8, 12, 12),  # sums to the head dim: (text/index, row, column)
}

PROMPT_DIM = FLUX_CONFIG["joint_attention_dim"]
POOLED_DIM = FLUX_CONFIG["pooled_projection_dim"]
FLUX_PROMPT_SEED = 20240915

# Latent image: one channel, 16 x 16, values in about [-1, 1]; packed into 8 x 8 = 64 tokens.
LATENT_CHANNELS = FLUX_CONFIG["in_channels"] // 4
LATENT_SIZE = 16

# FluxPipeline without a VAE assumes FLUX's VAE factor 8 (and packing needs the latent divisible by
# 2): latent side = 2 * (height // 16). These pixel-space arguments give exactly the training latent.
FLUX_PIPELINE_SIZE = {"height": LATENT_SIZE * 8, "width": LATENT_SIZE * 8}

# FLUX.1's scheduler: resolution-dependent ("dynamic") shift. FluxPipeline computes mu from the packed
# sequence length (64 tokens here: mu = 0.4675, an effective shift of exp(mu) = 1.60) and passes it.
SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "shift": 3.0,  # unused while use_dynamic_shifting is on; FLUX.1's value
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

DEFAULT_FLUX_GENERATION: dict = {
    **FLUX_PIPELINE_SIZE,
    "num_inference_steps": 28,  # FluxPipeline's default
    "true_cfg_scale": 4.0,
}


def make_flux_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed class tables: prompt tokens (NUM_CLASSES + 1, PROMPT_TOKENS, PROMPT_DIM) and pooled
    vectors (NUM_CLASSES + 1, POOLED_DIM); the last row of each is the null prompt.

    Seeded, so training can rebuild them; at run time they are read from the weight file instead.
    """
    generator = torch.Generator().manual_seed(FLUX_PROMPT_SEED)
    prompt = torch.randn(NUM_CLASSES + 1, PROMPT_TOKENS, PROMPT_DIM, generator=generator)
    pooled = torch.randn(NUM_CLASSES + 1, POOLED_DIM, generator=generator)
    return prompt, pooled


@functools.lru_cache(maxsize=1)
def _load_file() -> tuple[dict[str, torch.Tensor], dict]:
    """Reads the shipped weight file once: (tensors, metadata with 'config' and 'training')."""
    return read_weight_file(FLUX_WEIGHTS_PATH, "cachepass.demo.train_flux")


def flux_training_info() -> dict:
    """What the training run recorded in the weight file (steps, seconds, loss, sample accuracy)."""
    return dict(_load_file()[1].get("training", {}))


def load_digits_flux_model(
    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> FluxTransformer2DModel:
    """Builds the transformer from the shipped file (its stored config wins) and returns it in eval mode."""
    tensors, metadata = _load_file()
    config = dict(metadata.get("config", FLUX_CONFIG))
    config["axes_dims_rope"] = tuple(config["axes_dims_rope"])
    return build_transformer(FluxTransformer2DModel, config, tensors, FLUX_WEIGHTS_PATH, device, dtype)


def _tables() -> tuple[torch.Tensor, torch.Tensor]:
    tensors = _load_file()[0]
    return tensors["prompt_embeds"], tensors["pooled_prompt_embeds"]


def flux_prompt_embeds(
    digits: list[int], tables: tuple[torch.Tensor, torch.Tensor] | None = None, negative: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds (B, PROMPT_TOKENS, PROMPT_DIM), pooled_prompt_embeds (B, POOLED_DIM)) for a batch of
    digits, float32 CPU; `negative=True` gives the null rows, one per digit, for CFG's negative prompt.

    `tables` defaults to the shipped ones; training passes its in-memory tables before the file exists.
    """
    prompt, pooled = _tables() if tables is None else tables
    cond = (prompt_embeds_for(digits, prompt), prompt_embeds_for(digits, pooled))
    if not negative:
        return cond
    rows = torch.full((len(digits),), NULL_CLASS, dtype=torch.long)
    return prompt[rows].clone(), pooled[rows].clone()


def image_ids(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The rotary position ids FluxPipeline gives the packed latent tokens: (tokens, 3) = (0, row, column)."""
    half = LATENT_SIZE // 2
    return FluxPipeline._prepare_latent_image_ids(1, half, half, device, dtype)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> FLUX's packed tokens (B, H/2 * W/2, 4C), as FluxPipeline packs them."""
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: torch.Tensor) -> torch.Tensor:
    """Packed tokens (B, 64, 4C) -> latents (B, C, 16, 16), as FluxPipeline unpacks them for its VAE."""
    return FluxPipeline._unpack_latents(tokens, FLUX_PIPELINE_SIZE["height"], FLUX_PIPELINE_SIZE["width"], 8)


def make_flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1's diffusers scheduler (flow-matching Euler with the resolution-dependent shift)."""
    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


def make_flux_pipeline(model: FluxTransformer2DModel | None = None) -> FluxPipeline:
    """A real `FluxPipeline` around the digits model, with no tokenizers, text encoders or VAE.

    Prompts are given as embeddings and the output is taken as latents, so the pipeline's own
    denoising loop (two transformer calls per step with true CFG) is exactly what runs.
    """
    pipe = FluxPipeline(
        scheduler=make_flux_scheduler(),
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=model if model is not None else load_digits_flux_model(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_flux(
    pipe: FluxPipeline,
    digits: list[int],
    num_inference_steps: int = DEFAULT_FLUX_GENERATION["num_inference_steps"],
    true_cfg_scale: float = DEFAULT_FLUX_GENERATION["true_cfg_scale"],
    seed: int = 0,
    tables: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs,
) -> torch.Tensor:
    """Runs the pipeline for one image per digit; returns latents (B, 1, 16, 16), unpacked.

    `true_cfg_scale` > 1 runs true classifier-free guidance against the null prompt (two transformer
    calls per step); 1 runs the conditional branch only. Extra keyword arguments go to the pipeline
    call (e.g. `callback_on_step_end`).
    """
    device = pipe.transformer.device
    prompt, pooled = flux_prompt_embeds(digits, tables)
    neg_prompt, neg_pooled = flux_prompt_embeds(digits, tables, negative=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    result = pipe(
        prompt_embeds=prompt.to(device),
        pooled_prompt_embeds=pooled.to(device),
        negative_prompt_embeds=neg_prompt.to(device),
        negative_pooled_prompt_embeds=neg_pooled.to(device),
        true_cfg_scale=true_cfg_scale,
        num_inference_steps=num_inference_steps,
        generator=generator,
        output_type="latent",
        **FLUX_PIPELINE_SIZE,
        **kwargs,
    )
    # With output_type="latent" FluxPipeline returns its packed tokens, (B, 64, 4): unpack them.
    return unpack(result.images)


def to_images(latents: torch.Tensor) -> np.ndarray:
    """Latent images (B, 1, H, W) in about [-1, 1] -> uint8 grey images (B, H, W) for display."""
    return to_frames(latents)  # the Wan helper drops the channel axis the same way
