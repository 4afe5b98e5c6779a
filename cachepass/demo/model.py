"""A small Wan video denoiser, trained on moving handwritten digits, that ships with cachepass.

Why it exists: cache policies decide from how much the denoiser's features change between steps,
and that only resembles a real model's behaviour when the weights have learned something. Random
weights give flat or chaotic curves. This model is the real diffusers `WanTransformer3DModel`
architecture (rotary 3-D attention, cross-attention on "text", AdaLN timestep modulation), small
enough to run a 50-step classifier-free-guided generation on one CPU core in seconds.

Conditioning: each class (digits 0-9, plus a null entry for the unconditional branch of CFG) has a
fixed, seeded "prompt embedding" of a few tokens that is fed through `encoder_hidden_states`,
exactly where Wan receives its T5 embeddings. The table is stored in the weight file.

Loading never touches the network: the weights live in `cachepass/demo/weights/`.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import numpy as np
import torch
from diffusers import UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

logger = logging.getLogger("cachepass.demo")

WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "digits_wan.safetensors"

MODEL_CONFIG: dict = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 3,
    "attention_head_dim": 32,
    "in_channels": 1,
    "out_channels": 1,
    "text_dim": 32,
    "freq_dim": 64,
    "ffn_dim": 384,
    "num_layers": 4,
    "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads",
    "eps": 1e-6,
    "rope_max_seq_len": 64,
}

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # row of the prompt table used for the unconditional (negative) branch
PROMPT_TOKENS = 4
PROMPT_SEED = 20240901

# Training video size in latent space: (frames, height, width); one channel, values in about [-1, 1].
LATENT_FRAMES = 4
LATENT_SIZE = 16

# WanPipeline without a VAE assumes Wan's VAE factors (temporal 4, spatial 8); these pixel-space
# arguments make it allocate exactly the training latent size.
PIPELINE_SIZE = {
    "height": LATENT_SIZE * 8,
    "width": LATENT_SIZE * 8,
    "num_frames": (LATENT_FRAMES - 1) * 4 + 1,
}

FLOW_SHIFT = 2.0

DEFAULT_GENERATION: dict = {
    **PIPELINE_SIZE,
    "num_inference_steps": 50,
    "guidance_scale": 4.0,
}


def make_prompt_table() -> torch.Tensor:
    """The fixed class-embedding table, (NUM_CLASSES + 1, PROMPT_TOKENS, text_dim); the last row is null.

    Seeded, so training can rebuild it; at run time it is read from the weight file instead.
    """
    generator = torch.Generator().manual_seed(PROMPT_SEED)
    return torch.randn(NUM_CLASSES + 1, PROMPT_TOKENS, MODEL_CONFIG["text_dim"], generator=generator)


def read_weight_file(path: Path, trainer: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Reads a demo weight file: (tensors, metadata with its JSON values decoded).

    `trainer` is the module that rebuilds the file, named in the error when it is missing.
    """
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; rebuild it with `python -m {trainer}`.")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        raw = f.metadata() or {}
    metadata = {k: json.loads(v) for k, v in raw.items()}
    return tensors, metadata


@functools.lru_cache(maxsize=1)
def _load_file() -> tuple[dict[str, torch.Tensor], dict]:
    """Reads the shipped weight file once: (tensors, metadata with 'config' and 'training')."""
    return read_weight_file(WEIGHTS_PATH, "cachepass.demo.train")


def training_info() -> dict:
    """What the training run recorded in the weight file (steps, seconds, loss, sample accuracy)."""
    return dict(_load_file()[1].get("training", {}))


def load_digits_model(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> WanTransformer3DModel:
    """Builds the transformer from the shipped file (its stored config wins) and returns it in eval mode."""
    tensors, metadata = _load_file()
    config = dict(metadata.get("config", MODEL_CONFIG))
    config["patch_size"] = tuple(config["patch_size"])
    return build_transformer(WanTransformer3DModel, config, tensors, WEIGHTS_PATH, device, dtype)


def build_transformer(model_class, config: dict, tensors: dict[str, torch.Tensor], path: Path,
                      device: str | torch.device, dtype: torch.dtype):
    """``model_class(**config)`` with the file's ``transformer.*`` tensors, on ``device``, in eval mode
    and without gradients (both embedded models load this way)."""
    model = model_class(**config)
    state = {k.removeprefix("transformer."): v for k, v in tensors.items() if k.startswith("transformer.")}
    model.load_state_dict(state, strict=True)
    logger.debug("loaded %s from %s", model_class.__name__, path)
    model.to(device=device)
    if dtype != torch.float32:  # diffusers warns on any dtype cast, so only cast when asked to
        model.to(dtype=dtype)
    return model.eval().requires_grad_(False)


def _prompt_table() -> torch.Tensor:
    return _load_file()[0]["prompt_embeds"]


def prompt_embeds_for(digits: list[int], table: torch.Tensor | None = None) -> torch.Tensor:
    """Conditional embeddings for a batch of digits, (len(digits), PROMPT_TOKENS, text_dim), float32 CPU.

    `table` defaults to the shipped one; training passes its in-memory table before the file exists.
    """
    if any(not 0 <= int(d) < NUM_CLASSES for d in digits):
        raise ValueError(f"digits must be in 0..{NUM_CLASSES - 1}, got {digits}")
    table = _prompt_table() if table is None else table
    return table[torch.as_tensor([int(d) for d in digits], dtype=torch.long)].clone()


def negative_prompt_embeds(batch: int, table: torch.Tensor | None = None) -> torch.Tensor:
    """The null (unconditional) embedding repeated for a batch, as CFG's negative prompt."""
    table = _prompt_table() if table is None else table
    return table[NULL_CLASS].unsqueeze(0).repeat(batch, 1, 1)


def make_scheduler() -> UniPCMultistepScheduler:
    """Wan 2.1's diffusers scheduler (UniPC on flow sigmas), with a shift suited to a 16x16 latent."""
    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=FLOW_SHIFT,
        solver_order=2,
    )


def make_pipeline(model: WanTransformer3DModel | None = None) -> WanPipeline:
    """A real `WanPipeline` around the digits model, with no tokenizer, text encoder or VAE.

    Prompts are given as embeddings and the output is taken as latents, so the pipeline's own
    denoising loop (two transformer calls per step with CFG) is exactly what runs.
    """
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=make_scheduler(),
        transformer=model if model is not None else load_digits_model(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    pipe: WanPipeline,
    digits: list[int],
    num_inference_steps: int = DEFAULT_GENERATION["num_inference_steps"],
    guidance_scale: float = DEFAULT_GENERATION["guidance_scale"],
    seed: int = 0,
    prompt_table: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """Runs the pipeline for one video per digit; returns latents (B, 1, LATENT_FRAMES, 16, 16).

    Extra keyword arguments go to the pipeline call (e.g. `callback_on_step_end`).
    """
    transformer = pipe.transformer
    device = transformer.device
    generator = torch.Generator(device=device).manual_seed(seed)
    result = pipe(
        prompt_embeds=prompt_embeds_for(digits, prompt_table).to(device),
        negative_prompt_embeds=negative_prompt_embeds(len(digits), prompt_table).to(device),
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generator,
        output_type="latent",
        **PIPELINE_SIZE,
        **kwargs,
    )
    return result.frames


def to_frames(latents: torch.Tensor) -> np.ndarray:
    """Latent videos (B, 1, F, H, W) in about [-1, 1] -> uint8 grey frames (B, F, H, W) for display."""
    x = (latents[:, 0].detach().float().cpu().clamp(-1, 1) + 1) * 127.5
    return x.round().to(torch.uint8).numpy()
