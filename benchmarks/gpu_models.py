"""GPU benchmark of a Flux-shaped transformer stack: stock SDPA vs CLEAR through lincomp (Triton), end to end.

``check_and_time(out_dir, quick=False) -> list[dict]`` (called by ``benchmarks/gpu_check.py``):

1. correctness: a small Flux stack (FLUX.1 widths: 24 heads of 128, hidden 3072; 32x32 latent grid, 64 text
   tokens, bf16) linearised with CLEAR r=8; lincomp's Triton kernels against the same model on the reference
   (model outputs, relative error; docs/semantics.md allows 1e-2 in bf16), and the compiled model (torch.compile,
   backend="lincomp") against eager;
2. timing, bf16, B = 1, 512 text tokens, a stack of FLUX.1-shaped blocks (1 double-stream + 2 single-stream;
   ``quick``: 1 + 1) with random weights, at the token counts of 2048^2, 4096^2 and 8192^2 images (latent grids
   128^2, 256^2, 512^2 = 16K, 64K, 256K image tokens; ``quick``: 2048^2 only): the stock model (diffusers'
   processor, SDPA / flash) vs CLEAR r = 8 and 16 through lincomp (``quick``: r = 8). Median of 3 forwards
   after a warm-up; the first lincomp call (kernel build + window plan) is reported separately.

Without CUDA it runs the correctness part only, on a tiny stack in the Triton interpreter.
Writes ``models.md`` and ``models.json`` to ``out_dir``. Every case is guarded: an error becomes a row.

Run alone: ``PYTHONPATH=. python3 benchmarks/gpu_models.py out/ [--quick]``.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TEXT_TOKENS = 512
RESOLUTIONS = (2048, 4096, 8192)
RADII = (8, 16)
LATENT_PER_PIXEL = 16   # FLUX: VAE / 8, then 2x2 patches


@dataclass(frozen=True)
class Stack:
    """Widths and depth of the Flux-shaped stack."""

    heads: int = 24
    head_dim: int = 128
    joint_dim: int = 4096
    pooled_dim: int = 768
    in_channels: int = 64
    rope: tuple = (16, 56, 56)
    double: int = 1
    single: int = 2


FLUX = Stack()
TINY = Stack(heads=2, head_dim=16, joint_dim=32, pooled_dim=16, in_channels=8, rope=(4, 6, 6), double=1, single=1)


def build(stack: Stack, device, dtype):
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    with torch.device(device):
        model = FluxTransformer2DModel(patch_size=1, in_channels=stack.in_channels, num_layers=stack.double,
                                       num_single_layers=stack.single, attention_head_dim=stack.head_dim,
                                       num_attention_heads=stack.heads, joint_attention_dim=stack.joint_dim,
                                       pooled_projection_dim=stack.pooled_dim, axes_dims_rope=stack.rope)
    return model.to(dtype).eval()


def inputs(stack: Stack, grid: int, text: int, device, dtype) -> dict:
    g = torch.Generator(device="cpu").manual_seed(1)
    ar = [torch.zeros(1), torch.arange(grid).float(), torch.arange(grid).float()]
    img_ids = torch.stack(torch.meshgrid(*ar, indexing="ij"), -1).reshape(-1, 3)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return dict(hidden_states=rnd(1, grid * grid, stack.in_channels), encoder_hidden_states=rnd(1, text, stack.joint_dim),
                pooled_projections=rnd(1, stack.pooled_dim), timestep=torch.tensor([0.5], device=device, dtype=dtype),
                img_ids=img_ids.to(device), txt_ids=torch.zeros(text, 3, device=device),
                joint_attention_kwargs={"lincomp_grid": (grid, grid)})


def _stock_kwargs(kw: dict) -> dict:
    return {k: v for k, v in kw.items() if k != "joint_attention_kwargs"}


def _linearised(model, radius: int, target: str):
    from lincomp import presets
    from lincomp.models import linearize
    return linearize(copy.deepcopy(model), presets.clear(radius=radius, grid=(1, 1), text_tokens=0), target=target)


def _rel(a, b) -> float:
    from lincomp.testing import rel_err
    return rel_err(a.float(), b.float())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, reps: int = 3) -> tuple:
    """(first call s, median ms of ``reps`` calls after it)."""
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return first, statistics.median(times)


def check(device, quick: bool) -> list:
    """Correctness of the linearised stack: Triton vs reference, compiled vs eager."""
    stack, grid, text = (FLUX, 32, 64) if device.type == "cuda" else (TINY, 6, 5)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    try:
        stock = build(stack, device, dtype)
        kw = inputs(stack, grid, text, device, dtype)
        with torch.no_grad(), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            fast = _linearised(stock, 8, "triton")
            ref = _linearised(stock, 8, "reference")
            out = fast(**kw).sample
            want = ref(**kw).sample
            torch._dynamo.reset()
            compiled = torch.compile(fast, backend="lincomp", options={"inductor": device.type == "cuda"})(**kw).sample
        fallbacks = sorted({str(w.message)[:80] for w in seen if "lincomp" in str(w.message)})
        tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
        err, cerr = _rel(out, want), _rel(compiled, out)
        rows.append({"section": "check", "case": f"CLEAR r=8, grid {grid}^2 + {text} text, {str(dtype)[6:]}",
                     "rel_err_vs_reference": err, "rel_err_compiled_vs_eager": cerr,
                     "ok": bool(err <= tol and cerr <= tol), "note": "; ".join(fallbacks)[:200]})
    except Exception as e:
        rows.append({"section": "check", "case": "CLEAR r=8", "error": f"{type(e).__name__}: {e}"[:300]})
        traceback.print_exc()
    return rows


def time_all(device, quick: bool) -> list:
    rows = []
    stack = Stack(double=1, single=1) if quick else FLUX
    dtype = torch.bfloat16
    stock = build(stack, device, dtype)
    for res in (RESOLUTIONS[:1] if quick else RESOLUTIONS):
        grid = res // LATENT_PER_PIXEL
        kw = inputs(stack, grid, TEXT_TOKENS, device, dtype)
        tokens = grid * grid + TEXT_TOKENS
        base = {"section": "timing", "resolution": f"{res}^2", "tokens": tokens,
                "stack": f"{stack.double} double + {stack.single} single"}
        try:
            with torch.no_grad():
                _, stock_ms = _time(lambda: stock(**_stock_kwargs(kw)), device)
            rows.append({**base, "case": "stock SDPA", "ms": stock_ms})
        except Exception as e:
            stock_ms = None
            rows.append({**base, "case": "stock SDPA", "error": f"{type(e).__name__}: {e}"[:300]})
            torch.cuda.empty_cache()
        for r in (RADII[:1] if quick else RADII):
            try:
                model = _linearised(stock, r, "triton")
                with torch.no_grad():
                    first, ms = _time(lambda: model(**kw), device)
                row = {**base, "case": f"lincomp CLEAR r={r}", "ms": ms, "first_call_s": first}
                if stock_ms:
                    row["speedup_vs_stock"] = stock_ms / ms
                rows.append(row)
                del model
            except Exception as e:
                rows.append({**base, "case": f"lincomp CLEAR r={r}", "error": f"{type(e).__name__}: {e}"[:300]})
                traceback.print_exc()
            torch.cuda.empty_cache()
        print(f"[models] {res}^2 done", flush=True)
    return rows


def _table(rows: list) -> str:
    cols = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    fmt = lambda x: f"{x:.4g}" if isinstance(x, float) else str(x)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows])


def check_and_time(out_dir: str, quick: bool = False) -> list:
    """Correctness first, then end-to-end timings (CUDA only). Returns the table rows."""
    from _gpu_family import run_family
    return run_family("models", "lincomp models (Flux-shaped stack)", check, time_all, out_dir, quick, _table)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    result = check_and_time(args[0] if args else os.environ.get("OUT", "out/gpu"), quick="--quick" in sys.argv)
    print(_table(result))
