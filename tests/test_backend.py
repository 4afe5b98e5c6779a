"""The backend end to end on tiny models: equality, skipping, state, fallbacks, bad input."""

import logging
import subprocess
import sys

import pytest
import torch
from conftest import count_attention_calls, relative_l1
from tiny_models import NoStack, PlainDiT, flux_inputs, tiny_flux, tiny_wan, wan_inputs

import cachepass

SCHEDULE = [999, 875, 750, 625, 500, 375, 250, 125]


def compiled(model, **options):
    options.setdefault("inner", "eager")
    return torch.compile(model, backend="cachepass", options=options)


def run_schedule(model, inputs, schedule=SCHEDULE, branches=1):
    outs = []
    with torch.no_grad():
        for t in schedule:
            for _ in range(branches):
                outs.append(model(timestep=torch.tensor([t]), **inputs)[0])
    return outs


@pytest.mark.parametrize("name", ["wan", "flux", "dit"])
def test_policy_none_equals_the_model(name):
    if name == "wan":
        model, inputs, t = tiny_wan(), wan_inputs(), torch.tensor([600])
    elif name == "flux":
        model, inputs, t = tiny_flux(), flux_inputs(), torch.tensor([0.6])
    else:
        model, inputs, t = PlainDiT().eval(), {"x": torch.randn(2, 16, 4)}, torch.tensor([600, 600])
    fast = compiled(model, policy="none")
    with torch.no_grad():
        ref = model(timestep=t, **inputs) if name != "dit" else model(t=t, **inputs)
        out = fast(timestep=t, **inputs) if name != "dit" else fast(t=t, **inputs)
    ref, out = (ref[0], out[0]) if name != "dit" else (ref, out)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert cachepass.stats(fast).caching
    assert cachepass.stats(fast).cache_bytes == 0  # `none` never reuses, so it stores nothing


def test_interval_skips_blocks_and_stays_close():
    model, inputs = tiny_wan(num_layers=3), wan_inputs()
    fast = compiled(model, policy="interval", interval=3)
    ref = run_schedule(model, inputs)
    with torch.no_grad():
        fast(timestep=torch.tensor([999]), **inputs)  # compile outside the profiled calls
    cachepass.reset(fast)
    attention_per_call = []
    for t in SCHEDULE:
        with torch.no_grad():
            attention_per_call.append(
                count_attention_calls(lambda t=t: fast(timestep=torch.tensor([t]), **inputs)))
    # 3 blocks x (self + cross attention) when computed, none when reused
    assert attention_per_call == [6, 0, 0, 6, 0, 0, 6, 0]
    stats = cachepass.stats(fast)
    assert [s.computed_steps for s in stats.branches] == [[0, 3, 6]]
    assert [s.reused_steps for s in stats.branches] == [[1, 2, 4, 5, 7]]
    cachepass.reset(fast)
    out = run_schedule(fast, inputs)
    assert all(relative_l1(o, r) < 0.25 for o, r in zip(out, ref))
    assert relative_l1(out[0], ref[0]) < 1e-6  # computed steps are exact


def test_branches_generations_and_reset():
    model, inputs = tiny_wan(), wan_inputs()
    fast = compiled(model, policy="interval", interval=2)
    first = run_schedule(fast, inputs, branches=2)
    second = run_schedule(fast, inputs, branches=2)  # the schedule restarts: a new generation
    stats = cachepass.stats(fast)
    assert stats.generations == 2
    # a raw loop gives no branch names: the second call at 999 may be a new request at the same timestep,
    # so step 1's first call computes (and starts branch 0 afresh) until step 1 shows two calls as well
    expected = [[0, 1, 2, 4, 6], [0, 2, 4, 6]]
    assert [s.computed_steps for s in stats.branches] == expected
    assert [[s.computed_steps for s in gen] for gen in stats.history] == [expected]
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # a reused model behaves identically each generation
    # an explicit reset in the middle of a schedule starts over at step 0
    run_schedule(fast, inputs, SCHEDULE[:3])
    cachepass.reset(fast)
    run_schedule(fast, inputs, SCHEDULE[3:5])
    assert cachepass.stats(fast).branches[0].computed_steps == [0]


def test_old_stats_names_still_work_and_warn():
    """``Stats.streams``, ``StreamStats`` and a branch's old field names ``stream`` / ``branch``: deprecated
    aliases of ``Stats.branches``, ``BranchStats``, ``BranchStats.index`` / ``.name``, each warning at the
    caller's line."""
    from cachepass.runtime import state

    model, inputs = tiny_wan(num_layers=2), wan_inputs()
    fast = compiled(model, policy="interval", interval=2)
    run_schedule(fast, inputs, SCHEDULE[:3], branches=2)
    stats = cachepass.stats(fast)
    with pytest.warns(DeprecationWarning, match="Stats.streams is deprecated; use Stats.branches") as caught:
        assert stats.streams == stats.branches and len(stats.branches) == 2
    assert caught[0].filename == __file__
    branch = stats.branches[1]
    with pytest.warns(DeprecationWarning, match="BranchStats.stream is deprecated; use BranchStats.index") as caught:
        assert branch.stream == branch.index == 1
    assert caught[0].filename == __file__
    with pytest.warns(DeprecationWarning, match="BranchStats.branch is deprecated; use BranchStats.name"):
        assert branch.branch == branch.name == 1  # a raw loop: the call's rank within its step
    with pytest.warns(DeprecationWarning, match="StreamStats is deprecated; use .*BranchStats") as caught:
        from cachepass.runtime.state import StreamStats
    assert caught[0].filename == __file__
    assert StreamStats is state.BranchStats
    with pytest.raises(AttributeError, match="no attribute 'NoSuchStats'"):
        state.NoSuchStats  # noqa: B018


def test_a_new_shape_never_reads_the_cache_of_another():
    model = tiny_wan()
    fast = compiled(model, policy="interval", interval=100)
    small, large = wan_inputs(size=8), wan_inputs(size=12)
    run_schedule(fast, small, SCHEDULE[:2])
    out = run_schedule(fast, large, SCHEDULE[2:3])[0]  # first call at this shape: must compute
    ref = run_schedule(model, large, SCHEDULE[2:3])[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_stats_count_the_calls_of_the_current_compile_only():
    """Two graphs of one compile (two shapes) add up; an earlier compile of the same module with another
    policy does not."""
    model = tiny_wan()
    run_schedule(compiled(model, policy="interval", interval=2), wan_inputs(), SCHEDULE[:3])
    torch._dynamo.reset()
    fast = compiled(model, policy="interval", interval=100)
    run_schedule(fast, wan_inputs(size=8), SCHEDULE[:2])
    run_schedule(fast, wan_inputs(size=12), SCHEDULE[2:3])
    stats = cachepass.stats(fast)
    assert (stats.calls, stats.computed_calls) == (3, 2)


def test_fullgraph_and_dynamic_shapes():
    model, inputs = tiny_wan(), wan_inputs()
    fast = torch.compile(model, backend="cachepass", fullgraph=True, dynamic=True,
                         options={"policy": "interval", "interval": 2, "inner": "eager"})
    run_schedule(fast, inputs, SCHEDULE[:2])
    for size in (10, 12):  # new sizes: no recompile under dynamic=True, caching stays on
        big = wan_inputs(size=size)
        out = run_schedule(fast, big, SCHEDULE[:1])[0]
        torch.testing.assert_close(out, run_schedule(model, big, SCHEDULE[:1])[0], rtol=1e-5, atol=1e-6)
    assert cachepass.stats(fast).caching


def test_no_block_stack_falls_back_with_one_warning(caplog):
    model = NoStack()
    fast = compiled(model, policy="interval")
    x, t = torch.randn(2, 3, 8), torch.tensor([3.0, 3.0])
    with caplog.at_level(logging.WARNING, logger="cachepass"), torch.no_grad():
        out = fast(x, t)
        fast(x, t)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no block stack" in warnings[0].getMessage()
    with torch.no_grad():
        assert torch.equal(out, model(x, t))
    assert not cachepass.stats(fast).caching


def test_grad_mode_falls_back(caplog):
    model, inputs = tiny_wan(), wan_inputs()
    fast = compiled(model, policy="interval")
    with caplog.at_level(logging.WARNING, logger="cachepass"):
        out = fast(timestep=torch.tensor([500]), **inputs)[0]
    assert any("grad mode is on" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(out, model(timestep=torch.tensor([500]), **inputs)[0])
    assert out.requires_grad


@pytest.mark.parametrize(
    "options, match",
    [
        ({"policy": "fastest"}, "option 'policy' must be one of"),
        ({"policy": "interval", "interval": 0}, "option 'interval' must be >= 1"),
        ({"policy": "interval", "interval": "3"}, "option 'interval' must be an integer"),
        ({"policy": "none", "interval": 3}, "unknown option 'interval' for policy 'none'"),
        ({"inner": "no-such-compiler"}, "option 'inner' must be one of"),
        ({"num_steps": -1}, "option 'num_steps'"),
    ],
)
def test_bad_options_raise_value_error_on_both_routes(options, match):
    with pytest.raises(ValueError, match=match):
        cachepass.backend(**options)
    fast = torch.compile(tiny_wan(), backend="cachepass", options=options)
    with pytest.raises(ValueError, match=match), torch.no_grad():
        fast(timestep=torch.tensor([1]), **wan_inputs())


def test_backend_callable_matches_string_backend():
    model, inputs = tiny_wan(), wan_inputs()
    a = torch.compile(model, backend=cachepass.backend(policy="interval", interval=2, inner="eager"))
    b = compiled(tiny_wan(), policy="interval", interval=2)
    for x, y in zip(run_schedule(a, inputs, SCHEDULE[:4]), run_schedule(b, inputs, SCHEDULE[:4])):
        assert torch.equal(x, y)


def test_string_backend_works_without_import():
    code = (
        "import torch\n"
        "from torch._dynamo.backends.registry import lookup_backend\n"
        "import sys; assert 'cachepass' not in sys.modules\n"
        "fn = lookup_backend('cachepass')\n"
        "print(fn.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "cachepass.backend"


def test_explain_reports_the_structure():
    report = cachepass.explain(tiny_flux(), timestep=torch.tensor([0.5]), policy="interval", **flux_inputs())
    text = str(report)
    assert report.caching
    assert "2 x FluxTransformerBlock in 'transformer_blocks'" in text
    assert "3 x FluxSingleTransformerBlock in 'single_transformer_blocks'" in text
    assert "timestep input: timestep" in text
    assert "residual stream: hidden_states ['1', '16', '16'] float32" in text
    assert "block parts (predicted at granularity 'block'): attn, ff, ff_context, proj_mlp, proj_out; " \
           "11 cached output(s)" in text
    off = cachepass.explain(NoStack(), torch.randn(1, 2, 8), torch.tensor([1.0]))
    assert not off.caching and "no block stack" in str(off)


def test_mode_goes_to_inductor_only():
    fast = torch.compile(tiny_wan(), backend=cachepass.backend(policy="interval", inner="eager"), mode="max-autotune")
    with pytest.raises(ValueError, match="applies to inner='inductor' only"), torch.no_grad():
        fast(timestep=torch.tensor([1]), **wan_inputs())


def test_stats_say_when_calls_ran_uncached_and_why():
    model, inputs = tiny_wan(), wan_inputs()
    fast = compiled(model, policy="interval")
    run_schedule(fast, inputs, SCHEDULE[:2])
    assert cachepass.stats(fast).caching
    fast(timestep=torch.tensor([500]), **inputs)  # grad mode: Dynamo recompiles; this graph runs uncached
    stats = cachepass.stats(fast)
    assert not stats.caching and stats.uncached_calls == 1 and "grad mode is on" in stats.uncached_reason
    assert "1 call(s) ran uncached: grad mode is on" in str(stats)
    run_schedule(fast, inputs, SCHEDULE[2:3])  # back under no_grad: cached again
    assert cachepass.stats(fast).caching


def test_active_dropout_warns_once(caplog):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(  # tiny_wan's config with attention dropout, left in train() mode
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=32, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32,
    ).train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1
    fast = compiled(model, policy="interval")
    with caplog.at_level(logging.WARNING, logger="cachepass"):
        run_schedule(fast, wan_inputs(), SCHEDULE[:2])
        run_schedule(fast, wan_inputs(size=12), SCHEDULE[:1])  # a second graph: no second warning
        run_schedule(compiled(tiny_wan().train(), policy="interval"), wan_inputs(), SCHEDULE[:1])  # p = 0: quiet
    said = [r for r in caplog.records if "runs dropout" in r.getMessage()]
    assert len(said) == 1 and "model.eval()" in said[0].getMessage()


def test_a_graph_break_in_the_stack_caches_the_other_blocks(caplog):
    """torch.compiler.disable on one block breaks the loop over the blocks: Dynamo runs the model's forward as
    Python and compiles each other block on its own. Those graphs are fragments of the split stack (issue 12,
    part 2; it was one warning and no caching before): they follow one decision per call, while the disabled
    block runs on every call. No warning."""
    model, inputs = tiny_wan(num_layers=4), wan_inputs()
    model.blocks[1].forward = torch.compiler.disable(model.blocks[1].forward)
    ref = run_schedule(model, inputs, SCHEDULE[:4])
    fast = compiled(model, policy="interval")
    run_schedule(fast, inputs, SCHEDULE[:1])  # compile outside the profiled calls
    cachepass.reset(fast)
    out = []
    with caplog.at_level(logging.WARNING, logger="cachepass"):
        attention = count_attention_calls(lambda: out.extend(run_schedule(fast, inputs, SCHEDULE[:4])))
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    # two attentions per block; blocks 0, 2, 3 on the two computed steps, block 1 on all four
    assert attention == 2 * 3 * 2 + 2 * 4
    torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-6)
    assert relative_l1(out[1], ref[1]) < 0.1
    (branch,) = cachepass.stats(fast).branches
    assert branch.computed_steps == [0, 3] and branch.reused_steps == [1, 2]


@pytest.mark.parametrize("policy", ["fbcache", "dbcache"])
def test_first_block_policies_cache_flux_under_dynamic_shapes(policy):
    """Under dynamic=True a SymInt crosses the first block boundary before the stream tensor: the front
    residual is still the stream's."""
    model, inputs = tiny_flux(), flux_inputs()
    options = {"policy": policy, "inner": "eager", **({"Fn": 1, "Bn": 0} if policy == "dbcache" else {})}
    fast = torch.compile(model, backend="cachepass", dynamic=True, options=options)
    with torch.no_grad():
        for t in (1.0, 0.98, 0.96):
            out = fast(timestep=torch.tensor([t]), **inputs)[0]
        ref = model(timestep=torch.tensor([0.96]), **inputs)[0]
    stats = cachepass.stats(fast)
    assert stats.caching, stats
    assert relative_l1(out, ref) < 0.1
