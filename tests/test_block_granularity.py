"""TaylorSeer's per-block granularity: which parts of a block are predicted, what the reuse variant
still runs, and that a reuse at a computed step rebuilds the compute variant's output exactly."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import count_attention_calls
from tiny_models import PlainDiT, flux_inputs, tiny_flux, tiny_wan, wan_inputs
from torch import nn

import cachepass
from cachepass.analysis.block_parts import find_block_parts, is_matrix_op
from cachepass.analysis.structure import analyse
from cachepass.options import parse_options
from cachepass.transform.compile import compile_piece
from cachepass.transform.partition import partition as make_partition
from cachepass.transform.variants import build_variants


def captured(model, *args, **kwargs):
    """The Dynamo graph of ``model(*args, **kwargs)`` and its example inputs."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(*args, **kwargs)
    return graphs[0]


def wan_case():
    return captured(tiny_wan(num_layers=2), **wan_inputs(), timestep=torch.tensor([500]), return_dict=False)


def flux_case():
    return captured(tiny_flux(), **flux_inputs(), timestep=torch.tensor([0.5]), return_dict=False)


def plain_case():
    torch.manual_seed(0)
    return captured(PlainDiT().eval(), torch.randn(2, 16, 4), torch.tensor([500.0, 500.0]))


def variants_for(gm, granularity: str, order: int = 1):
    structure = analyse(gm)
    requirements = parse_options({"policy": "taylorseer", "order": order, "granularity": granularity}).policy.requirements()
    partition = make_partition(structure, requirements)
    return structure, partition, requirements, build_variants(gm, structure, partition, requirements)


def matrix_ops(gm) -> int:
    return sum(is_matrix_op(n) for n in gm.graph.nodes)


def test_wan_parts_are_the_two_attentions_and_the_ffn():
    gm, _ = wan_case()
    structure = analyse(gm)
    parts = find_block_parts(structure, 0, 2, structure.body)
    assert [p.name for p in parts] == [f"blocks.{k}.{c}" for k in (0, 1) for c in ("attn1", "attn2", "ffn")]
    assert all(len(p.outputs) == 1 for p in parts)  # before the gate: the part's last node
    assert all(p.outputs[0].meta["example_value"].shape == (1, 32, 16) for p in parts)


def test_flux_modulation_is_recomputed_and_unneeded_outputs_are_not_cached():
    """AdaLN linears read only the timestep embedding, so they are no part; in a single-stream block
    the MLP input projection only feeds the predicted output projection, so nothing of it is cached."""
    gm, _ = flux_case()
    structure = analyse(gm)
    parts = {p.name: p for p in find_block_parts(structure, 0, len(structure.blocks), structure.body)}
    assert not any(name.endswith(("norm1", "norm1_context", ".norm")) for name in parts)
    assert [len(parts[f"transformer_blocks.0.{c}"].outputs) for c in ("attn", "ff", "ff_context")] == [2, 1, 1]
    assert parts["single_transformer_blocks.0.proj_mlp"].outputs == []
    assert len(parts["single_transformer_blocks.0.proj_out"].outputs) == 1


@pytest.mark.parametrize("case", [wan_case, flux_case, plain_case], ids=["wan", "flux", "plain-dit"])
def test_block_reuse_at_a_computed_step_equals_the_compute_variant(case):
    """With the part outputs of this very step in the cache (k = 0), the reuse variant recomputes the glue
    around predicted parts and must land on the compute variant's outputs; it runs no attention and no
    matrix work except modulation (which reads only the timestep) and the epilogue."""
    gm, example_inputs = case()
    _, partition, requirements, variants = variants_for(gm, "block", order=2)
    assert variants.num_cache_writes == len(partition.part_outputs) > 0
    head, compute, reuse = (compile_piece(getattr(variants, name), example_inputs, "eager")
                            for name in ("head", "compute", "reuse"))
    with torch.no_grad():
        exported = tuple(head(*example_inputs))
        out = compute(*example_inputs, *exported)
        n = variants.num_outputs
        cache = requirements.reconstruction.new_cache()
        cache.write(out[n:n + variants.num_cache_writes], step=3)
        rebuilt = reuse(*example_inputs, *exported, *cache.read(3))
        attention = count_attention_calls(lambda: reuse(*example_inputs, *exported, *cache.read(3)))
    assert len(rebuilt) == n
    for a, b in zip(rebuilt, out[:n]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert attention == 0
    _, _, _, stack = variants_for(gm, "stack")
    assert matrix_ops(variants.reuse) < matrix_ops(variants.compute) // 2
    assert matrix_ops(variants.reuse) >= matrix_ops(stack.reuse)  # modulation stays


def test_block_granularity_end_to_end_skips_attention_and_caches_every_part():
    model = tiny_wan(num_layers=3)
    inputs = wan_inputs()
    compiled = torch.compile(model, backend="cachepass", options={
        "policy": "taylorseer", "granularity": "block", "order": 1, "interval": 4, "inner": "eager"})

    def call(t):
        return compiled(**inputs, timestep=torch.tensor([t]), return_dict=False)[0]

    with torch.no_grad():
        call(999)  # compiles
        assert count_attention_calls(lambda: call(950)) == 0  # step 1 reused
        assert count_attention_calls(lambda: call(999)) == 6  # a new generation's step 0: 3 blocks x 2
        output_bytes = 1 * 32 * 16 * 4  # a part output: (batch, tokens, width) float32
        assert cachepass.stats(compiled).branches[0].cache_bytes == (3 * 3) * output_bytes  # D_0 of 9 parts
        for t in (950, 900, 850, 800):
            call(t)
    branch = cachepass.stats(compiled).branches[0]
    assert (branch.computed_steps, branch.reused_steps) == ([0, 4], [1, 2, 3])
    assert branch.cache_bytes == 2 * (3 * 3) * output_bytes  # order + 1 tensors per part


class ElementwiseBlock(nn.Module):
    """A block whose matrix work is no child module: nothing for the block granularity to predict."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim) / dim)

    def forward(self, x, c):
        return x + torch.tanh(x @ self.weight) * c


class FlatDiT(PlainDiT):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ElementwiseBlock(self.dim) for _ in range(3))

    def forward(self, x, t):
        c = self.t_mlp(torch.cos(t.float()[:, None] * torch.ones(self.dim)))
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h, c[:, None])
        return self.out(h)


def test_no_predictable_part_falls_back_with_a_warning(caplog):
    model = FlatDiT().eval()
    compiled = torch.compile(model, backend="cachepass",
                             options={"policy": "taylorseer", "granularity": "block", "inner": "eager"})
    x, t = torch.randn(1, 8, 4), torch.tensor([500.0])
    with caplog.at_level(logging.WARNING, logger="cachepass"), torch.no_grad():
        out = compiled(x, t)
        torch.testing.assert_close(out, model(x, t))
    assert "granularity='stack'" in caplog.text
    assert not cachepass.stats(compiled).caching
