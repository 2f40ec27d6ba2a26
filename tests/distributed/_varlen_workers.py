"""Functions the spawned processes of tests/distributed/test_varlen.py run (importable by name)."""

import torch

from lincomp import presets
from lincomp.distributed import Layout, attention, shard
from lincomp.reference import reference
from lincomp.testing import packed_inputs, rel_err

LENGTHS = [3, 5, 1, 7, 4, 4]                     # documents end at 3, 8, 9, 16, 20, 24
SIZES = {2: [9, 15], 3: [8, 8, 8]}               # rank slices ending on document ends
CROSSING = {2: [10, 14], 3: [8, 10, 6]}          # a rank border inside a document (at 10, resp. 18)


def packed_checks(rank, world):
    """Per spec: rel err of this rank's output and of the input gradients against the single-process reference."""
    out = {}
    layout = Layout.sequence(sum(LENGTHS), world, sizes=SIZES[world])
    for name, spec in {"swa": presets.sliding_window(3), "gla": presets.gla("vector", chunk_size=4),
                       "lizard": presets.lizard(window=3, sinks=2, feature_dim=4, chunk_size=4)}.items():
        x = packed_inputs(spec, LENGTHS, H=2, D=4, seed=7, initial_state=spec.linear is not None)
        x = {k: (tuple(t.double().requires_grad_() for t in v) if isinstance(v, tuple) else
                 v.double().requires_grad_() if v.is_floating_point() else v) for k, v in x.items()}
        loc = {k: shard(t, layout, rank) if k in ("q", "k", "v", "g") else t for k, t in x.items()}
        o = attention(spec, **loc, layout=layout, target="reference")
        ref = reference(spec, **x)
        probe = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=ref.dtype)
        leaves = [t for k, t in x.items()
                  if torch.is_tensor(t) and t.is_floating_point() and k not in ("q", "k", "v", "g")]
        leaves += list(x.get("initial_state", ()))   # replicated like the weights
        mine = torch.autograd.grad((o * shard(probe, layout, rank)).sum(), leaves + [x["q"], x["k"]], allow_unused=True)
        want = torch.autograd.grad((ref * probe).sum(), leaves + [x["q"], x["k"]], allow_unused=True)
        errs = {"o": rel_err(o, shard(ref, layout, rank))}
        for i, (a, b) in enumerate(zip(mine[:len(leaves)], want)):   # replicated: the full gradient
            if a is not None or b is not None:   # z0 of an unnormalised branch is unused: None = zeros
                a, b = (torch.zeros_like(b) if a is None else a), (torch.zeros_like(a) if b is None else b)
                errs[f"weight{i}"] = rel_err(a, b)
        for nm, a, b in zip("qk", mine[len(leaves):], want[len(leaves):]):   # own tokens: their slice
            errs["d" + nm] = rel_err(shard(a, layout, rank), shard(b, layout, rank))
        out[name] = errs
    try:
        bad = Layout.sequence(sum(LENGTHS), world, sizes=CROSSING[world])
        attention(presets.sliding_window(3), *(shard(t.detach(), bad, rank) for t in (x["q"], x["k"], x["v"])),
                  layout=bad, target="reference", cu_seqlens=x["cu_seqlens"])
        out["crossing"] = None
    except ValueError as e:
        out["crossing"] = str(e)
    return out
