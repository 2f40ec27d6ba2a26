"""Helpers for testing any backend against the reference: random inputs, error metric, spec strategies.

``random_inputs(spec, ...)`` draws q, k, v and every extra tensor the spec needs (valid values: gates
<= 0, gamma in (0, 1]); ``rel_err`` is docs/semantics.md's metric; ``spec_strategy()`` draws random specs
for hypothesis (imported lazily: hypothesis is a test dependency only).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from lincomp.documents import cu_seqlens_of
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
    if spec.pool is not None:   # around CLEAR's average init 1 / prod(f), not uniform (a real test of the weights)
        w = (0.5 + torch.rand(*spec.pool, generator=gen)) / math.prod(spec.pool)
        out["pool_weight"] = w.to(dtype=dtype, device=device)
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


# Extreme but valid values (what trained checkpoints and adversarial users pass): sinks switched off (-inf)
# or dominating, full resets of the gate, a window weight near 0, near one-hot softmaxes.
EXTREME_SINKS = (float("-inf"), -1e10, -1e4, -30.0, 0.0, 5.0, 30.0, 1e4)
EXTREME_GATES = (-1e4, -100.0, -30.0, -1.0, -1e-3, 0.0)
EXTREME_GAMMAS = (1e-8, 1e-6, 1e-4, 1e-2, 0.5, 1.0)
EXTREME_SCORES = (1.0, 30.0, 1e3, 1e4)      # largest |score| the softmax scale is set to reach


def extreme_case(*, head_dims=(8, 16, 24, 256, 512), max_len: int = 24, windows=("1d", "terraced", "2d", None),
                 gammas=EXTREME_GAMMAS):
    """A hypothesis strategy of ``(spec, inputs)`` with extreme but valid values: sink logits from -inf to
    +1e4, log gates from -1e4 to 0, window_gamma down to 1e-8, softmax scores up to 1e4 (through
    ``scale``), head dims up to 512. ``inputs`` are keyword arguments of ``kernel(**inputs)`` (fp32)."""
    from hypothesis import strategies as st

    @st.composite
    def _case(draw):
        spec = draw(spec_strategy(windows=windows, max_prefix=3, max_grid=4))
        D = draw(st.sampled_from(list(head_dims)), label="D")
        H = draw(st.sampled_from([1, 2]), label="H")
        L = spec.expected_length() or draw(st.integers(1, max_len), label="L")
        x = random_inputs(spec, B=1, H=H, L=L, D=D, seed=draw(st.integers(0, 99), label="seed"), feature_dim=4)
        lin = spec.linear
        if spec.sinks:
            x["sink_logits"] = torch.tensor([[draw(st.sampled_from(EXTREME_SINKS), label="sink")
                                              for _ in range(spec.sinks)] for _ in range(H)])
        if lin is not None and lin.gate is not None:
            picks = torch.tensor(draw(st.lists(st.sampled_from(EXTREME_GATES), min_size=4, max_size=4), label="g"))
            choice = torch.randint(0, 4, x["g"].shape, generator=torch.Generator().manual_seed(L))
            x["g"] = torch.where(choice == 0, x["g"], picks[choice])   # mixed with ordinary gates
        if spec.combine == "shared":
            x["window_gamma"] = torch.tensor([draw(st.sampled_from(list(gammas)), label="gamma") for _ in range(H)])
        if spec.has_softmax:
            top = draw(st.sampled_from(EXTREME_SCORES), label="max_score")
            raw = (x["q"].double() @ x["k"].double().transpose(-1, -2)).abs().max().item()
            x["scale"] = top / max(raw, 1e-6)
        return spec, x

    return _case()


def case_tolerance(spec: AttentionSpec, inputs: dict) -> float:
    """docs/semantics.md's fp32 bound (1e-4), widened only by the conditioning of fp32 scores: a logit of size S is
    rounded by about S * 2^-24, which moves a softmax weight by that much relative (1e4: 6e-4)."""
    scale = inputs.get("scale")
    if scale is None or not spec.has_softmax:
        return 1e-4
    top = (inputs["q"].double() @ inputs["k"].double().transpose(-1, -2)).abs().max().item() * abs(scale)
    return max(1e-4, 4 * top * 2.0 ** -24 * inputs["q"].shape[-1] ** 0.5)


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


def packed_inputs(spec: AttentionSpec, lengths, *, H: int = 2, Hkv: Optional[int] = None, D: int = 8,
                  dtype=torch.float32, seed: int = 0, feature_dim: Optional[int] = None,
                  gate_strength: float = 1.0, initial_state: bool = False) -> dict:
    """``random_inputs`` for one packed row of documents of these ``lengths`` (q ``[1, H, sum, D]``), with
    ``cu_seqlens`` and, when asked, an ``initial_state`` with one row per document. A grid window fixes
    every document's length (prefix + prod(grid)); ``lengths`` then only gives their number."""
    spec = AttentionSpec.coerce(spec)
    N, fixed = len(lengths), spec.expected_length()
    kw = dict(H=H, Hkv=Hkv, D=D, dtype=dtype, feature_dim=feature_dim, gate_strength=gate_strength)
    if fixed is not None:   # N grid documents drawn as a batch, then laid end to end
        lengths = [fixed] * N
        x = random_inputs(spec, B=N, seed=seed, **kw)
        for name in ("q", "k", "v", "g"):
            if name in x:
                t = x[name]
                x[name] = t.transpose(0, 1).reshape(1, t.shape[1], -1, *t.shape[3:]).contiguous()
    else:
        x = random_inputs(spec, B=1, L=sum(lengths), seed=seed, **kw)
    if initial_state and spec.linear is not None and spec.causal:
        x["initial_state"] = random_inputs(spec, B=N, L=1, seed=seed + 1, initial_state=True, **kw)["initial_state"]
    x["cu_seqlens"] = cu_seqlens_of(lengths)
    return x


def check_varlen_decoder(make, spec: AttentionSpec, prompts=(3, 1, 6), steps: int = 3, tol: float = 1e-4,
                         device="cpu") -> float:
    """Decode N sequences of different lengths with ``lincomp.runtime.varlen.VarlenDecoder`` (``make(spec,
    **weights)`` builds one sequence's decoder): the packed prompts, then ``steps`` tokens each (the first
    sequence drops out of the last step). Asserts every output against the fp64 packed reference; returns the
    worst rel err."""
    from lincomp.reference import reference
    from lincomp.runtime.varlen import VarlenDecoder

    spec = AttentionSpec.coerce(spec)
    lengths = [p + steps for p in prompts]
    x = packed_inputs(spec, lengths, H=2, D=8, feature_dim=4, seed=3)
    ref = reference(spec, **{k: (t.double() if t.is_floating_point() else t) for k, t in x.items()})
    x = {k: t.to(device) for k, t in x.items()}
    weights = {k: x[k] for k in ("feature_weight_q", "feature_weight_k", "sink_logits", "window_gamma", "alpha")
               if k in x}
    per_token = [n for n in ("q", "k", "v", "g") if n in x]
    starts = x["cu_seqlens"].tolist()[:-1]

    def rows(pos):   # {name: [len(pos), ...]} the tokens at packed positions pos
        return {n: torch.cat([x[n][:, :, p:p + 1] for p in pos], 0) for n in per_token}

    dec = VarlenDecoder(lambda: make(spec, **weights), spec)
    prompt_pos = [a + i for a, p in zip(starts, prompts) for i in range(p)]
    packed = {n: x[n][:, :, prompt_pos] for n in per_token}
    with torch.no_grad():
        o = dec.prefill(packed["q"], packed["k"], packed["v"], cu_seqlens_of(prompts), packed.get("g"))
    errs = [rel_err(o, ref[:, :, prompt_pos])]
    for s in range(steps):
        active = list(range(len(prompts))) if s < steps - 1 else list(range(1, len(prompts)))
        pos = [starts[d] + prompts[d] + s for d in active]
        t = rows(pos)
        with torch.no_grad():
            o = dec.step(t["q"], t["k"], t["v"], t.get("g"), active=active)
        errs.append(rel_err(o, torch.cat([ref[:, :, p:p + 1] for p in pos], 0)))
    assert dec.positions == [lengths[0] - 1] + lengths[1:], dec.positions
    assert max(errs) <= tol, f"{spec.summary()}: decoder rel errs {errs}"
    return max(errs)


__all__ = ["rel_err", "random_inputs", "packed_inputs", "check_varlen_decoder", "poison_like", "spec_strategy",
           "length_for", "examples", "GridWindow", "extreme_case", "case_tolerance"]
