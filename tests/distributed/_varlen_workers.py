"""Functions the spawned processes of tests/distributed/test_varlen.py run (importable by name)."""

import random

import torch

from lincomp import presets
from lincomp.distributed import Layout, attention, shard
from lincomp.reference import reference
from lincomp.testing import packed_inputs, rel_err

LENGTHS = [3, 5, 1, 7, 4, 4]                     # documents end at 3, 8, 9, 16, 20, 24
SIZES = {2: [9, 15], 3: [8, 8, 8]}               # rank slices ending on document ends
TERRACED_CROSSING = {2: [10, 14], 3: [8, 10, 6]}  # a rank border inside a document (at 10, resp. 18)

# Specs whose documents may cross rank borders: causal window, dense causal softmax, gated linear (vector
# gate, chunks of 4), Lizard (fused hybrid with sinks), LoLCATs with a sliding window (shared normaliser),
# a non-causal window + linear sum, a non-causal normalised linear branch.
CROSSING_SPECS = {
    "swa": presets.sliding_window(3),
    "dense": {"causal": True},
    "gla": presets.gla("vector", chunk_size=4),
    "lizard": presets.lizard(window=3, sinks=2, feature_dim=4, chunk_size=4),
    "lolcats-sw": presets.lolcats(block=3, feature_dim=3, terraced=False, chunk_size=4),
    "noncausal-sum": {"window": {"kind": "1d", "left": 2, "right": 3}, "combine": "sum",
                      "linear": {"feature_map": "relu"}},
    "noncausal-linear": {"linear": {"feature_map": "elu1", "normalize": True}},
}


def _double(x: dict) -> dict:
    return {k: (tuple(t.double().requires_grad_() for t in v) if isinstance(v, tuple) else
                v.double().requires_grad_() if v.is_floating_point() else v) for k, v in x.items()}


def _compare(spec, x: dict, layout, rank: int) -> dict:
    """Rel errs of this rank's output and input gradients against the single-process reference on the row."""
    loc = {k: shard(t, layout, rank) if k in ("q", "k", "v", "g") else t for k, t in x.items()}
    o = attention(spec, **loc, layout=layout, target="reference")
    ref = reference(spec, **x)
    probe = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=ref.dtype)
    leaves = [t for k, t in x.items()
              if torch.is_tensor(t) and t.is_floating_point() and k not in ("q", "k", "v", "g")]
    leaves += list(x.get("initial_state", ()))   # replicated like the weights
    tokens = [x[n] for n in ("q", "k", "v", "g") if n in x]
    mine = torch.autograd.grad((o * shard(probe, layout, rank)).sum(), leaves + tokens, allow_unused=True)
    want = torch.autograd.grad((ref * probe).sum(), leaves + tokens, allow_unused=True)
    errs = {"o": rel_err(o, shard(ref, layout, rank))}
    for i, (a, b) in enumerate(zip(mine[:len(leaves)], want)):   # replicated: the full gradient
        if a is not None or b is not None:   # z0 of an unnormalised branch is unused: None = zeros
            a, b = (torch.zeros_like(b) if a is None else a), (torch.zeros_like(a) if b is None else b)
            errs[f"weight{i}"] = rel_err(a, b)
    for nm, a, b in zip("qkvg", mine[len(leaves):], want[len(leaves):]):   # own tokens: their slice
        # a slice may be all but zero (a length-1 document's dq is 0 under a causal window or a normalised
        # linear branch): its error is measured against 1e-3 of the whole gradient's size then, not against 0
        floor = 1e-3 * b.norm().item()
        a, b = shard(a, layout, rank), shard(b, layout, rank)
        errs["d" + nm] = (a - b).norm().item() / max(b.norm().item(), floor)
    return errs


def packed_checks(rank, world):
    """Per spec: rel err of this rank's output and of the input gradients against the single-process reference."""
    out = {}
    layout = Layout.sequence(sum(LENGTHS), world, sizes=SIZES[world])
    for name, spec in {"swa": presets.sliding_window(3), "gla": presets.gla("vector", chunk_size=4),
                       "lizard": presets.lizard(window=3, sinks=2, feature_dim=4, chunk_size=4)}.items():
        x = _double(packed_inputs(spec, LENGTHS, H=2, D=4, seed=7, initial_state=spec.linear is not None))
        out[name] = _compare(spec, x, layout, rank)
    try:
        bad = Layout.sequence(sum(LENGTHS), world, sizes=TERRACED_CROSSING[world])
        attention(presets.lolcats(block=2, feature_dim=2), *(shard(t.detach(), bad, rank) for t in
                                                              (x["q"], x["k"], x["v"])),
                  layout=bad, target="reference", cu_seqlens=x["cu_seqlens"],
                  feature_weight_q=torch.randn(2, 4, 2), feature_weight_k=torch.randn(2, 4, 2))
        out["crossing"] = None
    except ValueError as e:
        out["crossing"] = str(e)
    return out


def crossing_layouts(world: int, count: int, seed: int = 0) -> list:
    """(document lengths, rank slice sizes) with documents crossing rank borders: two fixed rows (a document
    over every border with length-1 documents around it; a border inside a document next to one exactly at a
    document start) and ``count`` random ones (lengths 1..7, random slice sizes)."""
    L = 8 * world
    cases = [([1, 2, L - 9, 1, 5], [8] * world),                           # 3 .. L - 7 crosses every border
             ([3, 5, 1, 7] + [1] * (L - 16), [10, 6] + [8] * (world - 2))]  # 10 inside a document, 16 a start
    rng = random.Random(seed * 100 + world)
    for _ in range(count):
        lengths = []
        while sum(lengths) < L:
            lengths.append(min(rng.choice([1, 1, 2, 3, 5, 7, 11]), L - sum(lengths)))
        cuts = sorted(rng.sample(range(1, L), world - 1))
        cases.append((lengths, [b - a for a, b in zip([0] + cuts, cuts + [L])]))
    return cases


def crossing_checks(rank, world, count):
    """Documents crossing rank borders: {(case, spec): rel errs} of this rank against the reference row."""
    out = {}
    for c, (lengths, sizes) in enumerate(crossing_layouts(world, count)):
        layout = Layout.sequence(sum(lengths), world, sizes=sizes)
        for name, spec in CROSSING_SPECS.items():
            x = _double(packed_inputs(spec, lengths, H=2, D=4, seed=c, initial_state=True))
            out[(c, name)] = _compare(spec, x, layout, rank)
    return out
