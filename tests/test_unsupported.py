"""Every ``UnsupportedStructure`` the package raises (``NoBlockStack`` and ``SplitStack`` included), each
on a small synthetic graph: tiny modules written here, traced by Dynamo into a recording backend, or
such a graph edited by hand. Each test checks the message names the nodes or modules at fault.

The other invariant checks (partition, variants, reconstruction) are in ``test_invariants.py``.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

from cachepass.analysis.blocks import find_block_stack
from cachepass.analysis.dataflow import is_convex, to_networkx
from cachepass.analysis.features import resolve_feature
from cachepass.analysis.structure import analyse, check_body, split_regions
from cachepass.analysis.values import example_value
from cachepass.errors import NoBlockStack, SplitStack, UnsupportedStructure
from cachepass.policies.base import Requirements
from cachepass.reconstruction import ResidualReuse, TaylorReuse
from cachepass.transform.partition import partition as make_partition
from cachepass.transform.variants import build_variants

DIM = 8


def sinusoid(t: torch.Tensor, dim: int = DIM) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Block(nn.Module):
    """A residual block: modulation from the conditioning ``c``, then two child linears on the stream
    (``attn``, ``ff``). With ``width != out`` it returns the ``ff`` projection alone (``out`` wide)."""

    def __init__(self, width: int = DIM, out: int | None = None) -> None:
        super().__init__()
        self.width, self.out = width, out or width
        self.mod = nn.Linear(DIM, width)
        self.attn = nn.Linear(width, width)
        self.ff = nn.Linear(width, self.out)

    def forward(self, x, c):
        h = x * (1 + self.mod(c)[:, None])
        x = x + self.attn(h)
        y = self.ff(x)
        return x + y if self.out == self.width else y


class Tiny(nn.Module):
    """Patch embedding, a sinusoidal timestep MLP (``timestep=False``: ``t`` is a ready conditioning
    vector, no timestep is found), a ``ModuleList`` of blocks, an output projection. ``run`` limits the
    blocks the forward runs (``run=2`` of 3: the graph holds only part of the list)."""

    def __init__(self, blocks=None, depth: int = 3, timestep: bool = True, run: int | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks if blocks is not None else [Block() for _ in range(depth)])
        self.embed = nn.Linear(4, DIM)
        self.t_mlp = nn.Linear(DIM, DIM)
        self.proj = nn.Linear(getattr(self.blocks[-1], "out", DIM), 4)
        self.timestep, self.run = timestep, run

    def forward(self, x, t):
        c = self.t_mlp(sinusoid(t) if self.timestep else t)
        h = self.embed(x)
        for block in self.blocks[: self.run]:
            h = block(h, c)
        return self.proj(h)


def inputs(timestep: bool = True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, generator=g)
    return x, (torch.tensor([3.0, 3.0]) if timestep else torch.randn(2, DIM, generator=g))


def capture(model: nn.Module, *args, dynamic: bool = False) -> torch.fx.GraphModule:
    """The Dynamo graph of ``model(*args)``, recorded by a backend that runs it unchanged."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model.eval(), backend=record, fullgraph=True, dynamic=dynamic)(*args)
    assert len(graphs) == 1
    return graphs[0]


def tiny_graph(**kwargs):
    timestep = kwargs.get("timestep", True)
    model = Tiny(**kwargs)
    return model, capture(model, *inputs(timestep))


def raises(fn, *args, kind=UnsupportedStructure) -> str:
    with pytest.raises(kind) as info:
        fn(*args)
    return str(info.value)


# --- analysis ----------------------------------------------------------------------------------------

def test_no_block_stack():
    class Distinct(nn.Module):  # a list, but no two same-class neighbours
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)])

        def forward(self, x, t):
            for layer in self.layers:
                x = layer(x)
            return x * torch.cos(t)[:, None, None]

    gm = capture(Distinct(), *inputs())
    message = raises(analyse, gm, kind=NoBlockStack)
    assert "no block stack found" in message and "same-class blocks" in message


def test_split_stack_names_the_list_and_the_blocks_held():
    model, gm = tiny_graph(depth=3, run=2)  # the graph holds blocks 0 and 1 of three
    with pytest.raises(SplitStack) as info:
        analyse(gm, model)
    assert info.value.parent == "blocks"
    assert "'blocks' (3 blocks)" in str(info.value) and "block(s) 0, 1." in str(info.value)
    assert analyse(gm).stacks[0].names == ["blocks.0", "blocks.1"]  # without the root: no comparison


def test_body_not_convex():
    # split_regions always makes a convex body (graph order); take a middle node of block 1 out of it
    # by hand: a value then leaves the body through it and comes back
    _, gm = tiny_graph()
    stacks = find_block_stack(gm)
    _, body, _ = split_regions(gm, stacks)
    g = to_networkx(gm.graph)
    check_body(g, body)
    middle = [n for n in stacks[0].blocks[1].nodes if n.target is torch._C._nn.linear][1]  # block 1's attn
    left, user = middle.args[0], next(iter(middle.users))
    assert not is_convex(g, body - {middle})
    message = raises(check_body, g, body - {middle})
    assert message.startswith("the block stack is not a convex region: a value leaves it and comes back")
    assert f"({left.name!r} is read by {middle.name!r} outside the blocks" in message
    assert f"back into them at {user.name!r}" in message


def test_body_writes_into_a_value_made_before_it():
    class Mutating(Block):
        def forward(self, x, c):
            c.mul_(1.0)  # the conditioning is made in the head: skipping the block would skip this write
            return super().forward(x, c)

    _, gm = tiny_graph(blocks=[Mutating() for _ in range(3)])
    writes = [n for n in gm.graph.nodes if n.target == "mul_"]
    message = raises(analyse, gm)
    assert "writes in place into tensors made outside it" in message
    target = writes[0].args[0].name
    assert f"{writes[0].name!r} into {target!r}" in message and f"{writes[2].name!r} into {target!r}" in message


def test_body_output_that_is_not_a_tensor():
    class Sized(nn.Module):  # a block that also hands a size (symbolic under dynamic shapes) to the epilogue
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(DIM, DIM)

        def forward(self, x, c):
            return x + self.lin(x) * c[:, None], x.flatten(0, 1).shape[0]

    class SizedTiny(Tiny):
        def forward(self, x, t):
            c = self.t_mlp(sinusoid(t))
            h, n = self.embed(x), None
            for block in self.blocks:
                h, n = block(h, c)
            return self.proj(h).reshape(n, -1)

    gm = capture(SizedTiny(blocks=[Sized() for _ in range(3)]), *inputs(), dynamic=True)
    stacks = find_block_stack(gm)
    _, body, _ = split_regions(gm, stacks)
    sizes = [n for n in body if isinstance(example_value(n), torch.SymInt) and any(u not in body for u in n.users)]
    assert len(sizes) == 1
    assert raises(analyse, gm).startswith(f"body output {sizes[0].name!r} is not a tensor")


def test_body_output_without_a_partner_input():
    _, gm = tiny_graph(blocks=[Block(), Block(), Block(DIM, out=4)])  # the last block narrows the stream
    last = find_block_stack(gm)[0].blocks[2].nodes[-1]  # its ff projection, returned alone
    assert last.target is torch._C._nn.linear
    message = raises(analyse, gm)
    assert f"body output {last.name!r} (shape [2, 5, 4]) has no body input of the same shape" in message


# --- partition ---------------------------------------------------------------------------------------

def test_value_leaving_the_cached_span_without_a_partner():
    # block 0 narrows the stream to 4 and block 1 widens it back: the body is paired (8 in, 8 out),
    # but the span after block 0 starts at width 4 and ends at width 8
    _, gm = tiny_graph(blocks=[Block(DIM, out=4), Block(4, out=DIM), Block()])
    structure = analyse(gm)
    end = structure.boundary_values(3)[0]
    message = raises(make_partition, structure, Requirements(compute_first=1))
    assert f"the value {end.name!r} leaving the cached blocks has no partner" in message


def test_span_with_nothing_left_to_cache():
    _, gm = tiny_graph(depth=3)
    message = raises(make_partition, analyse(gm), Requirements(compute_first=2, compute_last=1))
    assert "computes 2 first and 1 last blocks always" in message and "in a stack of 3" in message


def test_front_residual_without_front_blocks():
    _, gm = tiny_graph()
    message = raises(make_partition, analyse(gm), Requirements(indicator="front_residual", compute_first=0))
    assert "'front_residual' needs compute_first >= 1" in message


def test_indicator_the_model_does_not_provide():
    _, gm = tiny_graph(timestep=False)  # no sinusoid: no timestep, so no timestep embedding / modulation
    structure = analyse(gm)
    assert sorted(structure.indicators) == ["first_block_output"]
    message = raises(make_partition, structure, Requirements(indicator="modulated_input"))
    assert "needs the indicator 'modulated_input'" in message and "(found: first_block_output)" in message


class Elementwise(nn.Module):
    """A block without child modules: nothing for granularity ``block`` to predict."""

    def forward(self, x, c):
        return x + torch.tanh(x) * c[:, None]


def test_block_granularity_without_predictable_parts():
    _, gm = tiny_graph(blocks=[Elementwise() for _ in range(3)])
    requirements = Requirements(reconstruction=TaylorReuse(order=1, granularity="block"))
    message = raises(make_partition, analyse(gm), requirements)
    assert "granularity 'block' found no attention or feed-forward sub-module" in message


# --- variants ----------------------------------------------------------------------------------------

class Checked(nn.Module):
    """``proj_in`` feeds ``proj_out`` (both predicted parts) and an assert: the assert reads a value of
    the parts that is not cached, and has side effects, so the reuse variant cannot drop it."""

    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(DIM, DIM)
        self.proj_out = nn.Linear(DIM, DIM)

    def forward(self, x, c):
        h = self.proj_in(x * (1 + c[:, None]))
        torch._assert_async((h.abs() >= 0).all(), "finite")  # an assert statement, as Dynamo records it
        return x + self.proj_out(h)


def test_side_effect_on_a_predicted_part_internal():
    _, gm = tiny_graph(blocks=[Checked() for _ in range(3)])
    structure = analyse(gm)
    requirements = Requirements(reconstruction=TaylorReuse(order=1, granularity="block"))
    partition = make_partition(structure, requirements)
    asserts = [n for n in gm.graph.nodes if n.target is torch._assert_async]
    assert len(asserts) == 3
    message = raises(build_variants, gm, structure, partition, requirements)
    assert f"granularity 'block': {asserts[0].name!r} has side effects" in message
    # granularity stack caches the residual of the whole span, asserts and all
    requirements = Requirements(reconstruction=ResidualReuse())
    build_variants(gm, structure, make_partition(structure, requirements), requirements)


# --- features (named tensors a policy observes) ------------------------------------------------------

def test_feature_block_index_outside_the_stack():
    _, gm = tiny_graph(depth=3)
    message = raises(resolve_feature, analyse(gm), "block_output:7")
    assert "'7' is outside the 3 blocks" in message


def test_frame_grid_without_a_video_latent():
    _, gm = tiny_graph()
    message = raises(resolve_feature, analyse(gm), "frame_grid")
    assert "feature 'frame_grid' not found" in message


def test_stream_features_without_a_stream_tensor():
    """``stream_input``, ``stream_output`` and ``frame_grid`` read the first residual-stream tensor: a
    structure without one is an ``UnsupportedStructure`` naming the feature, not an ``IndexError``."""
    _, gm = tiny_graph()
    structure = dataclasses.replace(analyse(gm), stream=[])
    for name in ("stream_input", "stream_output", "frame_grid"):
        message = raises(resolve_feature, structure, name)
        assert f"feature {name!r} needs the residual stream, but no stream tensor was found" in message
    message = raises(make_partition, structure, Requirements(observe=("stream_input",)))
    assert "feature 'stream_input' needs the residual stream" in message


def test_feature_indicator_the_model_does_not_provide():
    _, gm = tiny_graph(timestep=False)
    message = raises(resolve_feature, analyse(gm), "indicator:modulated_input")
    assert "no indicator 'modulated_input' (found: first_block_output)" in message


def test_unknown_feature():
    _, gm = tiny_graph()
    message = raises(resolve_feature, analyse(gm), "bogus:0")
    assert "unknown feature 'bogus:0'" in message


def test_feature_not_found_in_its_block():
    _, gm = tiny_graph()  # the blocks' children are Linear layers: none is an attention module
    message = raises(resolve_feature, analyse(gm), "attention_output:1")
    assert "feature 'attention_output:1' not found in block 'blocks.1'" in message


def test_features_reach_the_partition():
    """The feature errors surface through the partition (``Requirements.observe``) unchanged."""
    _, gm = tiny_graph(depth=3)
    message = raises(make_partition, analyse(gm), Requirements(observe=("block_output:-4",)))
    assert "'-4' is outside the 3 blocks" in message
