"""Every diffusers denoiser family, as a real diffusers class from the smallest config that keeps >= 3
blocks in each block stack, called the way its pipeline calls it.

Each :class:`Family` has a ``build(seed) -> (model, call_inputs)``: ``model`` is the diffusers module in
``eval()`` mode (CPU, float32, weights seeded), ``call_inputs(t)`` the keyword arguments of one pipeline
call at timestep ``t`` (latents, encoder states, pooled projections, masks, rotary tables, guidance...,
with ``return_dict=False``). ``t`` is the value the pipeline hands the model, in its scale and dtype:
FLUX-like pipelines divide the scheduler's timestep by 1000, Wan passes integer timesteps in [0, 1000],
Lumina2 passes ``1 - t / 1000`` (it rises), Cosmos 2 passes ``sigma / (sigma + 1)``. ``steps`` is a short
trajectory of such values (8 steps; the latents move along it, ``_latents``, the text and everything else
stay fixed), and ``status`` what cachepass does with the family today: ``"accelerated"``, or
``"declined"`` with the ``reason`` its warning contains; ``defects`` lists known cachepass defects.

The configs are the smallest the classes accept with >= 3 blocks per stack (widths 16-48, 2 heads, 16-48
latent tokens, 5-6 text tokens), the real layout otherwise (Lumina2 keeps its 2 refiner layers, HiDream
its MoE feed-forwards, ConsisID its face cross-attention every second block). ``tests/test_families.py`` runs them; ``docs/families.md`` tabulates
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

STEPS = 8


# --- timestep trajectories, as each pipeline passes them -------------------------------------------------

def _flow_sigmas(n: int = STEPS, shift: float = 3.0) -> list[float]:
    """FlowMatchEulerDiscreteScheduler's sigmas (1 -> 1/n, shifted): the noise level of each step."""
    sigmas = [1.0 - i / n for i in range(n)]
    return [shift * s / (1 + (shift - 1) * s) for s in sigmas]


FLOW_T = [round(1000 * s, 3) for s in _flow_sigmas()]  # flow timesteps in [0, 1000] (SD3, Sana, LTX, ...)
FLOW_SIGMA = [t / 1000 for t in FLOW_T]  # pipelines passing ``timestep / 1000`` (FLUX, QwenImage, AuraFlow)
FLOW_INT = [int(t) for t in FLOW_T]  # UniPC with flow sigmas (Wan, SkyReels-V2): int64 timesteps
DDPM_T = [999 - 125 * i for i in range(STEPS)]  # DDIM / DPM-Solver integer timesteps, trailing spacing
LUMINA_T = [1 - t / 1000 for t in FLOW_T]  # Lumina2: t = 0 is noise, 1 the image (it rises)


def _karras(n: int = STEPS, lo: float = 0.002, hi: float = 80.0, rho: float = 7.0) -> list[float]:
    ramp = [i / (n - 1) for i in range(n)]
    return [(hi ** (1 / rho) + r * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho for r in ramp]


COSMOS_T = [s / (s + 1) for s in _karras()]  # Cosmos 2 text2image: current_t = sigma / (sigma + 1)


def _t(t, dtype=torch.float32, batch: int = 1) -> torch.Tensor:
    """The pipeline's ``t.expand(batch)``: a 1-d tensor of one timestep per sample."""
    return torch.tensor([t], dtype=dtype).expand(batch)


class _Rand:
    """Seeded random inputs."""

    def __init__(self, seed: int) -> None:
        self.g = torch.Generator().manual_seed(1000 + seed)

    def __call__(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g)


#: the noise level of a timestep, in each pipeline's scale
def T1000(t) -> float:  # noqa: N802  (timesteps in [0, 1000])
    return t / 1000


def UNIT(t) -> float:  # noqa: N802  (timesteps already in [0, 1]: t / 1000, sigma / (sigma + 1))
    return t


def LUMINA(t) -> float:  # noqa: N802  (Lumina2: t = 0 is noise, 1 the image)
    return 1 - t


def _latents(r: _Rand, level: Callable[[Any], float], *shape: int) -> Callable[[Any], torch.Tensor]:
    """The latents of a trajectory: ``x(t) = (1 - s) * clean + s * noise`` at the noise level ``s`` of
    timestep ``t``, so that every step sees new latents, as in a real denoising loop."""
    noise, clean = r(*shape), r(*shape)

    def at(t) -> torch.Tensor:
        s = float(level(t))
        return (1 - s) * clean + s * noise

    return at


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(seed)
    return make().eval()


Builder = Callable[[int], "tuple[nn.Module, Callable[[Any], dict]]"]


@dataclass(frozen=True)
class Family:
    name: str
    cls: str  # the diffusers class
    pipeline: str  # the pipeline whose call the inputs follow
    build: Builder
    steps: tuple = tuple(FLOW_T)
    status: str = "accelerated"  # or "declined"
    reason: str | None = None  # a substring of the decline warning
    skips_attention: bool = True  # False: the attention runs outside the compiled graphs (a graph break)
    rel_l1_bounds: tuple | None = None  # (last step, any step) for interval; None: the file's defaults
    slow_none: bool = False  # its policy-none test is left out of the default run (``-m slow`` runs it)
    #: known cachepass defects, as (check, what goes wrong): the test of that check is an expected failure
    #: (strict) for this family: "warns_once" (a decline logs one warning), "no_recompile" (no graph is
    #: compiled after the first call), "reads_latents" (a reused step depends on its own latents)
    defects: tuple = ()

    @property
    def accelerated(self) -> bool:
        return self.status == "accelerated"

    def defect(self, check: str) -> str | None:
        return dict(self.defects).get(check)

    def __str__(self) -> str:
        return self.name


def first(output) -> torch.Tensor:
    """The sample of a ``return_dict=False`` call (a tuple), or the tensor itself."""
    while isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        output = output.sample
    return output


def latent_key(inputs: dict) -> str:
    """The name of the latents among a call's inputs."""
    return "sample" if "sample" in inputs else "hidden_states"


def perturbed(inputs: dict, scale: float = 0.5) -> dict:
    """The same call with other latents (a seeded perturbation of the latents alone)."""
    key = latent_key(inputs)
    x = inputs[key]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(77))
    return {**inputs, key: x + scale * noise}


def run_loop(model, call_inputs, steps) -> list[torch.Tensor]:
    """A raw denoising loop: one call per timestep, under ``torch.no_grad()``."""
    outs = []
    with torch.no_grad():
        for t in steps:
            outs.append(first(model(**call_inputs(t))).clone())
    return outs


# --- Wan family ----------------------------------------------------------------------------------------

_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=3, cross_attn_norm=True, rope_max_seq_len=32)


def build_wan(seed: int):
    from diffusers import WanTransformer3DModel

    model = _seeded(seed, lambda: WanTransformer3DModel(**_WAN))
    r = _Rand(seed)
    x, text = _latents(r, T1000, 1, 4, 2, 8, 8), r(1, 5, 16)

    def call(t):  # WanPipeline: timestep = t.expand(B), int64 from UniPC's flow sigmas
        return dict(hidden_states=x(t), timestep=_t(t, torch.long), encoder_hidden_states=text, return_dict=False)

    return model, call


def build_wan_vace(seed: int):
    from diffusers import WanVACETransformer3DModel

    model = _seeded(seed, lambda: WanVACETransformer3DModel(**_WAN, vace_layers=[0, 2], vace_in_channels=8))
    r = _Rand(seed)
    x, text, control = _latents(r, T1000, 1, 4, 2, 8, 8), r(1, 5, 16), r(1, 8, 2, 8, 8)
    scale = torch.ones(2)  # WanVACEPipeline: conditioning_scale as a tensor, one per vace layer

    def call(t):
        return dict(hidden_states=x(t), timestep=_t(t, torch.long), encoder_hidden_states=text,
                    control_hidden_states=control, control_hidden_states_scale=scale, return_dict=False)

    return model, call


def build_skyreels_v2(seed: int):
    from diffusers import SkyReelsV2Transformer3DModel

    model = _seeded(seed, lambda: SkyReelsV2Transformer3DModel(**_WAN))
    r = _Rand(seed)
    x, text = _latents(r, T1000, 1, 4, 2, 8, 8), r(1, 5, 16)

    def call(t):
        return dict(hidden_states=x(t), timestep=_t(t, torch.long), encoder_hidden_states=text, return_dict=False)

    return model, call


# --- FLUX-like (double-stream + single-stream MMDiT) -------------------------------------------------------

def build_flux(seed: int):
    from diffusers import FluxTransformer2DModel

    model = _seeded(seed, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=3, num_single_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=12, guidance_embeds=True, axes_dims_rope=(2, 2, 4)))
    r = _Rand(seed)
    x, text, pooled = _latents(r, UNIT, 1, 16, 8), r(1, 6, 16), r(1, 12)
    img_ids = torch.zeros(4, 4, 3)
    img_ids[..., 1] += torch.arange(4)[:, None]
    img_ids[..., 2] += torch.arange(4)[None, :]
    img_ids, txt_ids = img_ids.reshape(16, 3), torch.zeros(6, 3)
    guidance = torch.full([1], 3.5)  # FLUX.1-dev: guidance_scale, expanded to the batch

    def call(t):  # FluxPipeline: timestep / 1000
        return dict(hidden_states=x(t), timestep=_t(t), guidance=guidance, pooled_projections=pooled,
                    encoder_hidden_states=text, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)

    return model, call


def build_chroma(seed: int):
    from diffusers import ChromaTransformer2DModel

    model = _seeded(seed, lambda: ChromaTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=3, num_single_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1))
    r = _Rand(seed)
    x, text = _latents(r, UNIT, 1, 16, 8), r(1, 6, 16)
    img_ids, txt_ids = torch.zeros(16, 3), torch.zeros(6, 3)
    # ChromaPipeline._prepare_attention_mask: the text mask (one pad token unmasked) + ones for the image
    text_mask = torch.tensor([[True] * 5 + [False]])
    mask = torch.cat([text_mask, torch.ones(1, 16, dtype=torch.bool)], dim=1)

    def call(t):
        return dict(hidden_states=x(t), timestep=_t(t), encoder_hidden_states=text, txt_ids=txt_ids, img_ids=img_ids,
                    attention_mask=mask, return_dict=False)

    return model, call


def build_flux2(seed: int):
    from diffusers import Flux2Transformer2DModel

    model = _seeded(seed, lambda: Flux2Transformer2DModel(
        patch_size=1, in_channels=8, num_layers=3, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, timestep_guidance_channels=16, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=True))
    r = _Rand(seed)
    x, text = _latents(r, UNIT, 1, 16, 8), r(1, 6, 16)
    img_ids = torch.zeros(1, 16, 4)
    img_ids[0, :, 1] = torch.arange(16) // 4
    img_ids[0, :, 2] = torch.arange(16) % 4
    txt_ids = torch.zeros(1, 6, 4)
    txt_ids[0, :, 3] = torch.arange(6)
    guidance = torch.full([1], 4.0)

    def call(t):  # Flux2Pipeline: timestep / 1000, ids of 4 axes with a batch dimension
        return dict(hidden_states=x(t), timestep=_t(t), guidance=guidance, encoder_hidden_states=text, txt_ids=txt_ids,
                    img_ids=img_ids, return_dict=False)

    return model, call


def build_sd3(seed: int):
    from diffusers import SD3Transformer2DModel

    model = _seeded(seed, lambda: SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=12, out_channels=4,
        pos_embed_max_size=16))
    r = _Rand(seed)
    x, text, pooled = _latents(r, T1000, 1, 4, 8, 8), r(1, 6, 16), r(1, 12)

    def call(t):  # StableDiffusion3Pipeline: t.expand(B), flow timesteps in [0, 1000]
        return dict(hidden_states=x(t), timestep=_t(t), encoder_hidden_states=text, pooled_projections=pooled,
                    return_dict=False)

    return model, call


def build_auraflow(seed: int):
    from diffusers import AuraFlowTransformer2DModel

    model = _seeded(seed, lambda: AuraFlowTransformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=3, num_single_dit_layers=3, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, out_channels=4,
        pos_embed_max_size=64))
    r = _Rand(seed)
    x, text = _latents(r, UNIT, 1, 4, 8, 8), r(1, 6, 16)

    def call(t):  # AuraFlowPipeline: torch.tensor([t / 1000]).expand(B)
        return dict(hidden_states=x(t), encoder_hidden_states=text, timestep=_t(t), return_dict=False)

    return model, call


def build_hidream(seed: int):
    from diffusers import HiDreamImageTransformer2DModel

    layers = 3 + 3
    model = _seeded(seed, lambda: HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=3, num_single_layers=3, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[16, 16], text_emb_dim=16, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(16, 16), llama_layers=list(range(layers))))
    r = _Rand(seed)
    x, t5, pooled = _latents(r, T1000, 1, 4, 8, 8), r(1, 6, 16), r(1, 16)
    llama = r(layers, 1, 6, 16)  # one hidden state per selected Llama layer, stacked

    def call(t):  # HiDreamImagePipeline: t.expand(B), flow timesteps in [0, 1000]
        return dict(hidden_states=x(t), timesteps=_t(t), encoder_hidden_states_t5=t5,
                    encoder_hidden_states_llama3=llama, pooled_embeds=pooled, return_dict=False)

    return model, call


def build_qwenimage(seed: int):
    from diffusers import QwenImageTransformer2DModel

    model = _seeded(seed, lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(4, 6, 6)))
    r = _Rand(seed)
    x, text = _latents(r, UNIT, 1, 16, 16), r(1, 6, 16)  # packed latents: 4 x 4 patches of 2 x 2 x 4 channels
    mask = torch.ones(1, 6, dtype=torch.long)
    img_shapes = [[(1, 4, 4)]]

    def call(t):  # QwenImagePipeline: timestep / 1000
        return dict(hidden_states=x(t), timestep=_t(t), guidance=None, encoder_hidden_states_mask=mask,
                    encoder_hidden_states=text, img_shapes=img_shapes, return_dict=False)

    return model, call


# --- PixArt / Sana / DiT (cross-attention DiTs) ------------------------------------------------------------

def build_pixart(seed: int):
    from diffusers import PixArtTransformer2DModel

    model = _seeded(seed, lambda: PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=16, norm_type="ada_norm_single",
        use_additional_conditions=False))
    r = _Rand(seed)
    x, text = _latents(r, T1000, 1, 4, 8, 8), r(1, 6, 16)
    mask = torch.ones(1, 6, dtype=torch.long)

    def call(t):  # PixArtSigmaPipeline: current_timestep.expand(B), DPM-Solver integer timesteps
        return dict(hidden_states=x(t), encoder_hidden_states=text, encoder_attention_mask=mask,
                    timestep=_t(t, torch.long), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                    return_dict=False)

    return model, call


def build_sana(seed: int):
    from diffusers import SanaTransformer2DModel

    model = _seeded(seed, lambda: SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=3,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=16,
        sample_size=8, patch_size=1))
    r = _Rand(seed)
    x, text = _latents(r, T1000, 1, 4, 8, 8), r(1, 6, 16)
    mask = torch.ones(1, 6, dtype=torch.long)

    def call(t):  # SanaPipeline: t.expand(B) * timestep_scale (1.0)
        return dict(hidden_states=x(t), encoder_hidden_states=text, encoder_attention_mask=mask, timestep=_t(t),
                    return_dict=False)

    return model, call


def build_dit(seed: int):
    from diffusers import DiTTransformer2DModel

    model = _seeded(seed, lambda: DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3, sample_size=8,
        patch_size=2))
    r = _Rand(seed)
    x = _latents(r, T1000, 1, 4, 8, 8)
    labels = torch.tensor([3])

    def call(t):  # DiTPipeline: timesteps.expand(B), integer DDIM timesteps, class labels
        return dict(hidden_states=x(t), timestep=_t(t, torch.long), class_labels=labels, return_dict=False)

    return model, call


# --- CogVideoX / CogView / ConsisID ------------------------------------------------------------------------

def build_cogvideox(seed: int):
    from diffusers import CogVideoXTransformer3DModel

    model = _seeded(seed, lambda: CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=16, num_layers=3, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=6))
    r = _Rand(seed)
    x, text = _latents(r, T1000, 1, 3, 4, 8, 8), r(1, 6, 16)  # (B, frames, C, H, W): 9 frames -> 3 latent frames

    def call(t):  # CogVideoXPipeline: t.expand(B), integer DDIM timesteps; no rotary table for 2B
        return dict(hidden_states=x(t), encoder_hidden_states=text, timestep=_t(t, torch.long), image_rotary_emb=None,
                    return_dict=False)

    return model, call


def build_consisid(seed: int):
    from diffusers import ConsisIDTransformer3DModel

    model = _seeded(seed, lambda: ConsisIDTransformer3DModel(
        num_attention_heads=2, attention_head_dim=24, in_channels=8, out_channels=4, time_embed_dim=16,
        text_embed_dim=16, num_layers=4, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=6, is_train_face=True, is_kps=False,
        cross_attn_interval=2, cross_attn_dim_head=8, cross_attn_num_heads=2, LFE_id_dim=16, LFE_vit_dim=16,
        LFE_depth=1, LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=2, LFE_num_querie=2, LFE_output_dim=32,
        LFE_ff_mult=1, LFE_num_scale=1))
    r = _Rand(seed)
    x, text = _latents(r, T1000, 1, 3, 8, 8, 8), r(1, 6, 16)  # noisy latents and the image latents, joined on channels
    id_cond = r(1, 16)
    id_vit_hidden = [r(1, 4, 16)]  # one per LFE scale

    def call(t):  # ConsisIDPipeline: t.expand(B), integer timesteps, face embeddings
        return dict(hidden_states=x(t), encoder_hidden_states=text, timestep=_t(t, torch.long), image_rotary_emb=None,
                    id_vit_hidden=id_vit_hidden, id_cond=id_cond, return_dict=False)

    return model, call


def _cogview_sizes():
    size = torch.tensor([[64.0, 64.0]])
    return dict(original_size=size, target_size=size, crop_coords=torch.tensor([[0.0, 0.0]]))


def build_cogview3plus(seed: int):
    from diffusers import CogView3PlusTransformer2DModel

    model = _seeded(seed, lambda: CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2, out_channels=4,
        text_embed_dim=16, time_embed_dim=16, condition_dim=4, pos_embed_max_size=16, sample_size=8))
    r = _Rand(seed)
    x, text = _latents(r, T1000, 1, 4, 8, 8), r(1, 6, 16)
    sizes = _cogview_sizes()

    def call(t):  # CogView3PlusPipeline: t.expand(B), integer DDIM timesteps, SDXL-like size conditions
        return dict(hidden_states=x(t), encoder_hidden_states=text, timestep=_t(t, torch.long), **sizes,
                    return_dict=False)

    return model, call


def build_cogview4(seed: int):
    from diffusers import CogView4Transformer2DModel

    model = _seeded(seed, lambda: CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        text_embed_dim=16, time_embed_dim=16, condition_dim=4, pos_embed_max_size=16, sample_size=8,
        rope_axes_dim=(4, 4)))
    r = _Rand(seed)
    x, text = _latents(r, T1000, 1, 4, 8, 8), r(1, 6, 16)
    sizes = _cogview_sizes()

    def call(t):  # CogView4Pipeline: t.expand(B), flow timesteps in [0, 1000]
        return dict(hidden_states=x(t), encoder_hidden_states=text, timestep=_t(t), **sizes, return_dict=False)

    return model, call


# --- Hunyuan -----------------------------------------------------------------------------------------------

def build_hunyuan_video(seed: int):
    from diffusers import HunyuanVideoTransformer3DModel

    model = _seeded(seed, lambda: HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=3, num_single_layers=3,
        num_refiner_layers=2, mlp_ratio=2.0, patch_size=1, patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(2, 2, 4)))
    r = _Rand(seed)
    x, text, pooled = _latents(r, T1000, 1, 4, 2, 4, 4), r(1, 6, 16), r(1, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])  # the Llama prompt's attention mask, one pad token
    guidance = torch.tensor([6.0]) * 1000.0  # HunyuanVideoPipeline: guidance_scale * 1000

    def call(t):  # HunyuanVideoPipeline: t.expand(B), flow timesteps in [0, 1000]
        return dict(hidden_states=x(t), timestep=_t(t), encoder_hidden_states=text, encoder_attention_mask=mask,
                    pooled_projections=pooled, guidance=guidance, return_dict=False)

    return model, call


def build_hunyuan_dit(seed: int):
    from diffusers import HunyuanDiT2DModel
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    model = _seeded(seed, lambda: HunyuanDiT2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8, hidden_size=16,
        num_layers=4, mlp_ratio=2.0, learn_sigma=True, cross_attention_dim=16, cross_attention_dim_t5=16,
        pooled_projection_dim=16, text_len=6, text_len_t5=6))
    r = _Rand(seed)
    x, text, text_t5 = _latents(r, T1000, 1, 4, 8, 8), r(1, 6, 16), r(1, 6, 16)
    mask, mask_t5 = torch.ones(1, 6, dtype=torch.long), torch.ones(1, 6, dtype=torch.long)
    # HunyuanDiTPipeline: the 2-d rotary table of the 4 x 4 patch grid, size and crop ids, style 0
    rotary = get_2d_rotary_pos_embed(8, ((0, 0), (4, 4)), (4, 4), output_type="pt")
    meta = torch.tensor([[64.0, 64.0, 64.0, 64.0, 0.0, 0.0]])
    style = torch.tensor([0])

    def call(t):  # t_expand = tensor([t] * B) in the latents' dtype, integer DDPM timesteps
        return dict(hidden_states=x(t), timestep=_t(t), encoder_hidden_states=text, text_embedding_mask=mask,
                    encoder_hidden_states_t5=text_t5, text_embedding_mask_t5=mask_t5, image_meta_size=meta,
                    style=style, image_rotary_emb=rotary, return_dict=False)

    return model, call


# --- other video DiTs --------------------------------------------------------------------------------------

def build_ltx(seed: int):
    from diffusers import LTXVideoTransformer3DModel

    model = _seeded(seed, lambda: LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=3, caption_channels=16))
    r = _Rand(seed)
    x, text = _latents(r, T1000, 1, 2 * 4 * 4, 8), r(1, 6, 16)  # packed latents: 2 frames of 4 x 4
    mask = torch.ones(1, 6, dtype=torch.long)
    rope_scale = (8 / 25, 32, 32)  # LTXPipeline: (temporal compression / frame rate, spatial, spatial)

    def call(t):  # LTXPipeline: t.expand(B), flow timesteps in [0, 1000]
        return dict(hidden_states=x(t), encoder_hidden_states=text, timestep=_t(t), encoder_attention_mask=mask,
                    num_frames=2, height=4, width=4, rope_interpolation_scale=rope_scale, return_dict=False)

    return model, call


def _resize_shim():
    """``transformer_cosmos`` resizes the padding mask with torchvision's ``transforms``, which is not a
    dependency here: give the module a nearest-neighbour stand-in (the pipelines' masks are already at the
    latent size, so the resize is the identity)."""
    from diffusers.models.transformers import transformer_cosmos

    if hasattr(transformer_cosmos, "transforms"):
        return

    class functional:  # noqa: N801  (torchvision's names)
        @staticmethod
        def resize(x, size, interpolation=None):
            return torch.nn.functional.interpolate(x, size=tuple(size), mode="nearest")

    class transforms:  # noqa: N801
        InterpolationMode = type("InterpolationMode", (), {"NEAREST": "nearest"})

    transforms.functional = functional
    transformer_cosmos.transforms = transforms


def build_cosmos(seed: int):
    from diffusers import CosmosTransformer3DModel

    _resize_shim()
    model = _seeded(seed, lambda: CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=3, mlp_ratio=2.0,
        text_embed_dim=16, adaln_lora_dim=8, max_size=(4, 16, 16), patch_size=(1, 2, 2), rope_scale=(1.0, 4.0, 4.0),
        concat_padding_mask=True, extra_pos_embed_type=None))
    r = _Rand(seed)
    x, text = _latents(r, UNIT, 1, 4, 1, 8, 8), r(1, 6, 16)  # text2image: one latent frame
    padding_mask = torch.zeros(1, 1, 8, 8)

    def call(t):  # Cosmos2TextToImagePipeline: current_t = sigma / (sigma + 1), expanded to the batch
        return dict(hidden_states=x(t), timestep=_t(t), encoder_hidden_states=text, padding_mask=padding_mask,
                    return_dict=False)

    return model, call


def build_allegro(seed: int):
    from diffusers import AllegroTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    model = _seeded(seed, lambda: AllegroTransformer3DModel(
        patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        num_layers=3, cross_attention_dim=24, sample_height=8, sample_width=8, sample_frames=2, caption_channels=16))
    r = _Rand(seed)
    x, text = _latents(r, T1000, 1, 4, 2, 8, 8), r(1, 6, 16)
    mask = torch.ones(1, 6, dtype=torch.long)
    # AllegroPipeline._prepare_rotary_positional_embeddings for a 2 x 4 x 4 patch grid
    freqs_t, freqs_h, freqs_w, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=12, crops_coords=((0, 0), (4, 4)), grid_size=(4, 4), temporal_size=2,
        interpolation_scale=(2.2, 2.0, 2.0))
    pos = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long())
    grid_t, grid_h, grid_w = pos.reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1).contiguous()
    rotary = ((freqs_t, freqs_h, freqs_w), (grid_t, grid_h, grid_w))

    def call(t):  # AllegroPipeline: t.expand(B), Euler-ancestral timesteps in [0, 1000]
        return dict(hidden_states=x(t), encoder_hidden_states=text, encoder_attention_mask=mask, timestep=_t(t),
                    image_rotary_emb=rotary, return_dict=False)

    return model, call


def build_mochi(seed: int):
    from diffusers import MochiTransformer3DModel

    model = _seeded(seed, lambda: MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=3, pooled_projection_dim=16,
        in_channels=4, text_embed_dim=16, time_embed_dim=16, max_sequence_length=6))
    r = _Rand(seed)
    x, text = _latents(r, T1000, 1, 4, 2, 8, 8), r(1, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])

    def call(t):  # MochiPipeline: t.expand(B), flow timesteps in [0, 1000]
        return dict(hidden_states=x(t), encoder_hidden_states=text, timestep=_t(t), encoder_attention_mask=mask,
                    return_dict=False)

    return model, call


def build_latte(seed: int):
    from diffusers import LatteTransformer3DModel

    model = _seeded(seed, lambda: LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3,
        cross_attention_dim=16, sample_size=8, patch_size=2, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        caption_channels=16, video_length=2))
    r = _Rand(seed)
    x, text = _latents(r, T1000, 1, 4, 2, 8, 8), r(1, 6, 16)

    def call(t):  # LattePipeline: current_timestep.expand(B), integer DDIM timesteps
        return dict(hidden_states=x(t), encoder_hidden_states=text, timestep=_t(t, torch.long),
                    enable_temporal_attentions=True, return_dict=False)

    return model, call


def build_easyanimate(seed: int):
    from diffusers import EasyAnimateTransformer3DModel

    model = _seeded(seed, lambda: EasyAnimateTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2, sample_width=8,
        sample_height=8, num_layers=3, mmdit_layers=3, time_embed_dim=16, text_embed_dim=16))
    r = _Rand(seed)
    x, text = _latents(r, T1000, 1, 4, 2, 8, 8), r(1, 6, 16)

    def call(t):  # EasyAnimatePipeline: t_expand = tensor([t] * B) in the latents' dtype, flow timesteps
        return dict(hidden_states=x(t), timestep=_t(t), encoder_hidden_states=text, return_dict=False)

    return model, call


def build_lumina2(seed: int):
    from diffusers import Lumina2Transformer2DModel

    model = _seeded(seed, lambda: Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=3, num_refiner_layers=2,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32),
        cap_feat_dim=16))
    r = _Rand(seed)
    x, text = _latents(r, LUMINA, 1, 4, 8, 8), r(1, 6, 16)
    mask = torch.tensor([[True] * 5 + [False]])

    def call(t):  # Lumina2Pipeline: current_timestep = 1 - t / 1000, expanded to the batch
        return dict(hidden_states=x(t), timestep=_t(t), encoder_hidden_states=text, encoder_attention_mask=mask,
                    return_dict=False)

    return model, call


# --- UNet (no transformer block stack) ---------------------------------------------------------------------

def build_unet(seed: int):
    from diffusers import UNet2DConditionModel

    model = _seeded(seed, lambda: UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=8))
    r = _Rand(seed)
    x, text = _latents(r, T1000, 1, 4, 8, 8), r(1, 6, 16)

    def call(t):  # StableDiffusionPipeline: self.unet(latents, t, ...), t a 0-d int64 tensor
        return dict(sample=x(t), timestep=torch.tensor(t, dtype=torch.long), encoder_hidden_states=text,
                    return_dict=False)

    return model, call


#: the reasons of the declines, as the one warning on the ``cachepass`` logger says them
RESIDUAL = "has no body input of the same shape and dtype to form a residual with"
NO_STACK = "no block stack found"
SPLIT = "a graph break splits the block stack"

FAMILIES: list[Family] = [
    Family("Wan", "WanTransformer3DModel", "WanPipeline", build_wan, tuple(FLOW_INT)),
    Family("WanVACE", "WanVACETransformer3DModel", "WanVACEPipeline", build_wan_vace, tuple(FLOW_INT)),
    Family("SkyReelsV2", "SkyReelsV2Transformer3DModel", "SkyReelsV2Pipeline", build_skyreels_v2, tuple(FLOW_INT)),
    Family("FLUX", "FluxTransformer2DModel", "FluxPipeline", build_flux, tuple(FLOW_SIGMA)),
    # joined streams (text + image tokens concatenated between the stacks); Chroma's tiny random model moves
    # 0.68 (relative L1) between the last two steps eagerly, so a reused step's error follows
    Family("Chroma", "ChromaTransformer2DModel", "ChromaPipeline", build_chroma, tuple(FLOW_SIGMA),
           rel_l1_bounds=(0.6, 0.7)),
    Family("Flux2", "Flux2Transformer2DModel", "Flux2Pipeline", build_flux2, tuple(FLOW_SIGMA)),
    Family("SD3", "SD3Transformer2DModel", "StableDiffusion3Pipeline", build_sd3),
    Family("AuraFlow", "AuraFlowTransformer2DModel", "AuraFlowPipeline", build_auraflow, tuple(FLOW_SIGMA)),
    Family("HiDream", "HiDreamImageTransformer2DModel", "HiDreamImagePipeline", build_hidream,
           slow_none=True),  # graph breaks in every block's MoE: the fragments follow one decision per call
    Family("QwenImage", "QwenImageTransformer2DModel", "QwenImagePipeline", build_qwenimage, tuple(FLOW_SIGMA)),
    Family("PixArt", "PixArtTransformer2DModel", "PixArtSigmaPipeline", build_pixart, tuple(DDPM_T)),
    Family("Sana", "SanaTransformer2DModel", "SanaPipeline", build_sana),
    Family("DiT", "DiTTransformer2DModel", "DiTPipeline", build_dit, tuple(DDPM_T)),
    Family("CogVideoX", "CogVideoXTransformer3DModel", "CogVideoXPipeline", build_cogvideox, tuple(DDPM_T)),
    Family("ConsisID", "ConsisIDTransformer3DModel", "ConsisIDPipeline", build_consisid, tuple(DDPM_T)),
    Family("CogView3Plus", "CogView3PlusTransformer2DModel", "CogView3PlusPipeline", build_cogview3plus,
           tuple(DDPM_T)),
    Family("CogView4", "CogView4Transformer2DModel", "CogView4Pipeline", build_cogview4),
    Family("HunyuanVideo", "HunyuanVideoTransformer3DModel", "HunyuanVideoPipeline", build_hunyuan_video,
           slow_none=True),
    Family("HunyuanDiT", "HunyuanDiT2DModel", "HunyuanDiTPipeline", build_hunyuan_dit, tuple(DDPM_T)),
    Family("LTX", "LTXVideoTransformer3DModel", "LTXPipeline", build_ltx),
    Family("Cosmos", "CosmosTransformer3DModel", "Cosmos2TextToImagePipeline", build_cosmos, tuple(COSMOS_T)),
    Family("Allegro", "AllegroTransformer3DModel", "AllegroPipeline", build_allegro,
           slow_none=True),
    # a graph break in the attention processor: attention runs as Python between each block's graphs, so a
    # reused step skips the rest of the blocks but not the attention; the tiny model moves 0.40 eagerly
    # over the last step
    Family("Mochi", "MochiTransformer3DModel", "MochiPipeline", build_mochi, slow_none=True,
           skips_attention=False, rel_l1_bounds=(0.4, 0.5)),
    # spatial blocks of one list alternate with temporal blocks of another: the stack runs across them
    Family("Latte", "LatteTransformer3DModel", "LattePipeline", build_latte, tuple(DDPM_T)),
    Family("EasyAnimate", "EasyAnimateTransformer3DModel", "EasyAnimatePipeline", build_easyanimate),
    # the refiners, then the joint sequence written per sample into a new tensor, then the joint blocks: the
    # span narrows to the joint stack, whose input pairs; the refiners always run
    Family("Lumina2", "Lumina2Transformer2DModel", "Lumina2Pipeline", build_lumina2, tuple(LUMINA_T),
           slow_none=True),
    Family("UNet2DCondition", "UNet2DConditionModel", "StableDiffusionPipeline", build_unet, tuple(DDPM_T),
           slow_none=True),  # DeepCache's cut: the deep feature entering the last up level is cached
]

BY_NAME = {f.name: f for f in FAMILIES}
assert len(BY_NAME) == len(FAMILIES)
