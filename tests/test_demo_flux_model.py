"""The embedded FLUX digits model: it loads offline, runs through the real FluxPipeline with true CFG,
is trained, and cachepass caches it inside the pipeline."""

import socket

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel

import cachepass
from cachepass.demo import flux_model as flux
from cachepass.metrics import psnr

STEPS = 4  # short generations keep this file fast; quality is checked with a few more


@pytest.fixture(scope="module")
def model():
    return flux.load_digits_flux_model()


@pytest.fixture(scope="module")
def pipe(model):
    return flux.make_flux_pipeline(model)


def test_loads_offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    flux._load_file.cache_clear()
    model = flux.load_digits_flux_model()
    assert isinstance(model, FluxTransformer2DModel)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert len(model.transformer_blocks) == flux.FLUX_CONFIG["num_layers"] > 0
    assert len(model.single_transformer_blocks) == flux.FLUX_CONFIG["num_single_layers"] > 0
    assert not model.config.guidance_embeds
    assert sum(model.config.axes_dims_rope) == model.config.attention_head_dim


def test_weight_file_is_small_and_records_training(model):
    assert flux.FLUX_WEIGHTS_PATH.stat().st_size < 10 * 1024 * 1024
    info = flux.flux_training_info()
    assert info["steps"] > 0 and info["seconds"] > 0
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert np.isfinite(info["final_loss"]) and info["eval_accuracy"] > 0.5


def test_prompt_tables():
    prompt, pooled = flux.flux_prompt_embeds([0, 9, 9])
    neg_prompt, neg_pooled = flux.flux_prompt_embeds([0, 9, 9], negative=True)
    assert prompt.shape == neg_prompt.shape == (3, flux.PROMPT_TOKENS, flux.PROMPT_DIM)
    assert pooled.shape == neg_pooled.shape == (3, flux.POOLED_DIM)
    assert torch.equal(prompt[1], prompt[2]) and not torch.equal(prompt[0], prompt[1])
    assert not torch.equal(pooled[0], neg_pooled[0]) and torch.equal(neg_pooled[0], neg_pooled[2])
    with pytest.raises(ValueError):
        flux.flux_prompt_embeds([10])


def test_true_cfg_through_the_real_pipeline(pipe, model):
    """FluxPipeline with true CFG calls the transformer twice per step (cond, uncond); 1.0 turns it off."""
    assert type(pipe) is FluxPipeline
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        latents = flux.generate_flux(pipe, [3, 7], num_inference_steps=STEPS, seed=0)
        cfg_calls = len(calls)
        calls.clear()
        flux.generate_flux(pipe, [3, 7], num_inference_steps=STEPS, true_cfg_scale=1.0, seed=0)
    finally:
        handle.remove()
    assert cfg_calls == 2 * STEPS and len(calls) == STEPS
    assert latents.shape == (2, 1, flux.LATENT_SIZE, flux.LATENT_SIZE)
    assert torch.isfinite(latents).all()
    images = flux.to_images(latents)
    assert images.dtype == np.uint8 and images.shape == (2, flux.LATENT_SIZE, flux.LATENT_SIZE)


def test_seed_determines_output(pipe):
    a = flux.generate_flux(pipe, [5], num_inference_steps=STEPS, seed=1)
    b = flux.generate_flux(pipe, [5], num_inference_steps=STEPS, seed=1)
    c = flux.generate_flux(pipe, [5], num_inference_steps=STEPS, seed=2)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.05


def test_samples_resemble_the_asked_digit(pipe):
    """Each generated image correlates best with the mean image of its own class (after centring);
    random weights give noise that matches no class."""
    pytest.importorskip("sklearn")
    from cachepass.demo.train import center_frames, load_digit_canvases

    canvases, labels = load_digit_canvases()
    means = torch.stack([center_frames(canvases[labels == k, 0] * 2 - 1).mean(0) for k in range(10)])
    digits = list(range(10)) * 2
    latents = flux.generate_flux(pipe, digits, num_inference_steps=12, seed=0)
    images = center_frames(latents[:, 0])

    def unit(x):
        x = x.flatten(1)
        x = x - x.mean(1, keepdim=True)
        return x / x.norm(dim=1, keepdim=True)

    scores = unit(images) @ unit(means).T
    correct = (scores.argmax(1) == torch.tensor(digits)).sum().item()
    assert correct >= 16, f"only {correct}/20 samples look like the asked digit"
    assert (latents[1] - latents[8]).abs().mean() > 0.1  # a 1 is not an 8


def test_interval_cache_skips_steps_inside_the_pipeline(model):
    """interval 3 computes steps 0, 3, ..., 15 of 16 in both branches; measured 33.3 dB from the full run."""
    steps = 16
    digits = [0, 4, 7]
    with torch.no_grad():
        full = flux.generate_flux(flux.make_flux_pipeline(model), digits, num_inference_steps=steps, seed=0)
        pipe = flux.make_flux_pipeline(model)
        options = {"policy": "interval", "interval": 3, "inner": "eager"}
        pipe.transformer = torch.compile(model, backend="cachepass", options=options)
        out = flux.generate_flux(pipe, digits, num_inference_steps=steps, seed=0)
    per_branch = cachepass.stats(model).branches
    assert [b.name for b in per_branch] == ["cond", "uncond"]
    assert all(b.steps == steps and b.computed_steps[0] == 0 for b in per_branch), per_branch
    assert all(len(b.computed_steps) <= steps // 2 for b in per_branch), per_branch
    assert psnr(out, full) > 28.0
