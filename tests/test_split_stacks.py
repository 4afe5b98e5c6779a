"""Block stacks split by graph breaks (``cachepass/runtime/fragments.py``): one decision per denoiser call,
taken where the stack begins, followed by every later graph holding its blocks, residuals per fragment.

A small DiT written here splits three ways:

* ``item``: a host read (``Tensor.item()``) between the two halves of the stack: the model's own frame is
  cut in two graphs, each holding two blocks (the first one the prologue, the second the epilogue);
* ``loop``: a ``torch.compiler.disable``d call after every block, inside the loop: Dynamo runs the model's
  ``forward`` as Python (a graph break in a loop) and compiles each block's ``forward`` on its own (one graph
  for the four blocks);
* ``inner``: a ``Tensor.item()`` inside every block: each block's frame is cut again (attention, then the
  feed-forward in a resume function).

Then the real diffusers classes the families list declined (``tests/families.py``): HiDream (an MoE's
``bincount().cpu()`` in every block: per-block frames cut before the MoE), Mochi (``torch.nonzero`` in the
attention processor, inside a loop: per-block frames cut around an attention that runs as Python) and
ConsisID (no graph break at all: a face cross-attention of another list after every other block, which
the stack now spans).
"""

from __future__ import annotations

import functools
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import count_attention_calls, relative_l1
from families import BY_NAME, first, run_loop
from torch import nn

import cachepass
from cachepass.runtime import fragments
from cachepass.runtime.state import runtime_for

STEPS = [999.0, 875.0, 750.0, 625.0, 500.0, 375.0, 250.0, 125.0]
INTERVAL = 3
COMPUTED = [0, 3, 6]
REUSED = [1, 2, 4, 5, 7]
MODES = ("item", "loop", "inner")
#: the last (reused) step's relative L1 against eager, measured: 0.044 (every split computes the same; the
#: worst step, 0.107, is step 1: the first reuse, of a latent held fixed while the timestep moves)
SYNTHETIC_BOUND = 0.07
#: measured on the families' tiny configs (seed 0): HiDream 0.107, ConsisID 0.041, Mochi 0.270. Equal, to the
#: last bit, to reusing each block's residual by hand (``test_fragments_are_the_block_residual_reuse``): the
#: size is the tiny random models' (their output moves by 0.36 / 0.40 relative L1 over the last step alone).
FAMILY_BOUNDS = {"HiDream": 0.16, "ConsisID": 0.07, "Mochi": 0.4}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the synthetic model -----------------------------------------------------------------------------

def sinusoid(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        return self.mlp(sinusoid(t, self.dim))


@torch.compiler.disable
def host_side(h):  # per-block Python that Dynamo does not trace
    return h


class Block(nn.Module):
    def __init__(self, dim, heads, inner_break=False):
        super().__init__()
        self.heads, self.inner_break = heads, inner_break
        self.mod = nn.Linear(dim, 6 * dim)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.mod(F.silu(c))[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        b, n, d = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + gate1 * self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        if self.inner_break and x.abs().max().item() > 1e9:  # a host read inside the block
            x = x.clamp(-1e9, 1e9)
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(h)


class SplitDiT(nn.Module):
    def __init__(self, mode, depth=4, dim=32, heads=2, channels=4):
        super().__init__()
        self.mode = mode
        self.embed = nn.Linear(channels, dim)
        self.t_embed = TimestepEmbedder(dim)
        self.blocks = nn.ModuleList(Block(dim, heads, inner_break=mode == "inner") for _ in range(depth))
        self.out = nn.Linear(dim, channels)
        self.first_outside = False  # run block 0 outside any graph (a test's call without a leader)

    def forward(self, x, t):
        c = self.t_embed(t)
        h = self.embed(x)
        if self.mode == "item":
            half = len(self.blocks) // 2
            for block in self.blocks[:half]:
                h = block(h, c)
            if h.abs().max().item() > 1e9:  # a host read between the halves
                h = h.clamp(-1e9, 1e9)
            for block in self.blocks[half:]:
                h = block(h, c)
            return self.out(h)
        for i, block in enumerate(self.blocks):
            h = torch.compiler.disable(block)(h, c) if i == 0 and self.first_outside else block(h, c)
            if self.mode == "loop":
                h = host_side(h)
        return self.out(h)


def split_dit(mode, seed=0):
    torch.manual_seed(seed)
    return SplitDiT(mode).eval()


def latent(tokens=16, seed=1):
    return torch.randn(1, tokens, 4, generator=torch.Generator().manual_seed(seed))


def compiled(model, **options):
    return torch.compile(model, backend="cachepass", options={"inner": "eager", **options})


def interval(model):
    return compiled(model, policy="interval", interval=INTERVAL, num_steps=len(STEPS), compute_last=False)


def run(model, x, steps=STEPS):
    with torch.no_grad():
        return [model(x, torch.tensor([t])).clone() for t in steps]


def graph_breaks() -> int:
    """Graph breaks Dynamo met since its counters were cleared (a break in a loop skips the frame: counted as
    ``unimplemented``)."""
    counters = torch._dynamo.utils.counters
    return sum(counters["graph_break"].values()) + sum(counters["unimplemented"].values())


# --- the synthetic model: each way of splitting ------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_policy_none_equals_eager_and_the_breaks_stay(mode):
    model, x = split_dit(mode), latent()
    ref = run(model, x)
    torch._dynamo.utils.counters.clear()
    fast = compiled(model, policy="none")
    outs = run(fast, x)
    assert graph_breaks() > 0  # accelerated with its graph breaks, not by removing them
    for out, r in zip(outs, ref):
        torch.testing.assert_close(out, r, rtol=1e-6, atol=1e-6)
    stats = cachepass.stats(fast)
    assert stats.caching and stats.calls == len(STEPS), stats  # one count per denoiser call, not per fragment


@functools.cache
def _interval_run(mode):
    torch._dynamo.reset()
    model, x = split_dit(mode), latent()
    eager: list = []
    eager_attention = count_attention_calls(lambda: eager.extend(run(model, x)))
    fast = interval(model)
    # compile outside the profiled loop; item: the host read's value is a constant of the resume graph at first,
    # so a second value (another latent) recompiles it with a symbolic one
    run(fast, x, STEPS[:1])
    run(fast, latent(seed=2), STEPS[1:2])
    cachepass.reset(fast)
    outs: list = []
    attention = count_attention_calls(lambda: outs.extend(run(fast, x)))
    stats = cachepass.stats(fast)
    torch._dynamo.reset()
    return eager, eager_attention, outs, attention, stats


@pytest.mark.parametrize("mode", MODES)
def test_interval_skips_blocks_across_the_fragments(mode):
    eager, eager_attention, outs, attention, stats = _interval_run(mode)
    assert attention < eager_attention, (attention, eager_attention)
    assert attention == len(COMPUTED) * 4  # 4 blocks, each skipped on the reused steps
    assert [b.computed_steps for b in stats.branches] == [COMPUTED]
    assert [b.reused_steps for b in stats.branches] == [REUSED]
    assert stats.calls == 2 + len(STEPS) and stats.cache_bytes > 0  # the warm-up's 2 and the loop's: once a call
    assert all(torch.isfinite(o).all() for o in outs)
    assert relative_l1(outs[0], eager[0]) < 1e-6  # a computed step is the full computation
    assert relative_l1(outs[-1], eager[-1]) < SYNTHETIC_BOUND


def test_every_split_caches_the_same():
    """The three splits cache the same block residuals: their outputs agree."""
    item, loop, inner = (_interval_run(mode)[2] for mode in MODES)
    for a, b, c in zip(item, loop, inner):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_two_instances_never_share_a_decision(mode):
    """Two instances of one class share every compiled graph; interleaved, a step apart, each computes exactly
    what it computes alone."""
    a, b, x = split_dit(mode, seed=0), split_dit(mode, seed=1), latent()
    alone_a, alone_b = run(interval(a), x), run(interval(b), x)
    torch._dynamo.reset()
    fa, fb = interval(a), interval(b)
    outs_a, outs_b = [], []
    with torch.no_grad():
        for i, t in enumerate(STEPS):
            outs_a.append(fa(x, torch.tensor([t])).clone())
            if i:
                outs_b.append(fb(x, torch.tensor([STEPS[i - 1]])).clone())
        outs_b.append(fb(x, torch.tensor([STEPS[-1]])).clone())
    for out, ref in zip(outs_a + outs_b, alone_a + alone_b):
        assert torch.equal(out, ref)
    for fast in (fa, fb):
        stats = cachepass.stats(fast)
        assert [s.computed_steps for s in stats.branches] == [COMPUTED]
        assert stats.calls == 2 * len(STEPS)  # alone, then interleaved: each call once


@pytest.mark.parametrize("mode", MODES)
def test_a_changed_shape_never_follows_a_cache(mode):
    model, small, large = split_dit(mode), latent(16), latent(24)
    fast = interval(model)
    with torch.no_grad():
        fast(small, torch.tensor([STEPS[0]]))
        fast(small, torch.tensor([STEPS[1]]))  # reused
        changed = fast(large, torch.tensor([STEPS[2]]))  # a reuse step, at a new shape: computes
        back = fast(small, torch.tensor([STEPS[3]]))
        reused = fast(small, torch.tensor([STEPS[4]]))  # reuses what step 3 wrote at this shape
        ref_changed, ref_back = model(large, torch.tensor([STEPS[2]])), model(small, torch.tensor([STEPS[3]]))
    torch.testing.assert_close(changed, ref_changed, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(back, ref_back, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(reused).all()
    (branch,) = cachepass.stats(fast).branches
    assert branch.computed_steps == [0, 2, 3] and branch.reused_steps == [1, 4]


def test_a_call_without_its_leader_follows_no_decision():
    """A call whose block 0 runs outside any graph has no leader: its other blocks compute, although the
    previous call's reuse decision is still held (until the next leader)."""
    model, x = split_dit("loop"), latent()
    fast = interval(model)
    with torch.no_grad():
        fast(x, torch.tensor([STEPS[0]]))
        fast(x, torch.tensor([STEPS[1]]))  # reused
        tracker = fragments.tracker_of(runtime_for(model))
        assert tracker.decision is not None and not tracker.decision.compute
        model.first_outside = True
        out = fast(x, torch.tensor([STEPS[2]]))
        model.first_outside = False
        ref = model(x, torch.tensor([STEPS[2]]))
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_a_policy_without_an_indicator_in_the_fragments_warns_once(caplog):
    """teacache decides on the timestep embedding, which per-block graphs do not compute: after a whole call
    without a leader, one warning; every call equals eager, and those from the second on count as uncached."""
    model, x = split_dit("loop"), latent()
    ref = run(model, x, STEPS[:4])
    fast = compiled(model, policy="teacache")
    with caplog.at_level(logging.WARNING, logger="cachepass"):
        outs = run(fast, x, STEPS[:4])
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(said) == 1 and "'timestep_embedding'" in said[0] and "'interval'" in said[0], said
    for out, r in zip(outs, ref):
        torch.testing.assert_close(out, r, rtol=1e-6, atol=1e-6)
    stats = cachepass.stats(fast)
    assert not stats.caching and stats.uncached_calls == 3 and "graph breaks" in stats.uncached_reason


@pytest.mark.parametrize("mode", MODES)
def test_explain_shows_the_fragments(mode):
    report = str(cachepass.explain(split_dit(mode), latent(), torch.tensor([500.0]), policy="interval"))
    assert "fragment of a split block stack" in report, report
    assert "caching: on (as a fragment)" in report
    if mode == "item":
        assert "holding blocks blocks.0 .. blocks.1" in report and "holding blocks blocks.2 .. blocks.3" in report
        assert "leads each call's decision" in report and "follows the decision" in report
    else:  # one graph serves the four blocks: explain says so
        assert "block 0's own frame" in report and "explain shows it once, traced for block 0" in report


def test_explain_says_why_a_fragment_cannot_lead():
    report = str(cachepass.explain(split_dit("loop"), latent(), torch.tensor([500.0]), policy="teacache"))
    assert "no block can lead a call: policy 'teacache' needs the indicator 'timestep_embedding'" in report


# --- the real diffusers classes ----------------------------------------------------------------------

FAMILIES = ("HiDream", "ConsisID", "Mochi")


def _family_compiled(model, **options):
    return torch.compile(model, backend="cachepass", options={"inner": "eager", **options})


@functools.cache
def _family_eager(name):
    family = BY_NAME[name]
    model, call = family.build(0)
    outs: list = []
    attention = count_attention_calls(lambda: outs.extend(run_loop(model, call, family.steps)))
    return outs, attention


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@functools.cache
def _family_interval(name, capture_dynamic_shapes=False):
    """The interval loop of a family; ``capture_dynamic_shapes``: under Dynamo's
    ``capture_dynamic_output_shape_ops`` (Mochi's ``nonzero`` then stays in the graph)."""
    torch._dynamo.reset()
    family = BY_NAME[name]
    model, call = family.build(0)
    torch._dynamo.utils.counters.clear()
    warned = _Warnings()
    logging.getLogger("cachepass").addHandler(warned)
    config = torch._dynamo.config.patch(capture_dynamic_output_shape_ops=capture_dynamic_shapes)
    try:
        with config:
            fast = _family_compiled(model, policy="interval", interval=INTERVAL, num_steps=len(family.steps),
                                    compute_last=False)
            with torch.no_grad():
                fast(**call(family.steps[0]))
            breaks = graph_breaks()
            cachepass.reset(fast)
            outs: list = []
            attention = count_attention_calls(lambda: outs.extend(run_loop(fast, call, family.steps)))
    finally:
        logging.getLogger("cachepass").removeHandler(warned)
    stats = cachepass.stats(fast)
    torch._dynamo.reset()
    return outs, attention, stats, breaks, warned.messages


@pytest.mark.parametrize("name", FAMILIES)
def test_family_policy_none_equals_eager(name):
    family = BY_NAME[name]
    model, call = family.build(0)
    outs = run_loop(_family_compiled(model, policy="none"), call, family.steps)
    for step, (out, ref) in enumerate(zip(outs, _family_eager(name)[0])):
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6, msg=lambda m, s=step: f"{name} step {s}: {m}")


@pytest.mark.parametrize("name", FAMILIES)
def test_family_interval_caches_across_its_graphs(name):
    outs, attention, stats, breaks, warnings = _family_interval(name)
    eager, eager_attention = _family_eager(name)
    family = BY_NAME[name]
    assert stats.caching, stats
    if breaks:  # graphs inside the blocks (Mochi's attention, HiDream's MoE experts) run on reused steps too:
        # said once (and HiDream: no more warnings about its inner lists)
        assert len(warnings) == 1 and "graphs inside its blocks still run" in warnings[0], warnings
        assert "capture_dynamic_output_shape_ops" in warnings[0]
    else:
        assert not warnings, warnings
    assert [b.computed_steps for b in stats.branches] == [COMPUTED]
    assert [b.reused_steps for b in stats.branches] == [REUSED]
    assert stats.calls == 1 + len(family.steps)  # the warm-up call and the loop's: once per denoiser call
    assert all(torch.isfinite(o).all() for o in outs)
    assert relative_l1(outs[0], eager[0]) < 1e-6
    assert relative_l1(outs[-1], eager[-1]) < FAMILY_BOUNDS[name]
    if name == "Mochi":  # its attention runs as Python between the block's graphs: it always runs
        assert breaks > 0 and attention == eager_attention
    elif name == "HiDream":
        assert breaks > 0 and attention < eager_attention
    else:  # ConsisID: one graph, the face cross-attentions inside the stack
        assert breaks == 0 and attention < eager_attention


def test_mochi_under_dynamic_output_shapes_caches_its_attention_too():
    """What the warning advises: with ``capture_dynamic_output_shape_ops`` the per-sample text mask's
    ``nonzero`` stays in the graph, the stack is whole, and reused steps skip the blocks' attention (32 -> 17
    calls: the time embedding's attention pooling runs every step); the outputs stay as close as the split
    model's and nothing warns."""
    outs, attention, stats, breaks, warnings = _family_interval("Mochi", capture_dynamic_shapes=True)
    eager, eager_attention = _family_eager("Mochi")
    assert stats.caching and not warnings, (stats, warnings)
    assert breaks == 0
    assert [b.computed_steps for b in stats.branches] == [COMPUTED]
    assert eager_attention == 32 and attention == 17
    assert relative_l1(outs[0], eager[0]) < 1e-6
    assert relative_l1(outs[-1], eager[-1]) < FAMILY_BOUNDS["Mochi"]


def _block_residual_reuse(name):
    """The interval schedule done by hand on eager HiDream / Mochi: forward hooks on each block of the stack
    lists replace its outputs with its inputs plus the residuals of the last computed step."""
    family = BY_NAME[name]
    model, call = family.build(0)
    lists = {"HiDream": ("double_stream_blocks", "single_stream_blocks"), "Mochi": ("transformer_blocks",)}[name]
    cache, step = {}, [0]

    def before(module, args, kwargs):
        module._inputs = (kwargs["hidden_states"], kwargs.get("encoder_hidden_states"))

    def after(module, args, kwargs, out):
        outs = out if isinstance(out, tuple) else (out,)
        pairs = list(zip(outs, module._inputs))
        if step[0] % INTERVAL == 0:
            cache[module] = [o - i if i is not None and o.shape == i.shape else None for o, i in pairs]
            return None
        new = tuple(o if r is None else i + r for (o, i), r in zip(pairs, cache[module]))
        return new if isinstance(out, tuple) else new[0]

    for path in lists:
        for block in model.get_submodule(path):
            block.register_forward_pre_hook(before, with_kwargs=True)
            block.register_forward_hook(after, with_kwargs=True)
    outs = []
    with torch.no_grad():
        for i, t in enumerate(family.steps):
            step[0] = i
            outs.append(first(model(**call(t))).clone())
    return outs


@pytest.mark.parametrize("name", ["HiDream", "Mochi"])
def test_fragments_are_the_block_residual_reuse(name):
    """Per fragment residuals add up to each block's residual: the compiled split stack computes exactly what
    reusing every block's residual by hand computes (HiDream: the MoE between a block's graphs runs on a
    reused step too, its output unused)."""
    for out, ref in zip(_family_interval(name)[0], _block_residual_reuse(name)):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_consisid_stack_spans_the_face_cross_attentions():
    family = BY_NAME["ConsisID"]
    model, call = family.build(0)
    report = str(cachepass.explain(model, policy="interval", **call(family.steps[0])))
    assert "block stack: 4 x ConsisIDBlock in 'transformer_blocks'" in report, report
    assert "caching: on" in report


def test_a_split_stack_in_a_cfg_pipeline_decides_per_branch():
    """In WanPipeline (cond and uncond calls per step, the pipeline's cache_context) a Wan whose block 1 is
    torch.compiler.disable'd: each call's leader takes its branch from the pipeline; first and second
    generations agree, and the branches skip the same steps."""
    from tiny_models import run_wan_pipeline, tiny_wan, tiny_wan_pipeline

    transformer = tiny_wan(num_layers=4)
    transformer.blocks[1].forward = torch.compiler.disable(transformer.blocks[1].forward)
    pipe = tiny_wan_pipeline(transformer)
    pipe.transformer = compiled(pipe.transformer, policy="interval", interval=INTERVAL, compute_last=False)
    first_run = run_wan_pipeline(pipe, steps=8)
    second_run = run_wan_pipeline(pipe, steps=8)
    assert torch.equal(first_run, second_run) and torch.isfinite(first_run).all()
    stats = cachepass.stats(pipe.transformer)
    assert [s.name for s in stats.branches] == ["cond", "uncond"]
    assert [s.computed_steps for s in stats.branches] == [COMPUTED, COMPUTED]
    assert stats.calls == 2 * 2 * 8  # two generations, two branches, eight steps: once per denoiser call
