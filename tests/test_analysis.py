"""The analysis passes on real diffusers classes and on a DiT written here."""

import torch
from tiny_models import NoStack, PlainDiT, flux_inputs, timestep_embedding, tiny_flux, tiny_wan, wan_inputs

from cachepass.analysis.dataflow import is_convex
from cachepass.analysis.structure import analyse
from cachepass.analysis.values import input_name
from cachepass.errors import UnsupportedStructure


def analysed(model, *args, **kwargs):
    """Analyse the Dynamo graph of ``model(*args, **kwargs)`` inside a backend, as cachepass does
    (Dynamo drops the placeholders' source metadata once the backend returns)."""
    results = []

    def backend(gm, example_inputs):
        try:
            results.append(analyse(gm, model))
        except UnsupportedStructure as exc:
            results.append(exc)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend)(*args, **kwargs)
    return results


def test_wan_structure():
    model = tiny_wan(num_layers=3)
    (s,) = analysed(model, timestep=torch.tensor([700]), **wan_inputs())
    assert [b.module.qualified_name for b in s.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    assert {b.module.class_name for b in s.blocks} == {"WanTransformerBlock"}
    assert len(s.stream) == 1
    assert [str(d) for d in s.stream[0].input.meta["example_value"].shape] == ["1", "32", "16"]
    assert input_name(s.timestep_input) == "timestep"
    assert set(s.indicators) == {"timestep_embedding", "modulated_input", "first_block_output"}
    # the modulated input is inside block 0 and depends on the stream and on the timestep embedding
    assert s.indicators["modulated_input"] in s.blocks[0].nodes
    assert is_convex(s.dataflow, s.body)
    assert not (s.prologue & s.body) and not (s.body & s.epilogue)


def test_flux_consecutive_stacks():
    model = tiny_flux()
    (s,) = analysed(model, timestep=torch.tensor([0.5]), **flux_inputs())
    assert [(st.parent, st.class_name, len(st.blocks)) for st in s.stacks] == [
        ("transformer_blocks", "FluxTransformerBlock", 2),
        ("single_transformer_blocks", "FluxSingleTransformerBlock", 3),
    ]
    assert len(s.stream) == 1  # image tokens leave the body; text tokens are dropped after it
    # between the two stacks both image and text tokens are carried
    assert len(s.boundary_values(2)) == 2
    assert input_name(s.timestep_input) == "timestep"
    assert is_convex(s.dataflow, s.body)


def test_plain_dit_found_without_adapter():
    model = PlainDiT(depth=4).eval()
    (s,) = analysed(model, torch.randn(2, 16, 4), torch.tensor([500, 500]))
    assert [b.module.qualified_name for b in s.blocks] == [f"layers.{i}" for i in range(4)]
    assert input_name(s.timestep_input) == "t"
    assert "timestep_embedding" in s.indicators and "modulated_input" in s.indicators


def test_no_block_stack_is_reported():
    (result,) = analysed(NoStack(), torch.randn(2, 3, 8), torch.tensor([1.0, 1.0]))
    assert isinstance(result, UnsupportedStructure) and "no block stack" in str(result)


def test_graph_break_inside_the_stack_is_unsupported():
    class Broken(PlainDiT):
        def forward(self, x, t):
            c = self.t_mlp(timestep_embedding(t, self.dim))
            h = self.embed(x)
            for layer in self.layers[:3]:
                h = layer(h, c)
            torch._dynamo.graph_break()  # e.g. a print or .item() between blocks
            for layer in self.layers[3:]:
                h = layer(h, c)
            return self.out(h)

    results = analysed(Broken(depth=4).eval(), torch.randn(1, 4, 4), torch.tensor([3]))
    assert isinstance(results[0], UnsupportedStructure)
    assert "graph break splits the block stack" in str(results[0])
