"""The embedded demo model: a small, really trained Wan denoiser for moving handwritten digits."""

from cachepass.demo.model import (
    DEFAULT_GENERATION,
    MODEL_CONFIG,
    generate,
    load_digits_model,
    make_pipeline,
    negative_prompt_embeds,
    prompt_embeds_for,
    to_frames,
    training_info,
)

__all__ = [
    "DEFAULT_GENERATION",
    "MODEL_CONFIG",
    "generate",
    "load_digits_model",
    "make_pipeline",
    "negative_prompt_embeds",
    "prompt_embeds_for",
    "to_frames",
    "training_info",
]
