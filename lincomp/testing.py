"""Helpers for testing any backend against the reference: random inputs, error metric, spec strategies.

``random_inputs(spec, ...)`` draws q, k, v and every extra tensor the spec needs (valid values: gates
<= 0, gamma in (0, 1]); ``rel_err`` is SEMANTICS.md's metric; ``spec_strategy()`` draws random specs
for hypothesis (imported lazily: hypothesis is a test dependency only).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from lincomp.spec import AttentionSpec, GridWindow


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; inf when out has NaN or Inf (never passes)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        raise AssertionError(f"shape {list(out.shape)} != reference {list(ref.shape)}")
    if not torch.isfinite(out).all():
        return float("inf")
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


def random_inputs(spec: AttentionSpec, B: int = 1, H: int = 2, L: Optional[int] = None, D: int = 16,
                  Hkv: Optional[int] = None, dtype=torch.float32, device="cpu", seed: int = 0,
                  feature_dim: Optional[int] = None, gate_strength: float = 1.0,
                  initial_state: bool = False) -> dict:
    """Keyword arguments for ``reference(spec, **inputs)`` / ``kernel(**inputs)``.

    A grid window fixes ``L`` (prefix + prod(grid)); ``L`` is ignored then. Gate log-values are in [-gate_strength, 0).
    """
    spec = AttentionSpec.coerce(spec)
    gen = torch.Generator().manual_seed(seed)
    L = spec.expected_length() or L   # a grid window fixes the length
    if L is None:
        raise ValueError("give L for specs without a grid window")
    Hkv = H if Hkv is None else Hkv

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)

    out = {"q": rnd(B, H, L, D), "k": rnd(B, Hkv, L, D), "v": rnd(B, Hkv, L, D)}
    lin = spec.linear
    F = D
    if lin is not None:
        if lin.has_weights:
            E = lin.feature_dim or feature_dim or max(2, D // 2)
            F = 2 * E
            # Small projections keep exp-based maps in a sane range, as trained checkpoints are.
            out["feature_weight_q"] = rnd(H, D, E, scale=0.5 / math.sqrt(D))
            out["feature_weight_k"] = rnd(H, D, E, scale=0.5 / math.sqrt(D))
        if lin.gate is not None:
            shape = (B, H, L) if lin.gate == "scalar" else (B, H, L, F)
            u = torch.rand(*shape, generator=gen)
            out["g"] = (-gate_strength * (0.02 + 0.98 * u)).to(dtype=dtype, device=device)
        if initial_state and spec.causal:
            S0 = rnd(B, H, F, D, scale=0.5)
            z0 = (torch.rand(B, H, F, generator=gen) + 0.5).to(dtype=dtype, device=device)
            if lin.feature_map not in ("identity",):
                S0 = S0.abs() if lin.normalize else S0
            out["initial_state"] = (S0, z0)
    if spec.sinks:
        out["sink_logits"] = rnd(H, spec.sinks)
    if spec.combine == "shared":
        out["window_gamma"] = (0.05 + 0.95 * torch.rand(H, generator=gen)).to(dtype=dtype, device=device)
    if spec.combine == "sum":
        out["alpha"] = (0.1 + torch.rand(H, generator=gen)).to(dtype=dtype, device=device)
    return out


def poison_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer filled with NaN: any element a kernel forgets to write fails the check."""
    return torch.full_like(t, float("nan"))


# ------------------------------------------------------------------------------- hypothesis
def spec_strategy(*, windows=("1d", "terraced", "2d", "3d", None), linear=True, hybrids=True,
                  sinks=True, max_prefix: int = 5, max_grid: int = 6, shapes=("circle", "square", "tile")):
    """A hypothesis strategy of valid AttentionSpecs covering every variant (``shapes``: of 2d / 3d windows)."""
    from hypothesis import strategies as st

    @st.composite
    def _spec(draw):
        kind = draw(st.sampled_from(list(windows)))
        causal = draw(st.booleans())
        window = None
        if kind == "1d":
            window = {"kind": "1d", "left": draw(st.integers(0, 12)), "right": draw(st.integers(0, 12))}
        elif kind == "terraced":
            window = {"kind": "terraced", "block": draw(st.integers(1, 8))}
        elif kind in ("2d", "3d"):
            n = 2 if kind == "2d" else 3
            most = max_grid if n == 2 else 3
            shape = draw(st.sampled_from(list(shapes)))
            if shape == "tile":   # tiles dividing the grid, an odd kernel of at most the number of tiles
                tile = [draw(st.integers(1, min(3, most))) for _ in range(n)]
                count = [draw(st.integers(1, max(1, most // t))) for t in tile]
                window = {"kind": kind, "grid": [t * c for t, c in zip(tile, count)], "shape": shape, "tile": tile,
                          "kernel": [draw(st.sampled_from([k for k in (1, 3, 5) if k <= c])) for c in count]}
            else:
                grid = [draw(st.integers(1, most)) for _ in range(n)]
                window = {"kind": kind, "grid": grid, "shape": shape,
                          "radius": draw(st.integers(1 if shape == "circle" else 0, 4))}
        prefix = draw(st.integers(0, max_prefix))
        lin = None
        combine = None
        mode = draw(st.sampled_from(["window"] + (["linear"] if linear else []) + (["hybrid"] if hybrids else [])))
        if mode == "linear" or (mode == "hybrid" and window is not None):
            fmap = draw(st.sampled_from(["identity", "elu1", "relu", "hedgehog", "hedgehog_exp"]))
            gate = draw(st.sampled_from([None, "scalar", "vector"])) if causal else None
            lin = {"feature_map": fmap, "feature_dim": None, "gate": gate,
                   "normalize": draw(st.booleans()) if fmap != "identity" else False,
                   "chunk_size": draw(st.sampled_from([1, 3, 4, 8, 16]))}
            if mode == "linear":
                window = None
            else:
                combine = draw(st.sampled_from(["shared", "sum"]))
        n_sinks = 0
        if sinks and combine != "shared" and (lin is None or window is not None):
            n_sinks = draw(st.integers(0, 3))
        return AttentionSpec.from_dict({"window": window, "causal": causal, "prefix": prefix, "sinks": n_sinks,
                                        "linear": lin, "combine": combine})

    return _spec()


def length_for(spec: AttentionSpec, free_length: int) -> int:
    """The sequence length to test ``spec`` at: fixed by a grid window, else ``free_length``."""
    fixed = spec.expected_length()
    return fixed if fixed is not None else free_length


def examples(n: int):
    """Hypothesis ``settings`` for a slow property: ``n`` examples under the default ``ci`` profile, the
    profile's own count under any other (``HYPOTHESIS_PROFILE=dev``); no deadline, no health checks."""
    import os

    from hypothesis import HealthCheck, settings

    if os.environ.get("HYPOTHESIS_PROFILE", "ci") == "ci":
        return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck))
    return settings(deadline=None, suppress_health_check=list(HealthCheck))


__all__ = ["rel_err", "random_inputs", "poison_like", "spec_strategy", "length_for", "examples", "GridWindow"]
