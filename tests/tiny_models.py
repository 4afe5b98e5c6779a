"""Tiny models for the tests: real diffusers classes from small configs, and a plain DiT of our own."""

from __future__ import annotations

import math

import torch
from torch import nn


def tiny_wan(num_layers: int = 3, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=num_layers, cross_attn_norm=True, rope_max_seq_len=32,
    ).eval()


def wan_inputs(batch: int = 1, frames: int = 2, size: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, 4, frames, size, size, generator=g),
        encoder_hidden_states=torch.randn(batch, 5, 16, generator=g),
    )


def tiny_flux(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=2, num_single_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=12, guidance_embeds=False,
        axes_dims_rope=(2, 2, 4),
    ).eval()


def flux_inputs(batch: int = 1, tokens: int = 16, text: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, tokens, 8, generator=g),
        encoder_hidden_states=torch.randn(batch, text, 16, generator=g),
        pooled_projections=torch.randn(batch, 12, generator=g),
        img_ids=torch.zeros(tokens, 3),
        txt_ids=torch.zeros(text, 3),
    )


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class DiTBlock(nn.Module):
    """adaLN-zero DiT block: modulated attention and MLP, each gated, on a residual stream."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ada = nn.Linear(dim, 6 * dim)

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).unsqueeze(1).chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + gate1 * self.attn(h, h, h, need_weights=False)[0]
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(h)


class PlainDiT(nn.Module):
    """A DiT written here, not in diffusers: patch tokens, timestep MLP, a ModuleList of blocks."""

    def __init__(self, channels: int = 4, dim: int = 32, depth: int = 4, heads: int = 2) -> None:
        super().__init__()
        self.dim = dim
        self.embed = nn.Linear(channels, dim)
        self.t_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.layers = nn.ModuleList(DiTBlock(dim, heads) for _ in range(depth))
        self.out = nn.Linear(dim, channels)

    def forward(self, x, t):
        c = self.t_mlp(timestep_embedding(t, self.dim))
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h, c)
        return self.out(h)


class NoStack(nn.Module):
    """An MLP with distinct layers: nothing repeated, nothing to cache."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 8)

    def forward(self, x, t):
        return self.b(torch.relu(self.a(x))) * torch.cos(t.float())[:, None, None]


def tiny_wan_pipeline(transformer=None):
    """diffusers' real WanPipeline with no text encoder or VAE (latents in, latents out)."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler,
                       transformer=transformer if transformer is not None else tiny_wan())


def run_wan_pipeline(pipe, steps: int = 8, seed: int = 0, guidance_scale: float = 4.0):
    g = torch.Generator().manual_seed(123)
    prompt = torch.randn(1, 5, 16, generator=g)
    negative = torch.randn(1, 5, 16, generator=g)
    with torch.no_grad():
        return pipe(
            prompt_embeds=prompt, negative_prompt_embeds=negative, height=64, width=64, num_frames=5,
            num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent",
            generator=torch.Generator().manual_seed(seed),
        ).frames


def tiny_wan_two_expert_pipeline(high=None, low=None, boundary_ratio: float = 0.5):
    """Wan2.2's layout: ``transformer`` for the high-noise steps, ``transformer_2`` for the rest."""
    from diffusers import UniPCMultistepScheduler, WanPipeline

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler,
                       transformer=high if high is not None else tiny_wan(seed=0),
                       transformer_2=low if low is not None else tiny_wan(seed=1),
                       boundary_ratio=boundary_ratio)


def tiny_sd3_pipeline(seed: int = 0):
    """diffusers' real StableDiffusion3Pipeline (no text encoders or VAE): it calls its transformer once per
    step (CFG batched) and wraps no call in ``cache_context``, so cachepass places calls by timestep."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=16).eval()
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)


def run_sd3_pipeline(pipe, steps: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(1)
    embeds = dict(prompt_embeds=torch.randn(1, 6, 16, generator=g), pooled_prompt_embeds=torch.randn(1, 12, generator=g),
                  negative_prompt_embeds=torch.randn(1, 6, 16, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, 12, generator=g))
    with torch.no_grad():
        return pipe(**embeds, height=64, width=64, num_inference_steps=steps, guidance_scale=4.0,
                    output_type="latent", generator=torch.Generator().manual_seed(seed)).images


def tiny_flux_pipeline(transformer=None):
    """diffusers' real FluxPipeline with no text encoders or VAE (packed latents out)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None,
                        transformer=transformer if transformer is not None else tiny_flux())


def run_flux_pipeline(pipe, steps: int = 8, seed: int = 0, true_cfg_scale: float = 4.0, **kwargs):
    """True CFG: the transformer is called for "cond" and "uncond" in every step."""
    g = torch.Generator().manual_seed(321)
    embeds = dict(prompt_embeds=torch.randn(1, 6, 16, generator=g), pooled_prompt_embeds=torch.randn(1, 12, generator=g),
                  negative_prompt_embeds=torch.randn(1, 6, 16, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, 12, generator=g))
    with torch.no_grad():
        return pipe(**embeds, true_cfg_scale=true_cfg_scale, height=64, width=64, num_inference_steps=steps,
                    output_type="latent", generator=torch.Generator().manual_seed(seed), **kwargs).images
