"""U-Nets (issue 12, part 3): DeepCache (arXiv 2312.00858) found from the graph.

A U-Net has no stack of same-class blocks; its skip connections (a ``cat`` of a down-path feature map into
the up path, along the channels) give the cut: the shallowest skip level (the input convolution's and the
first down level's outputs, read by the last up level) is recomputed on every call, and the deep feature
entering the last up level is cached as a value (no residual partner) and read back by a reuse call, which
skips the deeper down levels, the middle and the deeper up levels.

On a U-Net written here (:class:`TinyUNet`): the cut, the regions, the graph variants, the policies that
apply and those that do not. On diffusers' ``UNet2DConditionModel`` (``tests/families.py``'s tiny config,
and SD 1.5- and SDXL-shaped ones): ``policy="none"`` equals eager, ``interval`` runs fewer attention calls
and stays close to the full computation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import count_attention_calls, relative_l1
from families import BY_NAME, run_loop
from torch import nn

import cachepass
from cachepass.analysis.structure import analyse
from cachepass.analysis.unet import find_unet
from cachepass.errors import UnsupportedStructure
from cachepass.policies.base import Requirements
from cachepass.reconstruction import TaylorReuse
from cachepass.transform.partition import VALUE
from cachepass.transform.partition import partition as make_partition
from cachepass.transform.variants import build_variants

STEPS = [999 - 125 * i for i in range(8)]  # DDIM-like integer timesteps, as StableDiffusionPipeline passes them


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- a U-Net written here -----------------------------------------------------------------------------

def sinusoid(t: torch.Tensor, dim: int = 8) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float().reshape(-1)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Res(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(cin, cout, 3, padding=1), nn.Conv2d(cout, cout, 3, padding=1)
        self.temb = nn.Linear(16, cout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = F.silu(self.conv1(F.silu(x))) + self.temb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(h))


class SpatialAttention(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.qkv, self.out = nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = (z.flatten(2).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=1))
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, c, h, w)
        return x + self.out(a)


class TinyUNet(nn.Module):
    """Two levels: 8 x 8 (input conv, a resnet; the last up resnet) and 4 x 4 (a resnet with attention, the
    middle, an up resnet with attention, then the upsampling back to 8 x 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.t_mlp = nn.Linear(8, 16)
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.down0 = Res(8, 8)
        self.pool = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.down1, self.attn1 = Res(8, 16), SpatialAttention(16)
        self.mid, self.attn_mid = Res(16, 16), SpatialAttention(16)
        self.up1, self.attn_up = Res(32, 16), SpatialAttention(16)
        self.upsample = nn.Conv2d(16, 16, 3, padding=1)
        self.up0 = Res(16 + 8, 8)
        self.conv_out = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x, t):
        emb = self.t_mlp(sinusoid(t))
        s0 = self.down0(self.conv_in(x), emb)
        s1 = self.attn1(self.down1(self.pool(s0), emb))
        h = self.attn_mid(self.mid(s1, emb))
        h = self.attn_up(self.up1(torch.cat([h, s1], dim=1), emb))
        h = self.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up0(torch.cat([h, s0], dim=1), emb)
        return self.conv_out(F.silu(h))


def tiny_unet(seed: int = 0):
    torch.manual_seed(seed)
    return TinyUNet().eval(), torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def capture(model, *args):
    graphs = []

    def record(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=record, fullgraph=True)(*args)
    (graph,) = graphs
    return graph


@pytest.fixture(scope="module")
def unet():
    model, x = tiny_unet()
    gm, args = capture(model, x, torch.tensor([STEPS[2]]))
    return model, gm, args, analyse(gm)


def _attention(nodes) -> list:
    return [n for n in nodes if n.op == "call_function" and "scaled_dot_product_attention" in str(n.target)]


def test_the_cut_is_found_from_the_skip_connections(unet):
    _, gm, _, structure = unet
    cut = structure.unet
    assert cut is not None and not structure.stacks and not structure.stream
    assert cut.levels == 2 and len(cut.skips) == 2
    (shallow,) = cut.level  # the last up level reads the first down level's output
    assert shallow.spatial == ("8", "8") and shallow.up is cut.deep_feature
    assert tuple(cut.deep_feature.meta["example_value"].shape) == (1, 16, 8, 8)  # upsampled, before the cat
    # the three attentions are deep; the input conv, the first resnet and the output conv are not
    assert len(_attention(structure.body)) == 3 and not _attention(structure.prologue | structure.epilogue)
    assert shallow.skip in structure.prologue and shallow.join in structure.epilogue
    assert structure.indicators.keys() == {"timestep_embedding"}


def test_variants_cache_the_deep_feature_as_a_value(unet):
    _, gm, args, structure = unet
    requirements = Requirements()
    partition = make_partition(structure, requirements)
    assert partition.pairs == [(VALUE, structure.deep_feature)]
    variants = build_variants(gm, structure, partition, requirements)
    assert variants.num_cache_writes == 1 and not _attention(variants.reuse.graph.nodes)
    assert len(_attention(variants.compute.graph.nodes)) == 3 and not _attention(variants.head.graph.nodes)
    with torch.no_grad():
        (ref,) = gm(*args)
        exported = list(variants.head(*args))
        out = variants.compute(*args, *exported)
        (deep,) = out[1:]
        (reused,) = variants.reuse(*args, *exported, deep)
    assert torch.equal(out[0], ref) and torch.equal(reused, ref)  # the value itself: exact


def test_taylor_predicts_the_deep_feature(unet):
    _, gm, args, structure = unet
    requirements = Requirements(reconstruction=TaylorReuse(order=1))
    variants = build_variants(gm, structure, make_partition(structure, requirements), requirements)
    assert variants.num_cache_writes == 1 and variants.num_cache_inputs >= 1


@pytest.mark.parametrize("requirements, reason", [
    (Requirements(indicator="front_residual", compute_first=1), "computes 1 first and 0 last blocks always"),
    (Requirements(compute_last=1), "computes 0 first and 1 last blocks always"),
    (Requirements(reconstruction=TaylorReuse(order=1, granularity="block")), "use granularity='stack'"),
    (Requirements(indicator="modulated_input"), "needs the indicator 'modulated_input'"),
])
def test_what_a_unet_cannot_do_is_said(unet, requirements, reason):
    _, _, _, structure = unet
    with pytest.raises(UnsupportedStructure, match=reason):
        make_partition(structure, requirements)


def _loop(fn, x):
    with torch.no_grad():
        return [fn(x, torch.tensor([t])).clone() for t in STEPS]


def compiled(model, **options):
    return torch.compile(model, backend="cachepass", options={"inner": "eager", "num_steps": len(STEPS), **options})


def test_interval_on_the_unet_written_here():
    model, x = tiny_unet()
    eager: list = []
    eager_calls = count_attention_calls(lambda: eager.extend(_loop(model, x)))
    assert all(torch.equal(a, b) for a, b in zip(_loop(compiled(model, policy="none"), x), eager))
    torch._dynamo.reset()
    fast = compiled(model, policy="interval", interval=3, compute_last=False)
    with torch.no_grad():
        fast(x, torch.tensor([STEPS[0]]))  # compile outside the count
    cachepass.reset(fast)
    outs: list = []
    calls = count_attention_calls(lambda: outs.extend(_loop(fast, x)))
    assert [b.computed_steps for b in cachepass.stats(fast).branches] == [[0, 3, 6]]
    assert (eager_calls, calls) == (8 * 3, 3 * 3)  # every attention is deep
    assert all(torch.isfinite(o).all() for o in outs) and relative_l1(outs[0], eager[0]) == 0
    assert relative_l1(outs[-1], eager[-1]) < 0.06  # measured 0.034; the eager loop moves 0.045-0.116 a step


@pytest.mark.parametrize("policy, options", [
    ("taylorseer", {"order": 1, "interval": 3}),
    ("teacache", {"indicator": "timestep_embedding", "coefficients": "identity", "threshold": 0.5}),
    ("magcache", {"mag_ratios": [1.0] + [0.97] * 7}),
])
def test_schedule_policies_run_on_a_unet(policy, options):
    model, x = tiny_unet()
    eager = _loop(model, x)
    fast = compiled(model, policy=policy, **options)
    outs = _loop(fast, x)
    stats = cachepass.stats(fast)
    assert stats.caching and stats.reused_calls > 0
    assert all(torch.isfinite(o).all() for o in outs)
    assert max(relative_l1(o, e) for o, e in zip(outs, eager)) < 0.1


@pytest.mark.parametrize("policy, options", [("fbcache", {}), ("dbcache", {"Fn": 1, "Bn": 0}),
                                             ("taylorseer", {"granularity": "block"})])
def test_block_policies_leave_a_unet_unchanged(policy, options, caplog):
    model, x = tiny_unet()
    eager = _loop(model, x)
    with caplog.at_level("WARNING", logger="cachepass"):
        outs = _loop(compiled(model, policy=policy, **options), x)
    assert all(torch.equal(a, b) for a, b in zip(outs, eager))
    assert any("U-Net" in r.getMessage() for r in caplog.records)


def test_one_spatial_size_is_no_unet():
    """Channel concatenations of a value with its own descendant at one resolution (a dense block) are no
    U-Net: no cut, the model is analysed as before (here: no block stack)."""
    class Dense(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(8, 4, 3, padding=1), nn.Conv2d(12, 4, 1)

        def forward(self, x, t):
            y = torch.cat([x, self.a(x)], dim=1)
            y = torch.cat([y, self.b(y)], dim=1)
            return self.c(y) * torch.cos(t.float())[:, None, None, None]

    gm, _ = capture(Dense().eval(), torch.randn(1, 4, 8, 8), torch.tensor([1.0]))
    assert find_unet(gm) is None
    with pytest.raises(UnsupportedStructure, match="no block stack found"):
        analyse(gm)


def test_explain_describes_the_unet_cut():
    model, x = tiny_unet()
    text = str(cachepass.explain(model, x, torch.tensor([STEPS[0]]), policy="interval"))
    assert "U-Net (no block stack): 2 skip connection(s)" in text
    assert "deep feature: " in text and "cached as a value (DeepCache)" in text
    assert "cache write: " in text and "caching: on" in text
    off = str(cachepass.explain(model, x, torch.tensor([STEPS[0]]), policy="fbcache"))
    assert "caching off: the policy computes 1 first" in off


# --- diffusers' UNet2DConditionModel ------------------------------------------------------------------

def build_sd15(seed: int = 0):
    """SD 1.5's layout, tiny: three cross-attention down levels and a plain one, mirrored up."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(
        block_out_channels=(16, 16, 32, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=16, norm_num_groups=8, attention_head_dim=8).eval()
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 6, 16, generator=g)

    def call(t):
        return dict(sample=x, timestep=torch.tensor(t, dtype=torch.long), encoder_hidden_states=text,
                    return_dict=False)

    return model, call


def build_sdxl(seed: int = 0):
    """SDXL's layout, tiny: a plain first level, two cross-attention levels of 2 transformer layers, the
    text-time added conditioning."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(
        block_out_channels=(16, 32, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 2), cross_attention_dim=16, norm_num_groups=8,
        attention_head_dim=(2, 4, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8).eval()
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 6, 16, generator=g)
    added = {"text_embeds": torch.randn(1, 16, generator=g), "time_ids": torch.tensor([[16.0, 16.0, 0, 0, 16.0, 16.0]])}

    def call(t):
        return dict(sample=x, timestep=torch.tensor(t, dtype=torch.long), encoder_hidden_states=text,
                    added_cond_kwargs=added, return_dict=False)

    return model, call


#: ``name -> (builder, steps, bound)``: the last step's relative L1 against the eager loop, interval 3 over 8
#: steps (0, 3, 6 computed). Measured: families' config 0.109 (the eager loop moves its output by 0.19-0.36
#: a step: DDIM-like timesteps 125 apart on random weights), SD 1.5 layout 0.062 (moves 0.07-0.13), SDXL
#: layout 0.058 (0.07-0.09).
UNETS = {
    "UNet2DCondition": (lambda seed: BY_NAME["UNet2DCondition"].build(seed), BY_NAME["UNet2DCondition"].steps, 0.2),
    "SD15": (build_sd15, tuple(STEPS), 0.12),
    "SDXL": (build_sdxl, tuple(STEPS), 0.12),
}
#: the SDXL layout (12 s) runs with -m slow; the SD 1.5 layout and the diffusers default stay in the default run
SLOW_UNETS = {"SDXL"}


def test_family_policy_none_equals_eager():
    family = BY_NAME["UNet2DCondition"]
    model, call = family.build(0)
    eager = run_loop(model, call, family.steps)
    outs = run_loop(compiled(model, policy="none"), call, family.steps)
    for out, ref in zip(outs, eager):
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if n in SLOW_UNETS else [])
                                  for n in UNETS])
def test_unet2dcondition_interval_skips_the_deep_levels(name):
    build, steps, bound = UNETS[name]
    model, call = build(0)
    eager: list = []
    eager_calls = count_attention_calls(lambda: eager.extend(run_loop(model, call, steps)))
    fast = compiled(model, policy="interval", interval=3, compute_last=False, num_steps=len(steps))
    with torch.no_grad():
        fast(**call(steps[0]))
    cachepass.reset(fast)
    outs: list = []
    calls = count_attention_calls(lambda: outs.extend(run_loop(fast, call, steps)))
    stats = cachepass.stats(fast)
    assert stats.caching, stats.fallback_reason
    assert [b.computed_steps for b in stats.branches] == [[0, 3, 6]]
    assert calls < eager_calls
    assert all(torch.isfinite(o).all() for o in outs)
    assert relative_l1(outs[0], eager[0]) < 1e-6
    assert relative_l1(outs[-1], eager[-1]) < bound


def test_dynamic_shapes_keep_the_cut():
    """Under ``dynamic=True`` the spatial sizes are symbolic (the upsampled size is not provably the skip's);
    the concatenation makes them equal, the cut is found the same, and another size runs through it."""
    model, x = tiny_unet()
    fast = torch.compile(model, backend="cachepass", dynamic=True,
                         options={"inner": "eager", "policy": "interval", "interval": 3, "compute_last": False,
                                  "num_steps": len(STEPS)})
    outs, eager = _loop(fast, x), _loop(model, x)
    assert [b.computed_steps for b in cachepass.stats(fast).branches] == [[0, 3, 6]]
    assert relative_l1(outs[-1], eager[-1]) < 0.06
    x2 = torch.randn(1, 4, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(fast(x2, torch.tensor([500])), model(x2, torch.tensor([500])))
