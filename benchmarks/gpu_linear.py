"""GPU benchmark of the generated linear / hybrid kernels: lincomp vs flash-linear-attention, SDPA, FlexAttention.

``check_and_time(out_dir, quick=False) -> list[dict]`` (called by ``benchmarks/gpu_check.py``):
1. correctness at small sizes (L not a multiple of the chunk, grouped heads): forward and every
   gradient against the fp64 reference, fp32 (1e-4 / 1e-3, or 10x the fp32 reference's own error
   where the problem is ill-conditioned) and bf16 (1e-2); decoding token by token == the whole-sequence kernel;
2. timing, bf16, Lizard's setting B = 16, H = 32, D = 128, L = 2K, 4K, 8K (triton.testing.do_bench medians):
   - scalar gate (identity map) forward vs fla ``chunk_simple_gla``            goal >= 1.3x
   - vector gate forward and forward + backward vs fla ``chunk_gla``           goal >= 1.0x
   - fused Lizard hybrid (hedgehog_exp E = 64, scalar gate, normalised, window 128 + 4 sinks, "sum")
     vs fla ``chunk_simple_gla`` (numerator and denominator) + FlexAttention sliding window, separately
                                                                              goal >= 1.5x
   - dense causal SDPA (flash) for scale;
   - decoding: one step of the Lizard spec at 1K .. 128K tokens of context: time and state bytes must
     be flat (vs fla ``fused_recurrent_gla`` on one token where present).
flash-linear-attention (``fla-core``) is imported if present; without it its rows say "missing".
Writes ``linear.md`` and ``linear.json`` to ``out_dir``. Every case is guarded: an error becomes a row.

Run alone: ``PYTHONPATH=. python3 benchmarks/gpu_linear.py out/ [--quick]``. Without CUDA only the
correctness section runs (through the Triton interpreter, tiny sizes).
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lincomp import presets  # noqa: E402
from lincomp.ir import lower  # noqa: E402
from lincomp.spec import AttentionSpec  # noqa: E402

B_FULL, H_FULL, D_HEAD = 16, 32, 128
LENGTHS = (2048, 4096, 8192)
QUICK_LENGTHS = (2048,)
DECODE_CONTEXTS = (1024, 4096, 16384, 65536, 131072)
QUICK_DECODE = (1024, 131072)
GOALS = {"scalar_fwd": 1.3, "vector_fwd": 1.0, "vector_fwdbwd": 1.0, "lizard_fwd": 1.5}


# ================================================================================== helpers
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    from lincomp.testing import rel_err
    return rel_err(a, b)


def _bench(fn: Callable, quick: bool) -> float:
    """Median milliseconds of fn() on the GPU (triton.testing.do_bench)."""
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median"))


def _fla():
    """The fla functions that are installed: {name: callable} (empty without fla-core)."""
    found = {}
    try:
        from fla.ops.simple_gla import chunk_simple_gla
        found["chunk_simple_gla"] = chunk_simple_gla
    except Exception:  # fla missing or broken on this stack: its rows say so
        pass
    try:
        from fla.ops.gla import chunk_gla, fused_recurrent_gla
        found["chunk_gla"] = chunk_gla
        found["fused_recurrent_gla"] = fused_recurrent_gla
    except Exception:
        pass
    return found


def _fla_call(fn, q, k, v, **kw):
    """Call an fla op with [B, H, L, D] tensors (fla wants [B, T, H, D]); returns o [B, H, L, D]."""
    t = lambda x: x.transpose(1, 2).contiguous()  # noqa: E731
    args = {"q": t(q), "k": t(k), "v": t(v)}
    for name, x in kw.items():
        args[name] = t(x) if isinstance(x, torch.Tensor) and x.dim() >= 3 and name in ("g", "gk") else x
    if "head_first" in inspect.signature(fn).parameters:
        args["head_first"] = False
    out = fn(**args)
    o = out[0] if isinstance(out, tuple) else out
    return o.transpose(1, 2)


def _inputs(spec, B, H, L, D, dtype, dev, seed=0, Hkv=None, gate_strength=1.0, grad=False):
    from lincomp.testing import random_inputs
    inp = random_inputs(spec, B=B, H=H, L=L, D=D, Hkv=Hkv, dtype=torch.float32, device="cpu", seed=seed,
                        gate_strength=gate_strength)
    out = {}
    for name, x in inp.items():
        if isinstance(x, tuple):
            out[name] = tuple(t.to(dev, dtype) for t in x)
        else:
            out[name] = x.to(dev, dtype).requires_grad_(grad)
    return out


def _leaves(inp: dict) -> list:
    out = []
    for name, x in inp.items():
        for i, t in enumerate(x if isinstance(x, tuple) else (x,)):
            out.append((name if not isinstance(x, tuple) else f"{name}[{i}]", t))
    return out


# ============================================================================== correctness
CHECK_SPECS = {
    "gla-scalar": lambda: presets.gla("scalar"),
    "gla-vector": lambda: presets.gla("vector"),
    "elu1-norm-causal": lambda: AttentionSpec.from_dict({"causal": True, "linear": {
        "feature_map": "elu1", "gate": "scalar", "normalize": True, "chunk_size": 64}}),
    "lizard": lambda: presets.lizard(window=32, sinks=4, feature_dim=16),
    "lolcats-terraced": lambda: presets.lolcats(block=16, feature_dim=16),
    "lolcats-sliding-vector": lambda: AttentionSpec.from_dict({
        "window": {"kind": "1d", "left": 40, "right": 0}, "causal": True, "combine": "shared",
        "linear": {"feature_map": "hedgehog", "feature_dim": 16, "gate": "vector", "normalize": True}}),
    "noncausal-elu1": lambda: AttentionSpec.from_dict({"linear": {"feature_map": "elu1", "normalize": True}}),
    "noncausal-shared-prefix": lambda: AttentionSpec.from_dict({
        "window": {"kind": "1d", "left": 8, "right": 8}, "prefix": 5, "combine": "shared",
        "linear": {"feature_map": "relu", "normalize": True}}),
}


def _check_one(name, spec, dev, dtype, B, H, Hkv, L, D) -> dict:
    from lincomp.lower.triton.linear_kernel import compile_linear
    from lincomp.reference import reference
    kern = compile_linear(spec, autotune=False)
    inp = _inputs(spec, B, H, L, D, dtype, dev, Hkv=Hkv, grad=True)
    ref_in = {k: (tuple(t.detach().double().requires_grad_() for t in x) if isinstance(x, tuple)
                  else x.detach().double().requires_grad_()) for k, x in inp.items()}
    o = kern(**inp)
    o_ref = reference(spec, **ref_in)
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(dev)
    grads = torch.autograd.grad((o.float() * w).sum(), [t for _, t in _leaves(inp)], allow_unused=True)
    grads_ref = torch.autograd.grad((o_ref * w.double()).sum(), [t for _, t in _leaves(ref_in)], allow_unused=True)
    # yardstick: the same math in this dtype through the reference (ill-conditioned gradients)
    yard = {}
    if dtype == torch.float32:
        r32 = {k: (tuple(t.detach().clone().requires_grad_() for t in x) if isinstance(x, tuple)
                   else x.detach().clone().requires_grad_()) for k, x in inp.items()}
        o32 = reference(spec, **r32)
        g32 = torch.autograd.grad((o32 * w).sum(), [t for _, t in _leaves(r32)], allow_unused=True)
        yard = {n: _rel(a, b) for (n, _), a, b in zip(_leaves(inp), g32, grads_ref) if a is not None and b is not None}
    tol_f, tol_g = (1e-4, 1e-3) if dtype == torch.float32 else (1e-2, 1e-2)
    fwd = _rel(o, o_ref)
    worst, worst_allowed, worst_name, ok = 0.0, tol_g, "-", fwd <= tol_f
    for (n, _), a, b in zip(_leaves(inp), grads, grads_ref):
        if a is None or b is None:
            ok = ok and (a is None) == (b is None)
            continue
        e = _rel(a, b)
        allowed = max(tol_g, 10 * yard.get(n, 0.0))  # fp32: as good as the fp32 reference where that is worse
        ok = ok and e <= allowed
        if worst_name == "-" or e / allowed > worst / worst_allowed:
            worst, worst_allowed, worst_name = e, allowed, n
    return {"section": "check", "case": name, "dtype": str(dtype).replace("torch.", ""),
            "shape": f"B{B} H{H}/{Hkv} L{L} D{D}", "fwd_err": fwd, "worst_grad_err": worst,
            "worst_grad_allowed": worst_allowed, "worst_grad": worst_name, "ok": bool(ok)}


def _check_decode(dev) -> dict:
    from lincomp.lower.triton.decode import TritonDecoder
    from lincomp.lower.triton.linear_kernel import compile_linear
    spec = presets.lizard(window=16, sinks=2, feature_dim=16)
    L = 40 if dev.type == "cuda" else 12
    inp = _inputs(spec, 1, 2, L, 32, torch.float32, dev)
    full = compile_linear(spec, autotune=False)(**inp)
    weights = {k: v for k, v in inp.items() if k not in ("q", "k", "v", "g")}
    dec = TritonDecoder(spec, **weights)
    outs = [dec.step(inp["q"][:, :, t:t + 1], inp["k"][:, :, t:t + 1], inp["v"][:, :, t:t + 1],
                     inp["g"][:, :, t:t + 1]) for t in range(L)]
    err = _rel(torch.cat(outs, 2), full)
    return {"section": "check", "case": "decode == full (lizard)", "dtype": "float32", "shape": f"L{L}",
            "fwd_err": err, "ok": err <= 1e-4}


def check(dev, quick: bool) -> list:
    rows = []
    cuda = dev.type == "cuda"
    B, H, Hkv, L, D = (2, 4, 2, 200, 64) if cuda else (1, 2, 1, 24, 16)
    names = list(CHECK_SPECS) if (cuda and not quick) else ["gla-scalar", "lizard", "lolcats-terraced"]
    dtypes = (torch.float32, torch.bfloat16) if cuda else (torch.float32,)
    for name in names:
        for dtype in dtypes:
            try:
                rows.append(_check_one(name, CHECK_SPECS[name](), dev, dtype, B, H, Hkv, L, D))
            except Exception as e:  # an error is a row, not a crash
                rows.append({"section": "check", "case": name, "dtype": str(dtype), "ok": False,
                             "error": f"{type(e).__name__}: {e}"[:300]})
                traceback.print_exc()
    try:
        rows.append(_check_decode(dev))
    except Exception as e:
        rows.append({"section": "check", "case": "decode", "ok": False, "error": f"{type(e).__name__}: {e}"[:300]})
        traceback.print_exc()
    return rows


# =================================================================================== timing
def _flex_window(B, H, L, w, dev):
    """(flex_attention compiled, block mask) for a causal sliding window of w keys."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    sliding = lower(presets.sliding_window(w)).mask_mod()
    mask = create_block_mask(sliding, B=None, H=None, Q_LEN=L, KV_LEN=L, device=dev)
    return torch.compile(flex_attention, dynamic=False), mask


def _time_case(rows, section, case, L, fn, quick, **extra):
    try:
        ms = _bench(fn, quick)
        row = {"section": section, "case": case, "L": L, "ms": ms, **extra}
    except Exception as e:
        row = {"section": section, "case": case, "L": L, "ms": float("nan"), "error": f"{type(e).__name__}: {e}"[:300]}
        traceback.print_exc()
    rows.append(row)
    return row.get("ms", float("nan"))


def _speedup_row(rows, name, L, ours, theirs, goal):
    sp = theirs / ours if ours and ours == ours and theirs == theirs else float("nan")
    rows.append({"section": "speedup", "case": name, "L": L, "ms": ours, "peer_ms": theirs, "speedup": sp,
                 "goal": goal, "met": bool(sp >= goal) if sp == sp else False})


def time_all(dev, quick: bool) -> list:
    from lincomp.lower.triton.linear_kernel import compile_linear
    import torch.nn.functional as F

    rows = []
    fla = _fla()
    B, H, D = (4 if quick else B_FULL), H_FULL, D_HEAD
    bf = torch.bfloat16
    for L in (QUICK_LENGTHS if quick else LENGTHS):
        torch.cuda.empty_cache()
        # ---- scalar gate (GLA with one gate per head and token), forward ---------------------
        spec = presets.gla("scalar")
        kern = compile_linear(spec, autotune=not quick)
        inp = _inputs(spec, B, H, L, D, bf, dev)
        with torch.no_grad():
            ours = _time_case(rows, "linear", "lincomp scalar-gate fwd", L, lambda: kern(**inp), quick,
                              config=str(kern.config.get("forward")))
            if "chunk_simple_gla" in fla:
                f = fla["chunk_simple_gla"]
                theirs = _time_case(rows, "linear", "fla chunk_simple_gla fwd", L,
                                    lambda: _fla_call(f, inp["q"], inp["k"], inp["v"], g=inp["g"], scale=D ** -0.5),
                                    quick)
                _speedup_row(rows, "scalar fwd vs chunk_simple_gla", L, ours, theirs, GOALS["scalar_fwd"])
            else:
                rows.append({"section": "linear", "case": "fla chunk_simple_gla", "L": L, "note": "fla missing"})
            _time_case(rows, "linear", "SDPA causal (flash) fwd", L,
                       lambda: F.scaled_dot_product_attention(inp["q"], inp["k"], inp["v"], is_causal=True), quick)
        del inp

        # ---- vector gate (GLA), forward and forward + backward -------------------------------
        spec = presets.gla("vector")
        kern = compile_linear(spec, autotune=not quick)
        inp = _inputs(spec, B, H, L, D, bf, dev, gate_strength=0.1, grad=True)
        leaves = [inp["q"], inp["k"], inp["v"], inp["g"]]
        do = torch.randn_like(inp["q"])

        def ours_fb():
            o = kern(**inp)
            torch.autograd.grad(o, leaves, do)

        with torch.no_grad():
            ours_f = _time_case(rows, "linear", "lincomp vector-gate fwd", L, lambda: kern(**inp), quick,
                                config=str(kern.config.get("forward")))
        ours_b = _time_case(rows, "linear", "lincomp vector-gate fwd+bwd", L, ours_fb, quick)
        if "chunk_gla" in fla:
            f = fla["chunk_gla"]
            with torch.no_grad():
                th_f = _time_case(rows, "linear", "fla chunk_gla fwd", L,
                                  lambda: _fla_call(f, inp["q"], inp["k"], inp["v"], g=inp["g"], scale=D ** -0.5), quick)

            def theirs_fb():
                o = _fla_call(f, inp["q"], inp["k"], inp["v"], g=inp["g"], scale=D ** -0.5)
                torch.autograd.grad(o, leaves, do)

            th_b = _time_case(rows, "linear", "fla chunk_gla fwd+bwd", L, theirs_fb, quick)
            _speedup_row(rows, "vector fwd vs chunk_gla", L, ours_f, th_f, GOALS["vector_fwd"])
            _speedup_row(rows, "vector fwd+bwd vs chunk_gla", L, ours_b, th_b, GOALS["vector_fwdbwd"])
        del inp, leaves, do

        # ---- fused Lizard hybrid vs fla + FlexAttention separately ---------------------------
        spec = presets.lizard(window=128, sinks=4, feature_dim=64)
        kern = compile_linear(spec, autotune=not quick)
        inp = _inputs(spec, B, H, L, D, bf, dev, gate_strength=0.1)
        with torch.no_grad():
            ours = _time_case(rows, "hybrid", "lincomp lizard fused fwd", L, lambda: kern(**inp), quick,
                              config=str(kern.config.get("forward")))
            if "chunk_simple_gla" in fla:
                f = fla["chunk_simple_gla"]
                flex, bmask = _flex_window(B, H, L, 128, dev)
                ones = torch.ones(B, H, L, 16, dtype=bf, device=dev)
                wq, wk = inp["feature_weight_q"], inp["feature_weight_k"]
                alpha = inp["alpha"][None, :, None, None]

                def separate():
                    pq = torch.einsum("bhld,hde->bhle", inp["q"], wq)
                    pk = torch.einsum("bhld,hde->bhle", inp["k"], wk)
                    fq = torch.cat([pq.exp(), (-pq).exp()], -1)
                    fk = torch.cat([pk.exp(), (-pk).exp()], -1)
                    num = _fla_call(f, fq, fk, inp["v"], g=inp["g"], scale=1.0)
                    den = _fla_call(f, fq, fk, ones, g=inp["g"], scale=1.0)[..., :1]
                    ow = flex(inp["q"], inp["k"], inp["v"], block_mask=bmask)  # (sinks not even counted)
                    return num / den + alpha * ow

                separate()  # compile FlexAttention outside the timing
                theirs = _time_case(rows, "hybrid", "fla chunk_simple_gla x2 + FlexAttention window", L, separate,
                                    quick)
                _speedup_row(rows, "lizard fused vs fla + flex", L, ours, theirs, GOALS["lizard_fwd"])
        del inp
    rows += time_decode(dev, quick, fla)
    return rows


def time_decode(dev, quick: bool, fla: dict) -> list:
    """One decode step of the Lizard spec at growing context: time and state size must stay flat."""
    from lincomp.lower.triton.decode import TritonDecoder
    rows = []
    B, H, D = (4 if quick else B_FULL), H_FULL, D_HEAD
    bf = torch.bfloat16
    spec = presets.lizard(window=128, sinks=4, feature_dim=64)
    w = _inputs(spec, 1, H, 1, D, bf, dev)
    weights = {k: w[k] for k in ("feature_weight_q", "feature_weight_k", "sink_logits", "alpha")}
    tok = _inputs(spec, B, H, 1, D, bf, dev, seed=3)
    times = []
    for ctx in (QUICK_DECODE if quick else DECODE_CONTEXTS):
        try:
            dec = TritonDecoder(spec, **weights)
            dec.step(tok["q"], tok["k"], tok["v"], tok["g"])  # allocate the state
            st = dec.state
            for t in (st.S, st.z, st.ring_k, st.ring_v):
                t.normal_().abs_()
            st.t = ctx
            torch.cuda.synchronize()
            mem0 = torch.cuda.memory_allocated()

            def step():
                dec.step(tok["q"], tok["k"], tok["v"], tok["g"])
                dec.state.t = ctx  # keep the context length fixed while timing

            ms = _bench(step, quick)
            times.append(ms)
            rows.append({"section": "decode", "case": "lincomp lizard step", "L": ctx, "ms": ms,
                         "state_MiB": st.nbytes() / 2 ** 20,
                         "mem_growth_MiB": (torch.cuda.memory_allocated() - mem0) / 2 ** 20})
        except Exception as e:
            rows.append({"section": "decode", "case": "lincomp lizard step", "L": ctx, "ms": float("nan"),
                         "error": f"{type(e).__name__}: {e}"[:300]})
            traceback.print_exc()
    if len(times) >= 2 and all(t == t for t in times):
        rows.append({"section": "decode", "case": "flat (max/min step time)", "L": "-",
                     "ratio": max(times) / min(times), "met": max(times) / min(times) <= 1.25})
    if "fused_recurrent_gla" in fla:
        f = fla["fused_recurrent_gla"]
        q = torch.randn(B, H, 1, D, dtype=bf, device=dev)
        gk = -torch.rand(B, H, 1, D, dtype=bf, device=dev) * 0.1
        s0 = torch.randn(B, H, D, D, dtype=torch.float32, device=dev)
        _time_case(rows, "decode", "fla fused_recurrent_gla one token (linear only)", "-",
                   lambda: _fla_call(f, q, q, q, gk=gk, initial_state=s0, output_final_state=True), quick)
    return rows


# ===================================================================================== main
def _table(rows: list) -> str:
    cols = []
    for r in rows:
        for c in r:
            if c not in cols:
                cols.append(c)
    fmt = lambda x: f"{x:.4g}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def check_and_time(out_dir: str, quick: bool = False) -> list:
    """Correctness first (small shapes), then timings (CUDA only). Returns the table rows."""
    from _gpu_family import run_family
    return run_family("linear", "lincomp linear / hybrid kernels", check, time_all, out_dir, quick, _table)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    result = check_and_time(args[0] if args else os.environ.get("OUT", "out/gpu"), quick="--quick" in sys.argv)
    print(_table(result))
