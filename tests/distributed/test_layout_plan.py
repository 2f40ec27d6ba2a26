"""Layouts and plans without processes: shard/unshard, mesh choice, and the local-compute trick
(every task's rows computed on its key box alone equal the whole-sequence reference)."""

import pytest
import torch
from hypothesis import given, strategies as st

from lincomp import presets
from lincomp.distributed import Layout, global_plan, shard, unshard
from lincomp.distributed.layout import box_shape, box_size, flat_index
from lincomp.distributed.plan import key_box
from lincomp.reference import reference
from lincomp.spec import AttentionSpec, GridWindow, TerracedWindow
from lincomp.testing import random_inputs, rel_err, spec_strategy


@pytest.mark.parametrize("layout", [
    Layout.sequence(17, 3, prefix=2, sizes=[2, 9, 4]),
    Layout.grid((5, 7), 4, prefix=3, mesh=(2, 2)),
    Layout.grid((3, 4, 5), 6, prefix=1, sizes=[[1, 2], [4], [1, 2, 2]]),
])
def test_shard_unshard_roundtrip(layout):
    x = torch.randn(2, 3, layout.length, 4)
    pieces = [shard(x, layout, r) for r in range(layout.world_size)]
    assert [p.shape[2] for p in pieces] == [layout.local_length(r) for r in range(layout.world_size)]
    assert all(torch.equal(p[:, :, :layout.prefix], x[:, :, :layout.prefix]) for p in pieces)
    assert torch.equal(unshard(pieces, layout), x)
    assert sum(box_size(layout.box(r)) for r in range(layout.world_size)) == layout.tokens


def test_default_mesh_and_contiguity():
    assert Layout.grid((64, 64), 4, reach=(7, 7)).mesh == (2, 2)
    assert Layout.grid((8, 64), 4, reach=(3, 3)).mesh == (1, 4)
    spec = AttentionSpec.from_dict({"window": {"kind": "2d", "grid": [16, 16], "radius": 4}, "causal": True,
                                    "combine": "sum", "linear": {"feature_map": "relu"}})
    lay = Layout.for_spec(spec, 4)
    assert lay.mesh == (4, 1) and all(lay.flat_range(r) == (64 * r, 64 * (r + 1)) for r in range(4))
    assert Layout.grid((4, 4), 4, mesh=(2, 2)).flat_range(1) is None


@pytest.mark.parametrize("make, words", [
    (lambda: Layout.sequence(10, 3, sizes=[5, 5, 1]), "sum to 11"),
    (lambda: Layout.sequence(10, 3, sizes=[5, 5, 0]), "at least one token"),
    (lambda: Layout.sequence(4, 3, prefix=2), "cannot give each of 3 ranks"),
    (lambda: Layout.grid((4, 4), 4, mesh=(2, 3)), "world size 4"),
    (lambda: Layout.grid((2, 8), 4, mesh=(4, 1)), "mesh[0] = 4 parts"),
    (lambda: Layout.for_spec({"window": {"kind": "1d", "left": 3}}, 2), "length is required"),
])
def test_layout_errors_name_the_field(make, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[")):
        make()


def test_causal_linear_needs_contiguous_patches():
    spec = AttentionSpec.from_dict({"window": {"kind": "2d", "grid": [4, 4], "radius": 1}, "causal": True,
                                    "combine": "sum", "linear": {"feature_map": "relu"}})
    with pytest.raises(ValueError, match="mesh=\\(4, 1"):
        global_plan(spec, Layout.grid((4, 4), 4, mesh=(2, 2)), True)


def _check_plan(spec, layout, overlap):
    plan = global_plan(spec, layout, overlap)
    for rp in plan.ranks:
        rows = torch.cat([flat_index(t.rows, rp.own) for t in rp.tasks]) if rp.tasks else torch.arange(0)
        if plan.parts.task_spec is not None:        # task rows partition the own box
            assert torch.equal(rows.sort().values, torch.arange(box_size(rp.own)))
        for t in rp.tasks:
            assert key_box(plan.parts.task_spec, layout.shape, t.rows) == t.keys
            assert all(e0 <= k0 and k1 <= e1 for (k0, k1), (e0, e1) in zip(t.keys, rp.ext))
            if isinstance(spec.window, TerracedWindow):
                assert t.keys[0][0] % spec.window.block == 0          # blocks stay aligned
        for peer, box in rp.recv.items():
            assert plan.ranks[peer].send[rp.rank] == box
    if spec.causal and spec.window is not None and not isinstance(spec.window, GridWindow):
        assert not plan.ranks[0].recv                                   # rank 0: empty halo
    return plan


def _simulate(spec, layout, overlap, x):
    """Every rank's window rows from its tasks alone (reference on prefix + key box), reassembled."""
    plan = _check_plan(spec, layout, overlap)
    n, pieces = spec.prefix, []
    for rp in plan.ranks:
        outs = []
        for t in rp.tasks:
            sub = spec.with_grid(box_shape(t.keys)) if isinstance(spec.window, GridWindow) else spec
            idx = torch.cat([torch.arange(n), n + flat_index(t.keys, layout.whole)])
            o = reference(sub, *(x[c].index_select(2, idx) for c in "qkv"), sink_logits=x.get("sink_logits"))
            outs.append(o.index_select(2, n + flat_index(t.rows, t.keys)))
        own = torch.cat(outs, 2).index_select(2, rp.index("place", "cpu"))
        pieces.append(torch.cat([own.new_zeros(own.shape[:2] + (n,) + own.shape[3:]), own], 2))
    return unshard(pieces, layout)


@given(spec=spec_strategy(windows=("1d", "terraced", "2d", "3d"), linear=False, hybrids=False,
                          shapes=("circle", "square")),
       world=st.integers(1, 5), overlap=st.booleans(), seed=st.integers(0, 99))
def test_local_compute_trick_matches_whole_sequence(spec, world, overlap, seed):
    """Translation invariance + halo width: rows computed on their key box equal the global rows."""
    L = spec.expected_length() or 23
    tokens = L - spec.prefix
    if isinstance(spec.window, GridWindow):
        try:
            layout = Layout.for_spec(spec, world)
        except ValueError:            # more ranks than the grid can split
            return
    else:
        if tokens < world:
            return
        cuts = sorted(torch.randperm(tokens - 1, generator=torch.Generator().manual_seed(seed))[:world - 1] + 1)
        sizes = [b - a for a, b in zip([0] + [int(c) for c in cuts], [int(c) for c in cuts] + [tokens])]
        layout = Layout.for_spec(spec, world, length=L, sizes=sizes)        # random uneven slices
    x = random_inputs(spec, L=L, D=4, seed=seed)
    ref = reference(spec, **x)[:, :, spec.prefix:]
    got = _simulate(spec, layout, overlap, x)[:, :, spec.prefix:]
    assert rel_err(got, ref) <= 1e-5


def test_sliding_tiles_are_not_split():
    """A sliding tile shifts at the grid borders: a rank's sub-grid would see another window; say so."""
    spec = presets.sta(grid=(4, 8, 8), tile=(1, 4, 4), kernel=(3, 1, 1))
    with pytest.raises(ValueError, match="window.shape 'tile'"):
        global_plan(spec, Layout.for_spec(spec, 2), overlap=False)
