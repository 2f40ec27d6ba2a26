"""window.pool (CLEAR's pooled keys/values): spec fields and errors, pool_weight binding, the reference
against a brute-force loop, and the torch op / dynamo / distributed hooks."""

import itertools
import math

import pytest
import torch
from hypothesis import given, strategies as st

import lincomp
from lincomp import presets
from lincomp.inputs import bind
from lincomp.reference import reference, visible
import lincomp.backends.ops  # noqa: F401  (registers torch.ops.lincomp.*)
from lincomp.runtime.pool import pool_kv
from lincomp.spec import AttentionSpec, GridWindow
from lincomp.testing import examples, random_inputs, rel_err


def _spec(grid=(4, 6), pool=2, **kw):
    return AttentionSpec(window={"kind": f"{len(grid)}d", "grid": list(grid), "radius": 2, "pool": pool}, **kw)


# ------------------------------------------------------------------------------------------- spec
def test_spec_round_trips_and_keys():
    s = _spec(pool=[2, 3], prefix=3, sinks=1)
    assert s.pool == (2, 3) and s.window.pooled_tokens == 2 * 2
    assert AttentionSpec.from_dict(s.to_dict()) == s
    assert AttentionSpec.from_json(s.to_json()).key() == s.key()
    assert s.key() != _spec(pool=[2, 2], prefix=3, sinks=1).key()
    assert "pool2x3" in s.key()
    assert _spec(pool=2).pool == (2, 2)                     # an int is the same factor on every axis
    unpooled = AttentionSpec(window={"kind": "2d", "grid": [4, 6], "radius": 2})
    assert "pool" not in unpooled.to_dict()["window"]        # unpooled keys are unchanged
    assert unpooled.pool is None
    assert s.with_grid((8, 6)).pool == (2, 3)
    assert presets.resolve("clear-r8-df4").pool == (4, 4)
    assert presets.resolve("clear-r16-df4").window.radius == 16


@pytest.mark.parametrize("d, err, words", [
    ({"kind": "2d", "grid": [4, 6], "radius": 2, "pool": 4}, ValueError, "window.pool[1] = 4 does not divide"),
    ({"kind": "2d", "grid": [4, 6], "radius": 2, "pool": [2, 2, 2]}, ValueError, "one factor per axis"),
    ({"kind": "2d", "grid": [4, 6], "radius": 2, "pool": 0}, ValueError, "window.pool[0]"),
    ({"kind": "2d", "grid": [4, 6], "radius": 2, "pool": True}, TypeError, "window.pool"),
    ({"kind": "2d", "grid": [4, 6], "radius": 2, "pool": "2"}, TypeError, "window.pool"),
    ({"kind": "1d", "left": 3, "pool": 2}, ValueError, "window.pool needs a 2d or 3d"),
    ({"kind": "terraced", "block": 3, "pool": 2}, ValueError, "window.pool needs a 2d or 3d"),
])
def test_bad_pool_fields(d, err, words):
    with pytest.raises(err, match=words.replace("[", r"\[").replace("]", r"\]")):
        AttentionSpec(window=d)


def test_pool_with_causal_or_linear_is_rejected():
    with pytest.raises(ValueError, match="window.pool needs causal=false"):
        _spec(causal=True)
    with pytest.raises(ValueError, match="window.pool cannot be combined with a linear branch"):
        _spec(linear={"feature_map": "elu1"}, combine="sum")
    with pytest.raises(ValueError, match=r"window.pool\[0\] = 2 does not divide"):
        _spec(pool=2).with_grid((3, 6))


def test_pool_weight_binding_errors():
    s = _spec(pool=[2, 3], prefix=2)
    x = random_inputs(s, H=2, D=4)
    assert bind(s, **x).pool_weight.shape == (2, 3)
    with pytest.raises(ValueError, match="pool_weight is required"):
        bind(s, **{n: t for n, t in x.items() if n != "pool_weight"})
    with pytest.raises(ValueError, match=r"pool_weight has shape \[3, 2\], expected window.pool = \[2, 3\]"):
        bind(s, **dict(x, pool_weight=torch.ones(3, 2)))
    with pytest.raises(ValueError, match="pool_weight must have 2 dims"):
        bind(s, **dict(x, pool_weight=torch.ones(6)))
    with pytest.raises(TypeError, match="pool_weight must be a float tensor"):
        bind(s, **dict(x, pool_weight=torch.ones(2, 3, dtype=torch.int64)))
    with pytest.raises(ValueError, match="pool_weight was given but"):
        unpooled = AttentionSpec(window={"kind": "2d", "grid": [4, 6], "radius": 2}, prefix=2)
        bind(unpooled, **x)
    with pytest.raises(ValueError, match="key_padding_mask cannot be combined with window.pool"):
        bind(s, **x, key_padding_mask=torch.ones(1, s.expected_length(), dtype=torch.bool))


# -------------------------------------------------------------------------------------- reference
def _brute_force(spec, q, k, v, w, sinks, scale):
    """Per query, per key, straight from the definition (fp64 loops; tiny shapes only)."""
    B, H, L, D = q.shape
    n, grid, f = spec.prefix, spec.window.grid, spec.pool
    strides = [math.prod(grid[a + 1:]) for a in range(len(grid))]
    cells = list(itertools.product(*(range(g // fa) for g, fa in zip(grid, f))))
    offs = list(itertools.product(*(range(fa) for fa in f)))
    rep = H // k.shape[1]
    o = torch.zeros(B, H, L, v.shape[-1], dtype=torch.float64)
    for b, h in itertools.product(range(B), range(H)):
        kk, vv = k[b, h // rep], v[b, h // rep]
        pk = [sum(w[o_] * kk[n + sum((c * fa + oo) * st for c, fa, oo, st in zip(cell, f, o_, strides))]
                  for o_ in offs) for cell in cells]
        pv = [sum(w[o_] * vv[n + sum((c * fa + oo) * st for c, fa, oo, st in zip(cell, f, o_, strides))]
                  for o_ in offs) for cell in cells]
        for i in range(L):
            keys = [(kk[j], vv[j]) for j in range(L) if visible(spec, torch.tensor(i), torch.tensor(j))]
            if i >= n:
                keys += list(zip(pk, pv))
            logits = torch.stack([scale * (q[b, h, i] @ kj) for kj, _ in keys])
            extra = sinks[h] if sinks is not None else logits.new_zeros(0)
            M = torch.cat([logits, extra]).max()
            p = (logits - M).exp()
            o[b, h, i] = sum(pi * vj for pi, (_, vj) in zip(p, keys)) / (p.sum() + (extra - M).exp().sum())
    return o


@examples(12)
@given(data=st.data())
def test_reference_matches_brute_force(data):
    ndim = data.draw(st.sampled_from([2, 3]), label="ndim")
    grid = [data.draw(st.sampled_from([1, 2, 4]), label=f"g{a}") for a in range(ndim - 2)] + \
        [data.draw(st.sampled_from([2, 4, 6]), label="rows"), data.draw(st.sampled_from([2, 3, 4]), label="cols")]
    pool = [data.draw(st.sampled_from([f for f in (1, 2, 3, 4) if g % f == 0]), label=f"f{a}")
            for a, g in enumerate(grid)]
    spec = AttentionSpec(window={"kind": f"{ndim}d", "grid": grid, "radius": data.draw(st.integers(1, 3)),
                                 "shape": data.draw(st.sampled_from(["circle", "square"])), "pool": pool},
                         prefix=data.draw(st.integers(0, 3)), sinks=data.draw(st.integers(0, 2)))
    H = data.draw(st.sampled_from([1, 2]))
    x = {n: t.double() for n, t in random_inputs(spec, H=H, Hkv=data.draw(st.sampled_from([1, H])), D=4,
                                                  seed=data.draw(st.integers(0, 99))).items()}
    o = reference(spec, **x)
    want = _brute_force(spec, x["q"], x["k"], x["v"], x["pool_weight"], x.get("sink_logits"), 4 ** -0.5)
    assert rel_err(o, want) < 1e-12


def test_pool_kv_is_the_weighted_block_sum():
    spec = _spec(grid=(4, 6), pool=[2, 3], prefix=1)
    x = random_inputs(spec, H=1, D=3, dtype=torch.float64)
    kp = pool_kv(x["k"], spec.window.grid, spec.pool, 1, x["pool_weight"])
    grid_k = x["k"][0, 0, 1:].reshape(4, 6, 3)
    cell = (grid_k[2:4, 3:6] * x["pool_weight"][..., None]).sum((0, 1))   # pooled cell (1, 1) = row-major 3
    assert torch.allclose(kp[0, 0, 3], cell)



@pytest.mark.parametrize("grid, pool, prefix", [((4, 6), (2, 3), 1), ((2, 4, 6), (1, 2, 3), 0)])
def test_pool_kv_vjp_is_autograd_of_pool_kv(grid, pool, prefix):
    """The kernels' hand-written pooling vjp (TVM backward: d k, d v, d pool_weight from d kp) against autograd."""
    from lincomp.runtime.pool import pool_kv_vjp
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, prefix + math.prod(grid), 5, dtype=torch.float64, generator=gen).requires_grad_(True)
    w = torch.randn(*pool, dtype=torch.float64, generator=gen).requires_grad_(True)
    y = pool_kv(x, grid, pool, prefix, w)
    g = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    dx, dw = torch.autograd.grad(y, [x, w], g)
    got_dx, got_dw = pool_kv_vjp(g, x.detach(), grid, pool, prefix, w.detach())
    assert rel_err(got_dx, dx[:, :, prefix:]) < 1e-12 and not dx[:, :, :prefix].any()
    assert rel_err(got_dw, dw.reshape(-1)) < 1e-12


# --------------------------------------------------------------------------------- op and hooks
def test_torch_op_takes_pool_weight_and_differentiates_it():
    spec = _spec(grid=(4, 4), pool=2, prefix=2, sinks=1)
    x = random_inputs(spec, H=2, D=4, dtype=torch.float64)
    leaves = {n: t.clone().requires_grad_(True) for n, t in x.items()}
    o = torch.ops.lincomp.attention(leaves["q"], leaves["k"], leaves["v"], spec.canonical_json(),
                                    sink_logits=leaves["sink_logits"], pool_weight=leaves["pool_weight"],
                                    target="reference")
    r = reference(spec, **x)
    assert rel_err(o, r) < 1e-12
    (o * torch.randn_like(o)).sum().backward()
    assert leaves["pool_weight"].grad is not None and leaves["pool_weight"].grad.abs().sum() > 0


def test_distributed_single_process_and_pooled_cells_per_rank():
    """(The multi-rank forward / backward runs in tests/distributed via selfcheck's pooled cases.)"""
    from lincomp.distributed import Layout, engine
    from lincomp.distributed.pool import cell_indices
    spec = _spec(grid=(8, 8), pool=2)
    x = random_inputs(spec, H=1, D=4)
    assert rel_err(engine.attention(spec, target="reference", **x), reference(spec, **x)) == 0
    for world in (2, 4):
        layout = Layout.for_spec(spec, world)
        cells = torch.cat([cell_indices(spec, layout, r) for r in range(world)])
        assert sorted(cells.tolist()) == list(range(spec.window.pooled_tokens))   # each cell on one rank
    bad = _spec(grid=(6, 8), pool=2)
    with pytest.raises(ValueError, match=r"window.pool\[0\] = 2 does not divide: every rank must own whole"):
        cell_indices(bad, Layout.for_spec(bad, 2, mesh=[2, 1]), 0)


def test_dynamo_rejects_pooled_spec_on_a_stock_model():
    from lincomp.backends import dynamo
    assert dynamo._needs(_spec(), "pool_weight") and not dynamo._needs(AttentionSpec(), "pool_weight")


def test_cost_counts_pooled_pairs():
    from lincomp.ir.cost import estimate
    spec = _spec(grid=(4, 6), pool=2, prefix=3)
    L = spec.expected_length()
    unpooled = AttentionSpec(window={"kind": "2d", "grid": [4, 6], "radius": 2}, prefix=3)
    est, base = estimate(spec, L, D=8), estimate(unpooled, L, D=8)
    assert est.visible_pairs == base.visible_pairs + 4 * 6 * spec.window.pooled_tokens
    assert est.breakdown["window"] == base.breakdown["window"] + 2 * 16 * 4 * 6 * 6
    assert est.breakdown["pooling"] == 2 * 16 * 24


def test_grid_window_keeps_positional_construction():
    assert GridWindow((4, 4), 2, "circle", pool=2).pool == (2, 2)
    assert GridWindow((4, 4), 2).pool is None


def test_explain_shows_the_pooled_input_and_counts_its_flops():
    from lincomp.ir.explain import explain
    spec = presets.clear_pool(radius=3, factor=4, grid=(16, 16), text_tokens=8)
    out = explain(spec, spec.expected_length())
    assert "%pool_weight = input : in[4,4]" in out["text"] and "pool 4x4" in out["text"]
    assert "pooling" in out["text"]


def test_explain_parses_pooled_clear_names():
    from lincomp.ir.explain import load_spec
    assert load_spec("clear-r12-df2").pool == (2, 2) and load_spec("clear-r12-df2").window.radius == 12
    assert load_spec("clear-r12").pool is None
