"""The embedded demo models: small, really trained denoisers for handwritten digits.

A Wan video denoiser (moving digits, `WanPipeline`) and a FLUX image denoiser (`FluxPipeline` with
true CFG); see docs/embedded-model.md.
"""

from cachepass.demo.flux_model import (
    DEFAULT_FLUX_GENERATION,
    FLUX_CONFIG,
    flux_prompt_embeds,
    flux_training_info,
    generate_flux,
    load_digits_flux_model,
    make_flux_pipeline,
    to_images,
)
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
    "DEFAULT_FLUX_GENERATION",
    "DEFAULT_GENERATION",
    "FLUX_CONFIG",
    "MODEL_CONFIG",
    "flux_prompt_embeds",
    "flux_training_info",
    "generate",
    "generate_flux",
    "load_digits_flux_model",
    "load_digits_model",
    "make_flux_pipeline",
    "make_pipeline",
    "negative_prompt_embeds",
    "prompt_embeds_for",
    "to_frames",
    "to_images",
    "training_info",
]
