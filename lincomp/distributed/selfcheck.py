"""Check distributed attention against the single-process reference, outputs and gradients.

    python -m lincomp.distributed.selfcheck --nproc 4            # gloo on CPU
    torchrun --nproc-per-node 2 -m lincomp.distributed.selfcheck # any backend torchrun sets up

Every rank builds the same global inputs (fixed seed), computes the reference and its gradients for
``loss = sum(o * W)`` (+ the final state's), then runs its shard through
:func:`lincomp.distributed.attention` and compares its own slice. Approximate prefix mode is compared
with its definition: prefix rows = the mean over ranks of attention over the prefix and one patch.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Optional

import torch

from lincomp.distributed.engine import attention
from lincomp.distributed.layout import Layout, box_shape, shard
from lincomp.reference import reference
from lincomp.spec import AttentionSpec, GridWindow
from lincomp.testing import random_inputs, rel_err

_REPLICATED = ("feature_weight_q", "feature_weight_k", "sink_logits", "window_gamma", "alpha", "pool_weight")


@dataclass
class Case:
    """One distributed-vs-reference comparison. ``layout``: kwargs of Layout.for_spec (e.g. sizes, mesh)."""

    name: str
    spec: dict
    L: Optional[int] = None
    B: int = 1
    H: int = 2
    Hkv: Optional[int] = None
    D: int = 8
    layout: dict = field(default_factory=dict)
    prefix_mode: str = "exact"
    overlap: bool = True
    initial_state: bool = False
    return_state: bool = False
    dtype: torch.dtype = torch.float32
    seed: Optional[int] = None


def _w1d(left, right=0):
    return {"kind": "1d", "left": left, "right": right}


def _lin(fmap="identity", gate=None, normalize=False, chunk=4):
    return {"feature_map": fmap, "feature_dim": 3 if fmap.startswith("hedgehog") else None, "gate": gate,
            "normalize": normalize, "chunk_size": chunk}


def default_cases(world: int) -> list:
    """Cases covering 1D/terraced/2D/3D windows, prefixes, sinks, GQA, linear and hybrid specs, uneven splits."""
    grid2 = {"kind": "2d", "grid": [6, 8], "radius": 3, "shape": "circle"}
    clear = {"window": grid2, "prefix": 4}
    uneven = [3] + [(19 - 3) // (world - 1) + (1 if i < (19 - 3) % (world - 1) else 0) for i in range(world - 1)]
    cases = [
        Case("swa-causal", {"window": _w1d(4), "causal": True}, L=22),
        Case("swa-causal-no-overlap", {"window": _w1d(4), "causal": True}, L=22, B=2, overlap=False),
        Case("swa-causal-uneven", {"window": _w1d(4), "causal": True, "sinks": 1}, L=19, layout={"sizes": uneven}),
        Case("1d-bidir-prefix-sinks-gqa", {"window": _w1d(3, 2), "prefix": 3, "sinks": 2}, L=25, Hkv=1),
        Case("1d-reach-spans-ranks", {"window": _w1d(9, 1), "causal": False}, L=4 * world + 3),
        Case("zero-reach", {"window": _w1d(0, 0), "prefix": 2}, L=15),
        Case("terraced", {"window": {"kind": "terraced", "block": 3}, "causal": True}, L=23),
        Case("dense-causal-prefix", {"causal": True, "prefix": 2}, L=13),
        Case("clear-2d-exact", clear),
        Case("clear-2d-exact-cols-no-overlap", clear, layout={"mesh": [1, world]}, overlap=False),
        Case("clear-2d-approximate", clear, prefix_mode="approximate"),
        Case("3d-square-causal", {"window": {"kind": "3d", "grid": [3, 4, 4], "radius": 1, "shape": "square"},
                                  "causal": True, "prefix": 2, "sinks": 1}),
        Case("gla-scalar-state", {"causal": True, "linear": _lin(gate="scalar")}, L=21,
             initial_state=True, return_state=True),
        Case("gla-vector-state", {"causal": True, "prefix": 2, "linear": _lin(gate="vector")}, L=21,
             return_state=True),
        Case("linear-noncausal-elu-prefix", {"prefix": 2, "linear": _lin("elu1", normalize=True)}, L=17),
        Case("lizard", {"window": _w1d(4), "causal": True, "sinks": 2, "combine": "sum",
                        "linear": _lin("hedgehog_exp", "scalar", True)}, L=23, initial_state=True, return_state=True),
        Case("lizard-prefix-uneven", {"window": _w1d(4), "causal": True, "sinks": 2, "prefix": 3, "combine": "sum",
                                      "linear": _lin("hedgehog_exp", "scalar", True)}, L=22,
             layout={"sizes": uneven}, return_state=True),
        Case("lolcats-terraced", {"window": {"kind": "terraced", "block": 3}, "causal": True, "combine": "shared",
                                  "linear": _lin("hedgehog", None, True)}, L=23),
        Case("shared-vector-gate-prefix", {"window": _w1d(3), "causal": True, "prefix": 2, "combine": "shared",
                                           "linear": _lin("elu1", "vector", True)}, L=21, initial_state=True),
        Case("sum-2d-noncausal-prefix", {"window": {"kind": "2d", "grid": [5, 6], "radius": 2, "shape": "circle"},
                                         "prefix": 3, "sinks": 1, "combine": "sum",
                                         "linear": _lin("elu1", None, True)}),
        Case("sum-2d-causal-band", {"window": {"kind": "2d", "grid": [6, 5], "radius": 1, "shape": "square"},
                                    "causal": True, "combine": "sum", "linear": _lin("relu", "scalar", False)},
             return_state=True),
        Case("clear-2d-pool-sinks-gqa", {"window": dict(grid2, grid=[8, 8], pool=[2, 2]), "prefix": 3, "sinks": 1},
             H=4, Hkv=2),
        Case("3d-pool", {"window": {"kind": "3d", "grid": [2, 4, 4], "radius": 1, "shape": "square", "pool": [2, 2, 1]}}),
    ]
    if world % 2 == 0:
        cases.append(Case("clear-2d-mesh-batch2", clear, B=2, layout={"mesh": [2, world // 2]}))
    return cases


def _err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / max(||ref||, 1e-3 * sqrt(numel)): an RMS floor, since a gradient that is zero in exact
    math (e.g. scores of a one-key softmax) is rounding noise on both sides."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return (out - ref).norm().item() / max(ref.norm().item(), 1e-3 * ref.numel() ** 0.5)


def _leaf(t):
    return t.detach().clone().requires_grad_(True) if isinstance(t, torch.Tensor) else t


def _approximate_prefix(spec: AttentionSpec, layout: Layout, inputs: dict) -> torch.Tensor:
    """Definition of approximate mode: prefix rows averaged over ranks of attention on prefix + one patch."""
    n, outs = spec.prefix, []
    for r in range(layout.world_size):
        sub = spec.with_grid(box_shape(layout.box(r))) if isinstance(spec.window, GridWindow) else spec
        part = {key: shard(t, layout, r) if key in ("q", "k", "v", "g") else t for key, t in inputs.items()}
        outs.append(reference(sub, **part)[:, :, :n])
    return torch.stack(outs).mean(0)


def run_case(case: Case, rank: int, world: int, device="cpu") -> dict:
    """Relative errors of this rank's output, final state and gradients against the reference."""
    spec = AttentionSpec.from_dict(case.spec)
    inputs = random_inputs(spec, B=case.B, H=case.H, L=case.L, D=case.D, Hkv=case.Hkv, dtype=case.dtype,
                           seed=len(case.name) if case.seed is None else case.seed,
                           initial_state=case.initial_state)
    inputs = {key: (tuple(t.to(device) for t in x) if isinstance(x, tuple) else x.to(device))
              for key, x in inputs.items()}
    L = inputs["q"].shape[2]
    layout = Layout.for_spec(spec, world, length=L, **case.layout)
    gen = torch.Generator().manual_seed(1234)
    W = torch.randn(inputs["q"].shape[:2] + (L, inputs["v"].shape[-1]), generator=gen, dtype=case.dtype).to(device)

    # single-process reference and its gradients
    ref_in = {key: (tuple(_leaf(t) for t in x) if isinstance(x, tuple) else _leaf(x)) for key, x in inputs.items()}
    out = reference(spec, **ref_in, return_state=case.return_state)
    o_ref, state_ref = out if case.return_state else (out, None)
    if case.prefix_mode == "approximate" and spec.prefix and not spec.causal:
        o_ref = torch.cat([_approximate_prefix(spec, layout, ref_in), o_ref[:, :, spec.prefix:]], 2)
    Ws = None if state_ref is None else [torch.randn(s.shape, generator=gen, dtype=case.dtype).to(device)
                                         for s in state_ref]
    loss = (o_ref * W).sum() + (0 if Ws is None else sum((s * w).sum() for s, w in zip(state_ref, Ws)))
    leaves = _flat_leaves(ref_in)
    ref_grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    ref_grads = dict(zip(leaves, ref_grads))

    # this rank's shard through lincomp.distributed
    loc_in = {key: (tuple(_leaf(t) for t in x) if isinstance(x, tuple)
                    else _leaf(shard(x, layout, rank) if key in ("q", "k", "v", "g") else x))
              for key, x in inputs.items()}
    out = attention(spec, **loc_in, layout=layout, prefix_mode=case.prefix_mode, overlap=case.overlap,
                    target="reference", return_state=case.return_state)
    o_loc, state_loc = out if case.return_state else (out, None)
    loss = (o_loc * shard(W, layout, rank)).sum()
    if Ws is not None:
        loss = loss + sum((s * w).sum() for s, w in zip(state_loc, Ws))
    loc_leaves = _flat_leaves(loc_in)
    loc_grads = dict(zip(loc_leaves, torch.autograd.grad(loss, list(loc_leaves.values()), allow_unused=True)))

    errs = {"o": rel_err(o_loc, shard(o_ref, layout, rank))}
    if state_ref is not None:
        errs["state"] = max(rel_err(a, b) for a, b in zip(state_loc, state_ref))
    for key, g_ref in ref_grads.items():
        g_loc = loc_grads[key]
        if g_ref is None and g_loc is None:
            continue
        if g_ref is None or g_loc is None:
            errs["d" + key] = float("inf")
            continue
        base = key.split(".")[0]
        errs["d" + key] = _err(g_loc, shard(g_ref, layout, rank) if base in ("q", "k", "v", "g") else g_ref)
    return errs


def _flat_leaves(d: dict) -> dict:
    out = {}
    for key, x in d.items():
        if isinstance(x, tuple):
            out.update({f"{key}.{i}": t for i, t in enumerate(x)})
        else:
            out[key] = x
    return out


def check(rank: int, world: int, cases=None, device="cpu") -> dict:
    """{case name: {quantity: relative error}} for this rank (a ``run_local`` target)."""
    cases = default_cases(world) if cases is None else cases
    return {c.name: run_case(c, rank, world, device) for c in cases}


def main(argv=None) -> int:
    import os
    import torch.distributed as dist
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2, help="processes to spawn (ignored under torchrun)")
    p.add_argument("--tol", type=float, default=1e-5)
    a = p.parse_args(argv)
    if "RANK" in os.environ:      # under torchrun
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
        device = f"cuda:{rank % torch.cuda.device_count()}" if backend == "nccl" else "cpu"
        per_rank = [None] * world
        dist.all_gather_object(per_rank, check(rank, world, device=device))
        dist.destroy_process_group()
        if rank:
            return 0
    else:
        from lincomp.distributed.launch import run_local
        world = a.nproc
        per_rank = run_local(check, world)
    worst = 0.0
    for name in per_rank[0]:
        errs = {}
        for r in per_rank:
            for key, e in r[name].items():
                errs[key] = max(errs.get(key, 0.0), e)
        worst = max(worst, *errs.values())
        print(f"{name:34s} " + " ".join(f"{k}={e:.1e}" for k, e in errs.items()))
    print(f"{world} ranks: worst relative error {worst:.2e} ({'ok' if worst <= a.tol else 'FAIL'} at {a.tol:g})")
    return 0 if worst <= a.tol else 1


if __name__ == "__main__":
    raise SystemExit(main())
