"""Per-token decode latency at long contexts: the Lizard-linearised Llama vs stock transformers generate.

    python benchmarks/bench_decode.py [--contexts 1024,4096,16384,32768,65536] [--tokens 24] [--out FILE]

The model is ``bench_models.py``'s small random Llama (4 layers, hidden 512, 8 query / 2 key-value heads
of 64, fp32, B=1) and its Lizard linearisation (window 128 + 4 sinks + gated exp-Hedgehog, 32 features).
Every number is the time between consecutive tokens of one real ``model.generate()`` call (greedy, a
streamer records when each token arrives), median over ``--tokens`` new tokens; the first new token
(which includes the prompt's prefill) is left out. How each model reaches a context of n tokens:

- up to ``--real-prefill`` (4096) tokens, both models prefill the real n-token prompt in the timed
  ``generate()`` call itself (lincomp's chunked prefill: the forward kernel over the prompt, then each
  layer's decoder state filled from it; its kernels for that length are built in an untimed call first);
  the table's prefill column is that prompt's time to first token.
Longer contexts (a real 64K prefill takes minutes on 2 cores, for stock SDPA above all):

- lincomp: a real prefill of ``--prefill`` (256) tokens through ``student.generate(..., cache=LincompCache)``
  fills every layer's window ring (128 keys) and linear state with real values; then the cache is moved
  to position n (:func:`advance`: decoder position, ring positions and token count shifted by the same
  multiple of the ring size, so the ring's slots stay where the decoder looks for them), and
  ``student.generate(n + 1 ids, cache=cache)`` decodes from position n: the real step, at RoPE position n.
  The state of a linearised layer has the same size at every n (that is the point), so the step costs
  what it costs after n real tokens; a token-by-token real prefill of 64K tokens takes minutes here.
- stock: SDPA with its ``DynamicCache`` filled with n random keys / values per layer (normal, the model's
  shapes: [1, 2, n, 64] each), then ``stock.generate(n + 1 ids, cache=cache)``: every generated token is
  one real forward at positions n, n+1, ..., attending over the n + i cached keys. (A real dense prefill
  of 64K tokens takes minutes on 2 cores; the decode step's cost depends only on the cache size.)

Threads: both run with torch's default thread count. lincomp's ``generate()`` runs the one-token steps of a model
this small on one thread (``lincomp.models.generate.SERIAL_STEP_WORK``), so the table also times stock on one
thread (``torch.set_num_threads(1)`` for its whole ``generate()`` call) for comparison.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

import bench_models as bm  # noqa: E402  (the model and its linearisation)


class Clock:
    """A transformers streamer that records when each put() arrives (the prompt first, then each token)."""

    def __init__(self):
        self.t = []

    def put(self, value):
        self.t.append(time.perf_counter())

    def end(self):
        pass

    def prefill_ms(self) -> float:
        """ms from the prompt's put to the first new token: the prompt's forward (prefill) and one sample."""
        return (self.t[1] - self.t[0]) * 1e3

    def token_ms(self) -> list:
        """ms between consecutive generated tokens (the prompt's put and the first token left out)."""
        return [(b - a) * 1e3 for a, b in zip(self.t[1:], self.t[2:])]


def _model():
    stock = bm._small_llama()
    stock.config.max_position_embeddings = 1 << 17   # RoPE positions up to 128K (default rope: no table)
    student = bm._linearize(copy.deepcopy(stock), bm.LLAMA_LIZARD)
    return stock, student


def _generate(model, ids, tokens: int, **kw) -> tuple:
    clock = Clock()
    out = model.generate(ids, max_new_tokens=tokens + 1, min_new_tokens=tokens + 1, do_sample=False,
                         pad_token_id=0, eos_token_id=None, streamer=clock, **kw)
    return out, clock.token_ms(), clock.prefill_ms()


def one_thread(fn):
    """``fn()`` with torch on one thread (stock's column for the same choice lincomp makes for small steps)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(n)


def advance(cache, n: int) -> None:
    """Move a filled LincompCache to context length ``n`` (see the module docstring)."""
    for layer in cache.layers:
        dec = layer.decoder
        delta = n - layer.seen
        ring = getattr(dec, "_ring", None)
        if delta < 0 or dec.spec.prefix or (ring and delta % ring):
            raise ValueError(f"cannot move a cache at {layer.seen} tokens to {n} (ring {ring}, prefix {dec.spec.prefix})")
        layer.seen += delta
        dec.t += delta
        if ring:
            dec._pos[dec._pos >= 0] += delta


def lincomp_cache(student, prefill: int, n: int):
    from lincomp.models.cache import LincompCache
    cache = LincompCache(student)
    ids = torch.randint(1, 1024, (1, prefill), generator=torch.Generator().manual_seed(prefill))
    student.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0, eos_token_id=None, cache=cache)
    advance(cache, n)
    return cache


def stock_cache(model, n: int):
    from transformers import DynamicCache
    cfg = model.config
    cache = DynamicCache(config=cfg)
    g = torch.Generator().manual_seed(n)
    hd = cfg.hidden_size // cfg.num_attention_heads
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(1, cfg.num_key_value_heads, n, hd, generator=g)
        v = torch.randn(1, cfg.num_key_value_heads, n, hd, generator=g)
        cache.update(k, v, layer)
    return cache


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="1024,4096,16384,32768,65536")
    ap.add_argument("--tokens", type=int, default=24, help="timed new tokens per context")
    ap.add_argument("--prefill", type=int, default=256, help="real prompt tokens before the move to n")
    ap.add_argument("--real-prefill", type=int, default=4096,
                    help="contexts up to this many tokens prefill the real prompt (timed) instead of a moved cache")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "decode_cpu.md"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    contexts = [int(c) for c in args.contexts.split(",")]
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    stock, student = _model()
    rows = []
    with torch.no_grad():
        _generate(student, torch.randint(1, 1024, (1, 64)), 2)    # builds / loads the decode and forward kernels
        for n in contexts:
            ids = torch.randint(1, 1024, (1, n), generator=torch.Generator().manual_seed(n))
            if n <= args.real_prefill:   # the real prompt, prefilled inside the timed call
                _generate(student, ids, 0)   # untimed: builds lincomp's forward kernels for this prompt length
                _, lin_ms, lin_pre = _generate(student, ids, args.tokens)
                _, stock_ms, stock_pre = _generate(stock, ids, args.tokens)
                _, serial_ms, _ = one_thread(lambda: _generate(stock, ids, args.tokens))
            else:                        # a cache moved / filled to n (see the module docstring)
                ids1 = torch.cat([ids, ids[:, :1]], 1)
                _, lin_ms, _ = _generate(student, ids1, args.tokens, cache=lincomp_cache(student, args.prefill, n))
                cache = stock_cache(stock, n)
                _, stock_ms, _ = _generate(stock, ids1, args.tokens, cache=cache)
                cache = stock_cache(stock, n)
                _, serial_ms, _ = one_thread(lambda: _generate(stock, ids1, args.tokens, cache=cache))
                del cache
                lin_pre = stock_pre = None
            row = {"n": n, "lin": statistics.median(lin_ms), "lin_min": min(lin_ms), "stock": statistics.median(stock_ms),
                   "stock_min": min(stock_ms), "stock1": statistics.median(serial_ms), "lin_pre": lin_pre,
                   "stock_pre": stock_pre,
                   "load": os.getloadavg()[0]}
            rows.append(row)
            print(row, flush=True)
    write_table(rows, Path(args.out), args, load_before)
    return 0


def write_table(rows, path: Path, args, load_before: str) -> None:
    base = rows[0]["lin"]
    spread = max(abs(r["lin"] / base - 1) for r in rows)
    at32 = [r for r in rows if r["n"] == 32768]
    lines = ["# Decode: per-token latency vs context, Lizard-linearised Llama vs stock generate (SDPA + KV cache)", "",
             f"- CPU: **{bm.cpu_name()}**, torch {torch.__version__}, threads {torch.get_num_threads()}; model: "
             "Llama 4 layers x 512 (8 q / 2 kv heads of 64), random init, fp32, B=1, greedy",
             f"- command: `python benchmarks/bench_decode.py {' '.join(sys.argv[1:])}`",
             f"- load average before: {load_before}, after: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (2 "
             "cores shared with other jobs; the load column is the 1-minute average after each context)",
             "- per-token ms: median (min) over the gaps between consecutive tokens of one `model.generate()` "
             f"call, {args.tokens} tokens after the first",
             f"- contexts up to {args.real_prefill}: both models prefill the real n-token prompt inside the timed "
             "`generate()` (lincomp: chunked prefill, the forward kernel over the prompt filling each layer's "
             "decoder state; stock: SDPA filling its DynamicCache); prefill s = the prompt's time to first token",
             f"- longer contexts: a real {args.prefill}-token prefill fills the LincompCache (linear state + 128-key "
             "window ring), which is then moved to position n (bench_decode.advance); stock: a DynamicCache filled "
             "with n random keys/values per layer (a dense 64K prefill takes minutes here); then each model's "
             "`generate(n + 1 ids, cache=...)`: every timed token is the real forward at positions n, n+1, ...",
             "- threads: both models run with torch's default thread count; lincomp's generate runs a step below "
             "16M multiply-adds (parameters x new tokens: every one-token step here) on one thread "
             "(lincomp.models.generate.SERIAL_STEP_WORK), its prompts on all; the stock 1 thread column is stock's "
             "generate with torch.set_num_threads(1) throughout (prefill included), for comparison", "",
             "| context | lincomp prefill s | stock prefill s | lincomp ms/token | lincomp tokens/s | vs lincomp at 1K "
             "| stock ms/token | stock tokens/s | lincomp / stock tokens/s | stock 1 thread ms/token | load |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    sec = lambda ms: "-" if ms is None else f"{ms / 1e3:.2f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['n']} | {sec(r['lin_pre'])} | {sec(r['stock_pre'])} | {r['lin']:.2f} ({r['lin_min']:.2f}) | "
                     f"{1e3 / r['lin']:.1f} | {r['lin'] / base:.2f} | {r['stock']:.2f} ({r['stock_min']:.2f}) | "
                     f"{1e3 / r['stock']:.1f} | {r['stock'] / r['lin']:.2f}x | {r['stock1']:.2f} | {r['load']:.1f} |")
    lines += ["", f"- lincomp per-token latency within {spread * 100:.0f}% of its 1K value across the contexts "
                  f"(goal +-10%: {'met' if spread <= 0.10 else 'NOT met'})"]
    if at32:
        x = at32[0]["stock"] / at32[0]["lin"]
        lines.append(f"- at 32K: {x:.1f}x stock tokens/s (goal >= 10x: {'met' if x >= 10 else 'NOT met'}); "
                     f"{at32[0]['stock1'] / at32[0]['lin']:.1f}x stock on 1 thread")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
