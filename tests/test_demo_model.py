"""The embedded digits model: it loads offline, runs through the real WanPipeline, and is trained."""

import socket

import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel

from cachepass.demo import model as demo

STEPS = 4  # short generations keep this file fast; quality is checked with a few more


@pytest.fixture(scope="module")
def pipe():
    return demo.make_pipeline()


def test_loads_offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    demo._load_file.cache_clear()
    model = demo.load_digits_model()
    assert isinstance(model, WanTransformer3DModel)
    assert not model.training
    assert tuple(model.config.patch_size) == (1, 2, 2)
    assert model.config.num_layers == demo.MODEL_CONFIG["num_layers"]
    assert all(not p.requires_grad for p in model.parameters())


def test_weight_file_is_small_and_records_training():
    assert demo.WEIGHTS_PATH.stat().st_size < 10 * 1024 * 1024
    info = demo.training_info()
    assert info["steps"] > 0 and info["parameters"] > 0


def test_prompt_embeddings():
    cond = demo.prompt_embeds_for([0, 9, 9])
    neg = demo.negative_prompt_embeds(3)
    assert cond.shape == neg.shape == (3, demo.PROMPT_TOKENS, demo.MODEL_CONFIG["text_dim"])
    assert torch.equal(cond[1], cond[2]) and not torch.equal(cond[0], cond[1])
    assert not torch.equal(cond[0], neg[0])
    with pytest.raises(ValueError):
        demo.prompt_embeds_for([10])


def test_generation_shape_and_frames(pipe):
    latents = demo.generate(pipe, [3, 7], num_inference_steps=STEPS, seed=0)
    assert latents.shape == (2, 1, demo.LATENT_FRAMES, demo.LATENT_SIZE, demo.LATENT_SIZE)
    assert torch.isfinite(latents).all()
    frames = demo.to_frames(latents)
    assert frames.dtype == np.uint8 and frames.shape == (2, demo.LATENT_FRAMES, demo.LATENT_SIZE, demo.LATENT_SIZE)


def test_seed_determines_output(pipe):
    a = demo.generate(pipe, [5], num_inference_steps=STEPS, seed=1)
    b = demo.generate(pipe, [5], num_inference_steps=STEPS, seed=1)
    c = demo.generate(pipe, [5], num_inference_steps=STEPS, seed=2)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.05


def test_class_conditioning_matters(pipe):
    ones = demo.generate(pipe, [1], num_inference_steps=STEPS, seed=0)
    eights = demo.generate(pipe, [8], num_inference_steps=STEPS, seed=0)
    assert (ones - eights).abs().mean() > 0.1


def test_samples_resemble_the_asked_digit(pipe):
    """Each generated video correlates best with the mean image of its own class (after centring)."""
    pytest.importorskip("sklearn")
    from cachepass.demo.train import center_frames, load_digit_canvases

    canvases, labels = load_digit_canvases()
    means = torch.stack([center_frames(canvases[labels == k, 0] * 2 - 1).mean(0) for k in range(10)])
    digits = list(range(10)) * 2
    latents = demo.generate(pipe, digits, num_inference_steps=8, seed=0)
    frames = center_frames(latents[:, 0].reshape(-1, demo.LATENT_SIZE, demo.LATENT_SIZE))

    def unit(x):
        x = x.flatten(1)
        x = x - x.mean(1, keepdim=True)
        return x / x.norm(dim=1, keepdim=True)

    scores = (unit(frames) @ unit(means).T).view(len(digits), demo.LATENT_FRAMES, 10).mean(1)
    correct = (scores.argmax(1) == torch.tensor(digits)).sum().item()
    assert correct >= 16, f"only {correct}/20 samples look like the asked digit"
