"""GPU check of packed rows (``cu_seqlens``): lincomp's Triton kernels vs FlexAttention and fla's varlen GLA.

``check_and_time(out_dir, quick=False) -> list[dict]`` (called by ``benchmarks/gpu_check.py``):
1. correctness: a packed row of documents (lengths 1, a chunk border, several) through the op, forward and
   gradients of every input against the fp32 reference with ``cu_seqlens``, for a sliding window with
   sinks, vector-gated GLA and the Lizard hybrid (Triton on CUDA, the Triton interpreter on a CPU);
2. timing (CUDA only), bf16, H = 16, D = 128, one packed row of documents 512-4096 tokens long (32K tokens):
   - causal sliding window 1024: lincomp packed vs FlexAttention with a document mask (the same window
     inside each document), vs lincomp on the documents one by one and on a padded batch;
   - vector-gated GLA: lincomp packed vs fla's ``chunk_gla(..., cu_seqlens=...)`` when fla is installed.
Writes ``varlen.md`` / ``varlen.json``. Every case is guarded: an error becomes a row.

Run alone: ``PYTHONPATH=. python3 benchmarks/gpu_varlen.py out/ [--quick]``.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_linear import _table  # noqa: E402  (one markdown table for the GPU families)
from lincomp import presets  # noqa: E402

CHECK_SPECS = {
    "swa-sinks": lambda: presets.sliding_window(6, sinks=2),
    "gla-vector": lambda: presets.gla("vector", chunk_size=16),
    "lizard": lambda: presets.lizard(window=6, sinks=2, feature_dim=8, chunk_size=16),
}
CHECK_LENGTHS = [1, 16, 5, 16, 9]          # a length-1 document, two that end on a chunk border
DOC_LENGTHS = [512, 4096, 1024, 2048, 3072, 768, 4096, 1536, 2560, 3584, 1280, 2304, 3840, 1792, 640]
QUICK_DOCS = DOC_LENGTHS[:5]
H_FULL, D_HEAD, WINDOW = 16, 128, 1024


def _op(spec, x: dict, cu, target: str):
    from lincomp.backends import ops
    w = {n: x.get(n) for n in ops.WEIGHT_NAMES}
    return torch.ops.lincomp.attention(x["q"], x["k"], x["v"], ops.spec_to_json(spec), None, w["g"],
                                       w["feature_weight_q"], w["feature_weight_k"], w["sink_logits"],
                                       w["window_gamma"], w["alpha"], None, target, "error", "", cu)


def _check_one(name: str, spec, dev) -> dict:
    from lincomp.reference import reference
    from lincomp.testing import packed_inputs, rel_err
    x = packed_inputs(spec, CHECK_LENGTHS, H=2, Hkv=1, D=16, seed=1, feature_dim=8)
    cu = x.pop("cu_seqlens")
    leaves = {n: t.to(dev).requires_grad_() for n, t in x.items()}
    o = _op(spec, leaves, cu.to(dev), "triton")
    probe = torch.randn(o.shape, generator=torch.Generator().manual_seed(0)).to(dev)
    grads = torch.autograd.grad((o * probe).sum(), list(leaves.values()))
    ref = {n: t.detach().cpu().double().requires_grad_() for n, t in leaves.items()}
    r = reference(spec, **ref, cu_seqlens=cu)
    want = torch.autograd.grad((r * probe.cpu().double()).sum(), list(ref.values()))
    errs = {"o": rel_err(o.cpu(), r)}
    errs.update({f"d{n}": rel_err(a.cpu(), b) for n, a, b in zip(leaves, grads, want)})
    worst = max(errs.values())
    return {"section": "check", "case": name, "documents": len(CHECK_LENGTHS), "worst_rel_err": worst,
            "ok": bool(worst < 1e-4), "errors": ", ".join(f"{k} {v:.1e}" for k, v in errs.items())}


def check(dev, quick: bool) -> list:
    rows = []
    for name, make in CHECK_SPECS.items():
        try:
            rows.append(_check_one(name, make(), dev))
        except Exception as e:
            rows.append({"section": "check", "case": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:300]})
            traceback.print_exc()
    return rows


def _bench(fn, quick: bool) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median"))


def _timed(rows, case, fn, quick, **extra) -> float:
    try:
        ms = _bench(fn, quick)
        rows.append({"section": "timing", "case": case, "ms": ms, **extra})
    except Exception as e:
        ms = float("nan")
        rows.append({"section": "timing", "case": case, "ms": ms, "error": f"{type(e).__name__}: {e}"[:300]})
        traceback.print_exc()
    return ms


def _flex_documents(spec, cu, dev):
    """(compiled flex_attention, block mask): the spec's window inside each document of the packed row."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    from lincomp.ir import lower
    L = int(cu[-1])
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1, device=dev), (cu[1:] - cu[:-1]).to(dev))
    start = cu[:-1].to(dev)[doc]
    inner = lower(spec).mask_mod()

    def mask_mod(b, h, qi, ki):
        return (doc[qi] == doc[ki]) & inner(b, h, qi - start[qi], ki - start[ki])
    return torch.compile(flex_attention, dynamic=False), create_block_mask(mask_mod, None, None, L, L, device=dev)


def time_all(dev, quick: bool) -> list:
    from lincomp.documents import cu_seqlens_of
    from lincomp.testing import packed_inputs
    rows = []
    lengths = QUICK_DOCS if quick else DOC_LENGTHS
    cu = cu_seqlens_of(lengths).to(dev)
    L = sum(lengths)
    bf = torch.bfloat16

    spec = presets.sliding_window(WINDOW)
    x = {n: t.to(dev, bf) for n, t in packed_inputs(spec, lengths, H=H_FULL, D=D_HEAD, seed=0).items()
         if n != "cu_seqlens"}
    ours = _timed(rows, f"swa{WINDOW} packed (lincomp)", lambda: _op(spec, x, cu, "triton"), quick, L=L)
    try:
        flex, bm = _flex_documents(spec, cu.cpu(), dev)
        peer = _timed(rows, f"swa{WINDOW} FlexAttention + document mask", lambda: flex(x["q"], x["k"], x["v"],
                                                                                  block_mask=bm), quick, L=L)
        rows.append({"section": "speedup", "case": f"swa{WINDOW} vs Flex", "speedup": peer / ours})
    except Exception as e:
        rows.append({"section": "timing", "case": "flex", "error": f"{type(e).__name__}: {e}"[:300]})
    docs = [(int(a), int(b)) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]

    def one_by_one():
        for a, b in docs:
            _op(spec, {n: t[:, :, a:b] for n, t in x.items()}, None, "triton")
    _timed(rows, f"swa{WINDOW} one by one (lincomp)", one_by_one, quick, L=L)
    Lmax = max(lengths)
    pad = {n: torch.zeros(len(docs), H_FULL, Lmax, D_HEAD, device=dev, dtype=bf) for n in ("q", "k", "v")}
    for i, (a, b) in enumerate(docs):
        for n in pad:
            pad[n][i, :, :b - a] = x[n][0, :, a:b]
    _timed(rows, f"swa{WINDOW} padded batch (lincomp)", lambda: _op(spec, pad, None, "triton"), quick,
           L=Lmax * len(docs))

    gla = presets.gla("vector")
    y = {n: t.to(dev, bf) for n, t in packed_inputs(gla, lengths, H=H_FULL, D=D_HEAD, seed=1).items()
         if n != "cu_seqlens"}
    ours = _timed(rows, "gla-vector packed (lincomp)", lambda: _op(gla, y, cu, "triton"), quick, L=L)
    try:
        from fla.ops.gla import chunk_gla
        t = lambda a: a.transpose(1, 2).contiguous()  # noqa: E731  fla wants [B, T, H, D]
        args = dict(q=t(y["q"]), k=t(y["k"]), v=t(y["v"]), g=t(y["g"]), cu_seqlens=cu.long())
        peer = _timed(rows, "gla-vector fla chunk_gla(cu_seqlens)", lambda: chunk_gla(**args), quick, L=L)
        rows.append({"section": "speedup", "case": "gla-vector vs fla", "speedup": peer / ours})
    except Exception as e:
        rows.append({"section": "timing", "case": "fla chunk_gla", "error": f"{type(e).__name__}: {e}"[:300]})
    return rows


def check_and_time(out_dir: str, quick: bool = False) -> list:
    """Correctness first (small packed rows), then timings (CUDA only). Returns the table rows."""
    from _gpu_family import run_family
    return run_family("varlen", "lincomp packed rows (cu_seqlens)", check, time_all, out_dir, quick, _table)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    result = check_and_time(args[0] if args else os.environ.get("OUT", "out/gpu"), quick="--quick" in sys.argv)
    print(_table(result))
