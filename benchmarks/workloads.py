"""The workloads: a diffusers pipeline around a denoiser, with fixed prompts and seeds.

* ``digits``: the embedded trained Wan model (``cachepass.demo``) in ``WanPipeline``, 4 prompts, 50 steps
  with CFG. Trained weights make the step-to-step feature changes realistic: a fidelity workload.
* ``flux-digits``: the embedded trained FLUX model (``cachepass.demo.flux_model``) in ``FluxPipeline``
  with true CFG (two calls per step), 4 prompts, 28 steps: the same, on FLUX's two block stacks.
* ``large``: random weights, 12 blocks of width 768 and 2880 video tokens, bf16 on CUDA. Block compute
  dominates the call, so this is the speed workload (run it on a GPU).
* ``tiny``: random weights, 3 blocks, 32 tokens, 8 steps; for the smoke test.

Every workload runs the pipeline's own denoising loop (two transformer calls per step with CFG) and
returns latents (``output_type="latent"``): prompts are given as embeddings, there is no VAE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class Workload:
    name: str
    description: str
    steps: int
    make_model: Callable[[str, torch.dtype], torch.nn.Module]
    make_pipe: Callable[[torch.nn.Module], object]
    generate: Callable[[object, int], torch.Tensor]
    #: PSNR peak-to-peak range: 2 for latents meant to lie in [-1, 1]; None: the reference's own range.
    data_range: float | None = None
    default_dtype: dict = field(default_factory=lambda: {"cpu": torch.float32, "cuda": torch.bfloat16})
    weights: str = "random (torch.manual_seed(0))"
    #: Options this workload needs per method (under a row's own), keyed ``"tool:algo"`` or ``"tool"``:
    #: e.g. AdaCache without its motion term on an image model, which has no frames.
    method_options: dict = field(default_factory=dict)

    def options_for(self, tool: str, algo: str) -> dict:
        return {**self.method_options.get(tool, {}), **self.method_options.get(f"{tool}:{algo}", {})}

    def psnr_range(self, reference: torch.Tensor) -> float:
        if self.data_range is not None:
            return self.data_range
        reference = reference.float()
        return (reference.max() - reference.min()).item()


# --- random-weight Wan ---------------------------------------------------------------------------

@dataclass(frozen=True)
class WanShape:
    layers: int
    heads: int
    head_dim: int
    channels: int
    text_dim: int
    text_tokens: int
    freq_dim: int
    frames: int  # latent frames
    size: int  # latent height and width

    @property
    def tokens(self) -> int:
        return self.frames * (self.size // 2) ** 2

    @property
    def width(self) -> int:
        return self.heads * self.head_dim


TINY = WanShape(layers=3, heads=2, head_dim=8, channels=4, text_dim=16, text_tokens=5, freq_dim=16, frames=2, size=8)
LARGE = WanShape(layers=12, heads=12, head_dim=64, channels=16, text_dim=64, text_tokens=16, freq_dim=256, frames=5,
                 size=48)


def random_wan(shape: WanShape, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=shape.heads, attention_head_dim=shape.head_dim,
        in_channels=shape.channels, out_channels=shape.channels, text_dim=shape.text_dim, freq_dim=shape.freq_dim,
        ffn_dim=4 * shape.width, num_layers=shape.layers, cross_attn_norm=True, rope_max_seq_len=1024,
    )
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def wan_scheduler(flow_shift: float = 3.0):
    """Wan 2.1's diffusers scheduler: UniPC on flow sigmas."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                   use_flow_sigmas=True, flow_shift=flow_shift, solver_order=2)


def bare_wan_pipeline(model: torch.nn.Module):
    """A real ``WanPipeline`` with no tokenizer, text encoder or VAE: embeddings in, latents out."""
    from diffusers import WanPipeline

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=wan_scheduler(), transformer=model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_wan_generate(shape: WanShape) -> Callable[[object, int], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(1, shape.text_tokens, shape.text_dim, generator=g)
    uncond = torch.randn(1, shape.text_tokens, shape.text_dim, generator=g)

    def generate(pipe, steps: int) -> torch.Tensor:
        device = pipe.transformer.device
        return pipe(
            prompt_embeds=cond.to(device), negative_prompt_embeds=uncond.to(device),
            height=shape.size * 8, width=shape.size * 8, num_frames=(shape.frames - 1) * 4 + 1,
            num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(0),
            output_type="latent",
        ).frames

    return generate


def random_workload(name: str, shape: WanShape, steps: int, what: str) -> Workload:
    return Workload(
        name=name,
        description=(f"random-weight Wan, {shape.layers} blocks, width {shape.width}, {shape.tokens} tokens, "
                     f"{what}"),
        steps=steps,
        make_model=lambda device, dtype: random_wan(shape, device, dtype),
        make_pipe=bare_wan_pipeline,
        generate=random_wan_generate(shape),
    )


# --- the embedded trained model ------------------------------------------------------------------

DIGITS = (0, 3, 5, 8)


def weights_record(path, info: dict) -> str:
    """Which weight file ran: results depend on it, and the file is retrained from time to time."""
    import hashlib

    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return f"{path.name} sha256 {digest}, {info.get('steps', '?')} training steps"


def digits_weights() -> str:
    from cachepass.demo import training_info
    from cachepass.demo.model import WEIGHTS_PATH

    return weights_record(WEIGHTS_PATH, training_info())


def digits_workload() -> Workload:
    from cachepass.demo import generate, load_digits_model, make_pipeline

    return Workload(
        name="digits",
        description=f"embedded trained Wan (moving digits), prompts {list(DIGITS)} in one batch, seed 0",
        steps=50,
        make_model=lambda device, dtype: load_digits_model(device=device, dtype=dtype),
        make_pipe=make_pipeline,
        generate=lambda pipe, steps: generate(pipe, list(DIGITS), num_inference_steps=steps, seed=0),
        data_range=2.0,
        default_dtype={"cpu": torch.float32, "cuda": torch.float32},
        weights=digits_weights(),
    )


def flux_digits_workload() -> Workload:
    from cachepass.demo import flux_training_info, generate_flux, load_digits_flux_model, make_flux_pipeline
    from cachepass.demo.flux_model import FLUX_WEIGHTS_PATH

    return Workload(
        name="flux-digits",
        description=(f"embedded trained FLUX (digit images), FluxPipeline with true CFG 4, prompts {list(DIGITS)} "
                     "in one batch, seed 0"),
        steps=28,
        make_model=lambda device, dtype: load_digits_flux_model(device=device, dtype=dtype),
        make_pipe=make_flux_pipeline,
        generate=lambda pipe, steps: generate_flux(pipe, list(DIGITS), num_inference_steps=steps, seed=0),
        data_range=2.0,
        default_dtype={"cpu": torch.float32, "cuda": torch.float32},
        weights=weights_record(FLUX_WEIGHTS_PATH, flux_training_info()),
        method_options={
            "cachepass:adacache": {"motion": False},  # an image: no frames for the motion term
            # cache-dit's Flux adapter assumes FLUX.1-dev (no CFG); with true CFG the two calls of a step
            # are separate forwards, which its config is told as its examples do for base (CFG) models.
            "cache-dit": {"enable_separate_cfg": True},
        },
    )


WORKLOADS = ("digits", "flux-digits", "large", "tiny")


def get_workload(name: str) -> Workload:
    if name == "digits":
        return digits_workload()
    if name == "flux-digits":
        return flux_digits_workload()
    if name == "large":
        return random_workload("large", LARGE, 50, "the speed workload")
    if name == "tiny":
        return random_workload("tiny", TINY, 8, "the smoke-test workload")
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
