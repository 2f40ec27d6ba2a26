"""Functions the spawned test processes run (a plain module, so the children can import it)."""

from collections import Counter

import torch

from lincomp.distributed import Layout, attention, global_plan, shard
from lincomp.distributed.plan import traffic
from lincomp.distributed.selfcheck import check
from lincomp.reference import reference
from lincomp.spec import AttentionSpec
from lincomp.testing import random_inputs, rel_err

TRAFFIC_SPECS = {
    "clear-exact": ({"window": {"kind": "2d", "grid": [6, 8], "radius": 3, "shape": "circle"}, "prefix": 4}, None, "exact"),
    "clear-approximate": ({"window": {"kind": "2d", "grid": [6, 8], "radius": 3, "shape": "circle"}, "prefix": 4},
                          None, "approximate"),
    "shared-gated": ({"window": {"kind": "1d", "left": 3, "right": 0}, "causal": True, "prefix": 2,
                      "combine": "shared", "linear": {"feature_map": "elu1", "gate": "vector", "normalize": True}},
                     21, "exact"),
    "gla": ({"causal": True, "linear": {"feature_map": "identity", "gate": "scalar"}}, 21, "exact"),
    "linear-noncausal": ({"linear": {"feature_map": "relu"}}, 17, "exact"),
}


def _traffic(rank, world):
    out = {}
    for name, (d, L, mode) in TRAFFIC_SPECS.items():
        spec = AttentionSpec.from_dict(d)
        x = random_inputs(spec, B=2, H=2, L=L, D=8, seed=3)
        layout = Layout.for_spec(spec, world, length=x["q"].shape[2])
        loc = {k: shard(t, layout, rank) if k in ("q", "k", "v", "g") else t for k, t in x.items()}
        stats = Counter()
        with torch.no_grad():
            o = attention(spec, **loc, layout=layout, prefix_mode=mode, target="reference", stats=stats)
        model = traffic(global_plan(spec, layout, True), rank, B=2, H=2, D=8, itemsize=4, prefix_mode=mode)
        ok = mode == "approximate" or rel_err(o, shard(reference(spec, **x), layout, rank)) < 1e-5
        out[name] = (dict(stats), model, ok)
    return out


def _errors(rank, world):
    spec = AttentionSpec.from_dict({"window": {"kind": "1d", "left": 2, "right": 0}, "causal": True})
    x = random_inputs(spec, L=12, H=2, D=4)
    layout = Layout.sequence(12, world)
    loc = {k: shard(t, layout, rank) for k, t in x.items()}
    msgs = {}
    attempts = {
        "length": lambda: attention(spec, loc["q"][:, :, :-1], loc["k"][:, :, :-1], loc["v"][:, :, :-1], layout=layout),
        "world": lambda: attention(spec, **loc, layout=Layout.sequence(12, world + 1)),
        "prefix_mode": lambda: attention(spec, **loc, layout=layout, prefix_mode="fast"),
        "shared_noncausal": lambda: attention(
            {"window": {"kind": "1d", "left": 2, "right": 0}, "combine": "shared",
             "linear": {"feature_map": "elu1", "normalize": True}}, **loc, layout=layout,
            window_gamma=torch.full((2,), 0.5)),
    }
    for name, fn in attempts.items():        # each raises before any communication
        try:
            fn()
            msgs[name] = None
        except (ValueError, TypeError, NotImplementedError) as e:
            msgs[name] = f"{type(e).__name__}: {e}"
    return msgs


def group_checks(rank, world):
    return {"cases": check(rank, world), "traffic": _traffic(rank, world), "errors": _errors(rank, world)}
