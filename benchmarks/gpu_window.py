"""GPU benchmark of the generated window (softmax) kernels: lincomp vs dense SDPA (flash) vs FlexAttention.

``check_and_time(out_dir, quick=False) -> list[dict]`` (called by ``benchmarks/gpu_check.py``):
1. correctness: lincomp forward and gradients against the fp32 reference at small sizes (bf16 and
   fp16), and lincomp's forward against FlexAttention's at every benchmark size;
2. timing, bf16, D = 128, forward and forward + backward:
   - causal sliding windows w = 128, 1024, 4096 at L = 8K, 32K, 128K (B = 1, H = 16);
   - CLEAR circles r = 8, 16, 32 on grids 64^2, 128^2, 256^2 with 512 prefix tokens (B = 1, H = 24);
   - the grid windows of the sliding-tile / pooled family (B = 1, H = 24): CLEAR r = 8 with pooled keys
     (df = 4) on 64^2 and 128^2 + 512, and sliding tiles on a video grid (STA: 16x32x32, tiles 4x8x8,
     kernel 3x3x3; 30x48x80, tiles 6x8x8, kernel 3x3x3, HunyuanVideo's latent shape).
   Peers: ``F.scaled_dot_product_attention`` with the flash backend (dense; causal for 1D) and
   ``torch.compile(flex_attention)`` with the same mask (row-major tokens, as CLEAR's code; the block
   mask is built once, outside the timing; pooled specs: the window's keys then the pooled ones,
   ``lincomp.ir.flex.pooled_mask_mod``, the pooling inside the timed call).
Useful TFLOP/s count only visible pairs (computed analytically, never with an L x L mask):
forward 4 * D * pairs, forward + backward 3.5x that (FlashAttention's convention). SDPA's TFLOP/s
count the pairs it computes (all, or the causal half).
Writes ``window.md`` and ``window.json`` to ``out_dir``. Every case is guarded: an error becomes a row.

Run alone: ``PYTHONPATH=. python3 benchmarks/gpu_window.py out/ [--quick]``.
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch

from lincomp import presets
from lincomp.ir import lower
from lincomp.ir.cost import count_visible_pairs
from lincomp.spec import AttentionSpec, GridWindow, Window1D

D_HEAD = 128
# Per window the middle length first: it is the one tuned; the other lengths read its db entry.
SWA_CASES = [(w, L) for w in (128, 1024, 4096) for L in (32768, 8192, 131072)]      # B=1, H=16
CLEAR_CASES = [(r, g) for g in (64, 128, 256) for r in (8, 16, 32)]                 # B=1, H=24, 512 text
QUICK_SWA = [(128, 8192), (1024, 32768)]
QUICK_CLEAR = [(8, 64), (16, 128)]
GRID_CASES = [("clear-pool r=8 df=4 64x64+512", ("pool", 8, 64)), ("clear-pool r=8 df=4 128x128+512", ("pool", 8, 128)),
              ("sta 16x32x32 t4x8x8 k3", ("sta", (16, 32, 32), (4, 8, 8))),
              ("sta 30x48x80 t6x8x8 k3", ("sta", (30, 48, 80), (6, 8, 8)))]
QUICK_GRID = GRID_CASES[:1] + GRID_CASES[2:3]
GOAL_VS_FLEX = {"1d": 1.1, "2d": 1.5, "grid": 1.5}
GOAL_VS_SDPA = 0.7
BWD_FACTOR = 2.5   # backward = 2.5 x forward FLOPs (5 matmuls vs 2)


# ======================================================================= analytic pair counting
def useful_pairs(spec: AttentionSpec, L: int) -> int:
    """|{(i, j) : j in W(i)}| in O(window) time (no L x L mask): the IR's exact count."""
    return count_visible_pairs(spec, L)


def flops(pairs: int, B: int, H: int, D: int, backward: bool) -> float:
    """Attention FLOPs for ``pairs`` (query, key) pairs: 2 matmuls of 2*D per pair forward."""
    f = 4.0 * D * pairs * B * H
    return f * (1.0 + BWD_FACTOR) if backward else f


# =============================================================================== tables
COLUMNS = ["case", "pass", "L", "density", "lincomp_ms", "flex_ms", "sdpa_ms", "lincomp_tflops", "flex_tflops",
           "sdpa_tflops", "vs_flex", "goal_vs_flex", "vs_sdpa", "goal_met", "err_vs_flex", "config"]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    if isinstance(v, dict):
        return ",".join(f"{k}={v[k]}" for k in ("block_m", "block_n", "tile", "num_warps", "num_stages") if k in v)
    return str(v)


def write_table(rows: list, out_dir: str) -> tuple:
    """Write ``window.json`` (all rows) and ``window.md`` (checks, timings, errors). Returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / "window.json", out / "window.md"
    jpath.write_text(json.dumps(rows, indent=1, default=str) + "\n")
    lines = ["# lincomp window kernels vs SDPA (flash, dense) and FlexAttention", ""]
    dev = next((r.get("device") for r in rows if r.get("device")), None)
    if dev:
        lines += [f"Device: {dev}. bf16, D={D_HEAD}. useful TFLOP/s count visible pairs only; "
                  f"vs_flex = flex_ms / lincomp_ms (goal 1.1 on 1D, 1.5 on 2D); vs_sdpa = lincomp useful "
                  f"TFLOP/s / SDPA TFLOP/s (goal {GOAL_VS_SDPA}).", ""]
    checks = [r for r in rows if r.get("pass") == "check"]
    if checks:
        lines += ["## Correctness", "", "| check | dtype | max rel err | ok |", "|---|---|---|---|"]
        lines += [f"| {r['case']} | {r.get('dtype', '-')} | {_fmt(r.get('max_rel_err'))} | {_fmt(r.get('ok'))} |"
                  for r in checks]
        lines.append("")
    timed = [r for r in rows if r.get("pass") in ("fwd", "fwd+bwd")]
    if timed:
        lines += ["## Timings", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |" for r in timed]
        lines.append("")
    bad = [r for r in rows if r.get("error") or r.get("skipped")]
    if bad:
        lines += ["## Errors and skipped cases", ""]
        lines += [f"- {r.get('case', '?')} ({r.get('pass', '')}): {r.get('error') or r.get('skipped')}" for r in bad]
        lines.append("")
    mpath.write_text("\n".join(lines))
    return jpath, mpath


def summarize(rows: list) -> dict:
    """Geometric-mean speedups per family and pass, and how many timed rows met their goals."""
    out = {}
    for fam in GOAL_VS_FLEX:
        for ps in ("fwd", "fwd+bwd"):
            sel = [r for r in rows if r.get("kind") == fam and r.get("pass") == ps and r.get("vs_flex")]
            if sel:
                out[f"{fam} {ps} vs flex (geomean)"] = math.exp(sum(math.log(r["vs_flex"]) for r in sel) / len(sel))
            sel = [r for r in rows if r.get("kind") == fam and r.get("pass") == ps and r.get("vs_sdpa")]
            if sel:
                out[f"{fam} {ps} vs sdpa (geomean)"] = math.exp(sum(math.log(r["vs_sdpa"]) for r in sel) / len(sel))
    timed = [r for r in rows if r.get("goal_met") is not None]
    out["goals met"] = f"{sum(bool(r['goal_met']) for r in timed)}/{len(timed)}"
    return out


# =============================================================================== GPU parts
def swa_spec(w: int) -> AttentionSpec:
    return AttentionSpec(window=Window1D(w - 1, 0), causal=True, name=f"swa-{w}")


def grid_spec(case: tuple) -> AttentionSpec:
    """("pool", r, g): CLEAR r with pooled keys (df = 4) on g x g + 512; ("sta", grid, tile): kernel 3x3x3."""
    if case[0] == "pool":
        return presets.clear_pool(case[1], 4, (case[2], case[2]), text_tokens=512)
    return presets.sta(case[1], case[2], (3, 3, 3))


def clear_spec(r: int, g: int, prefix: int = 512) -> AttentionSpec:
    return AttentionSpec(window=GridWindow((g, g), r, "circle"), prefix=prefix, name=f"clear-r{r}")


def _time_ms(fn: Callable, budget_s: float = 1.5, max_reps: int = 20) -> float:
    """Median CUDA time of ``fn`` with as many reps as fit a small budget (after one warm-up)."""
    from lincomp.tuning import median_time_ms
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    one = max(time.perf_counter() - t0, 1e-5)
    reps = int(max(3, min(max_reps, budget_s / one)))
    return median_time_ms(fn, warmup=1, reps=reps, device="cuda")


def _rel(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def correctness_checks(device="cuda") -> list:
    """lincomp forward + gradients vs the fp32 reference at small sizes, bf16 and fp16."""
    import lincomp
    from lincomp.testing import random_inputs
    rows = []
    specs = [("swa w=128 L=2048", swa_spec(128), 2048),
             ("swa w=1000+sinks L=1500 GQA", AttentionSpec(window=Window1D(999, 0), causal=True, sinks=4), 1500),
             ("clear r=8 24^2+512", clear_spec(8, 24), None),
             ("3d square r=2 4x12x12+64", AttentionSpec(window=GridWindow((4, 12, 12), 2, "square"), prefix=64), None),
             ("3d sta 4x8x8 t2x4x4 k3+16", presets.sta((4, 8, 8), (2, 4, 4), (3, 3, 3), text_tokens=16), None),
             ("clear-pool r=4 df=4 16x16+64", presets.clear_pool(4, 4, (16, 16), text_tokens=64), None),
             ("dense causal L=1000", AttentionSpec(causal=True), 1000)]
    for dtype in (torch.bfloat16, torch.float16):
        for name, spec, L in specs:
            row = {"family": "window", "case": name, "pass": "check", "dtype": str(dtype).replace("torch.", "")}
            try:
                Hkv = 2 if "GQA" in name else 4
                inp = random_inputs(spec, B=2, H=4, Hkv=Hkv, L=L, D=128 if "3d" not in name else 64, dtype=dtype,
                                    device=device, seed=1)
                kern = lincomp.compile(spec, target="triton")
                names = [n for n in ("q", "k", "v", "sink_logits", "pool_weight") if n in inp]
                leaves = {n: t.clone().requires_grad_(n in names) for n, t in inp.items()}
                o = kern(**leaves)
                do = torch.randn_like(o)
                grads = torch.autograd.grad(o, [leaves[n] for n in names], do)
                ref_in = {n: t.detach().float().requires_grad_(n in names) for n, t in inp.items()}
                ref = lincomp.reference(spec, **ref_in)
                ref_g = torch.autograd.grad(ref, [ref_in[n] for n in names], do.float())
                errs = {"o": _rel(o, ref), **{f"d{n}": _rel(a, b) for n, a, b in zip(names, grads, ref_g)}}
                row.update(errs=errs, max_rel_err=max(errs.values()), ok=max(errs.values()) <= 1e-2)
            except Exception as e:  # a row, never a crash
                row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
            rows.append(row)
    return rows


def _case_rows(kind, name, spec, B, H, L, D, peers, sdpa_cache, tune_left, quick, tuned_specs):
    """Time one case (forward, forward+backward) for lincomp and its peers; rows for both passes."""
    import lincomp
    from lincomp.lower.triton import window_launch as W
    from lincomp.tuning import device_name
    dev = torch.device("cuda")
    dtype = torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=dtype, generator=gen) for _ in range(3))
    do = torch.randn(B, H, L, D, device=dev, dtype=dtype, generator=gen)
    extra = {}
    if spec.pool is not None:   # CLEAR's pooled keys: a learned pooling weight, as a checkpoint holds one
        from lincomp.testing import random_inputs
        extra["pool_weight"] = random_inputs(spec, B=B, H=H, L=L, D=D, dtype=dtype, device=dev, seed=0)["pool_weight"]
    pairs = useful_pairs(spec, L)
    base = {"family": "window", "kind": kind, "case": name, "L": L, "B": B, "H": H, "D": D, "dtype": "bfloat16",
            "pairs": pairs, "density": pairs / (L * L), "device": device_name(dev)}
    tuned = False
    if tune_left() > 0 and spec not in tuned_specs:   # one tuning per spec; other lengths use its entry
        try:
            res = W.tune_window(spec, inputs={"q": q, "k": k, "v": v, **extra}, max_configs=6)
            tuned = True
            tuned_specs.add(spec)
            base["tuning"] = {kern: ("cached" if r.cached else f"{len(r.candidates)} configs") for kern, r in res.items()}
        except Exception as e:
            base["tuning"] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    kern = lincomp.compile(spec, target="triton")
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))

    def lin_f():
        return kern(q, k, v, **extra)

    def lin_fb():
        o = kern(qg, kg, vg, **extra)
        return torch.autograd.grad(o, (qg, kg, vg), do)

    results = {"lincomp": {"fwd": _time_ms(lin_f), "fwd+bwd": _time_ms(lin_fb)}}
    o_lin = lin_f()
    base["config"] = kern.config.get("window_fwd")
    base["config_bwd"] = kern.config.get("window_bwd")
    base["tuned"] = tuned or spec in tuned_specs
    err_flex = None
    # --- FlexAttention (same mask, row-major tokens)
    if peers.get("flex") is not None:
        try:
            flex, create_block_mask = peers["flex"], peers["create_block_mask"]
            if spec.pool is None:
                mask_mod, kv_len = peers["mask_for"](spec), L
            else:   # the window's keys, then the pooled ones (pooled inside the timed call, as ours)
                from lincomp.ir.flex import pooled_mask_mod
                from lincomp.runtime.pool import pooled_kv
                mask_mod, kv_len = pooled_mask_mod(spec), L + spec.window.pooled_tokens
            bm = create_block_mask(mask_mod, None, None, L, kv_len, device=dev, BLOCK_SIZE=128, _compile=True)
            torch.cuda.synchronize()

            def keys(kk, vv):
                if spec.pool is None:
                    return kk, vv
                kp, vp = pooled_kv(spec, kk, vv, extra["pool_weight"])
                return torch.cat([kk, kp], 2), torch.cat([vv, vp], 2)

            def flex_f():
                return flex(q, *keys(k, v), block_mask=bm)

            def flex_fb():
                o = flex(qg, *keys(kg, vg), block_mask=bm)
                return torch.autograd.grad(o, (qg, kg, vg), do)

            o_flex = flex_f()
            err_flex = _rel(o_lin, o_flex)
            results["flex"] = {"fwd": _time_ms(flex_f), "fwd+bwd": _time_ms(flex_fb)}
            base["flex_block_density"] = _block_density(bm)
            del bm, o_flex
        except Exception as e:
            base["flex_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    # --- SDPA flash (dense; causal for 1D), timed once per (L, H)
    key = (L, H, spec.causal)
    if key not in sdpa_cache:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            import torch.nn.functional as F

            def sdpa_f():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=spec.causal)

            def sdpa_fb():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=spec.causal)
                return torch.autograd.grad(o, (qg, kg, vg), do)

            budget = 0.8 if quick else 1.5
            sdpa_cache[key] = {"fwd": _time_ms(sdpa_f, budget), "fwd+bwd": _time_ms(sdpa_fb, budget)}
        except Exception as e:
            sdpa_cache[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    if "error" not in sdpa_cache[key]:
        results["sdpa"] = sdpa_cache[key]
    else:
        base["sdpa_error"] = sdpa_cache[key]["error"]
    sdpa_pairs = L * (L + 1) // 2 if spec.causal else L * L
    rows = []
    for ps in ("fwd", "fwd+bwd"):
        bwd = ps == "fwd+bwd"
        row = dict(base, **{"pass": ps, "err_vs_flex": err_flex})
        if bwd:
            row["config"] = base.get("config_bwd")
        for impl, res in results.items():
            ms = res[ps]
            row[f"{impl}_ms"] = ms
            p = sdpa_pairs if impl == "sdpa" else pairs
            row[f"{impl}_tflops"] = flops(p, B, H, D, bwd) / (ms * 1e-3) / 1e12
        if "flex_ms" in row:
            row["vs_flex"] = row["flex_ms"] / row["lincomp_ms"]
            row["goal_vs_flex"] = GOAL_VS_FLEX[kind]
        if "sdpa_tflops" in row:
            row["vs_sdpa"] = row["lincomp_tflops"] / row["sdpa_tflops"]
        goals = []
        if "vs_flex" in row:
            goals.append(row["vs_flex"] >= GOAL_VS_FLEX[kind])
        if "vs_sdpa" in row:
            goals.append(row["vs_sdpa"] >= GOAL_VS_SDPA)
        row["goal_met"] = all(goals) if goals else None
        if err_flex is not None and err_flex > 2e-2:
            row["error"] = f"lincomp differs from FlexAttention: rel err {err_flex:.3g}"
        rows.append(row)
    return rows


def _block_density(bm) -> Optional[float]:
    """Fraction of FlexAttention's 128 x 128 blocks that are computed."""
    try:
        return 1.0 - float(bm.sparsity()) / 100.0
    except Exception:
        return None


def _peers() -> dict:
    peers = {}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        peers.update(flex=torch.compile(flex_attention), create_block_mask=create_block_mask,
                     mask_for=lambda spec: lower(spec).mask_mod())
    except Exception as e:  # an older torch: no FlexAttention
        peers["flex"] = None
        peers["flex_error"] = f"{type(e).__name__}: {e}"
    return peers


def check_and_time(out_dir: str, quick: bool = False, *, time_budget_s: Optional[float] = None,
                   tune: Optional[bool] = None) -> list:
    """Correctness checks, then timings (see the module docstring). Returns the rows; writes the tables.

    ``time_budget_s`` bounds the whole run (default 150 s quick, 420 s full): cases that would start
    later are skipped (a row says so). ``tune`` (default: not quick) autotunes cases while a share of
    the budget is left; tuned keys are stored in the tuning db, so a second run does no tuning.
    """
    t_start = time.perf_counter()
    budget = time_budget_s if time_budget_s is not None else (150.0 if quick else 420.0)
    tune = (not quick) if tune is None else tune
    rows = []
    if not torch.cuda.is_available():
        rows.append({"family": "window", "case": "all", "skipped": "no CUDA device"})
        write_table(rows, out_dir)
        return rows
    left = lambda: budget - (time.perf_counter() - t_start)  # noqa: E731
    tune_left = (lambda: left() - 0.6 * budget) if tune else (lambda: 0.0)   # tune in the first 40% only
    try:
        rows += correctness_checks()
    except Exception as e:
        rows.append({"family": "window", "case": "correctness", "pass": "check", "ok": False,
                     "error": f"{type(e).__name__}: {e}"})
    peers = _peers()
    if peers.get("flex_error"):
        rows.append({"family": "window", "case": "flex", "skipped": peers["flex_error"]})
    sdpa_cache, tuned_specs = {}, set()
    cases = ([("1d", f"swa w={w} L={L // 1024}K", swa_spec(w), 1, 16, L) for w, L in (QUICK_SWA if quick else SWA_CASES)]
             + [("2d", f"clear r={r} {g}x{g}+512", clear_spec(r, g), 1, 24, g * g + 512)
                for r, g in (QUICK_CLEAR if quick else CLEAR_CASES)]
             + [("grid", name, spec, 1, 24, spec.expected_length())
                for name, spec in ((n, grid_spec(a)) for n, a in (QUICK_GRID if quick else GRID_CASES))])
    for kind, name, spec, B, H, L in cases:
        if left() < 15:
            rows.append({"family": "window", "kind": kind, "case": name, "skipped": "time budget"})
            continue
        try:
            rows += _case_rows(kind, name, spec, B, H, L, D_HEAD, peers, sdpa_cache, tune_left, quick, tuned_specs)
        except Exception as e:
            rows.append({"family": "window", "kind": kind, "case": name,
                         "error": f"{type(e).__name__}: {str(e)[:300]}",
                         "trace": traceback.format_exc(limit=3)[-600:]})
        torch.cuda.empty_cache()
    rows.append({"family": "window", "case": "summary", "summary": summarize(rows),
                 "wall_s": time.perf_counter() - t_start})
    write_table(rows, out_dir)
    return rows


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "out/gpu_window"
    result = check_and_time(out, quick="--quick" in sys.argv)
    print(Path(out, "window.md").read_text())
    print(json.dumps(result[-1], indent=1, default=str))
