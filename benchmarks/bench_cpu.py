"""CPU kernels side by side: lincomp's TVM kernels vs their peers, fp32, B=1, H=4, D=64, one process.

    python benchmarks/bench_cpu.py [--quick] [--reps 10] [--only swa,clear,gla,lizard] [--out FILE]

Cases (each row: median wall time over ``--reps`` runs after warm-up; peers built outside the timing):

- ``swa``:    causal sliding window of 256 keys at L = 4096 and 16384
              vs torch.compile(flex_attention) with the same block mask, and dense SDPA (is_causal).
- ``clear``:  CLEAR circle r=8 on a 64x64 grid with 64 prefix tokens
              vs compiled FlexAttention (row-major 128-token blocks, as the paper's code), dense SDPA.
- ``gla``:    gated linear attention, scalar and vector gates, L = 4096, vs a torch.compile'd chunked
              PyTorch implementation (chunk 64, written below).
- ``lizard``: the Lizard hybrid (hedgehog_exp E=64, scalar gate, window 128 + 4 sinks) at L = 4096,
              vs compiled FlexAttention (window, sinks via its LSE) + the compiled chunked GLA, summed.

The fp32 FLOP floor of a case is useful FLOPs / the matmul peak (a 2048^3 torch matmul timed interleaved
with the case's implementations). All implementations of a case are timed round-robin, one timed call each per
round (right after an untimed call of the same one, so each runs with warm caches), so load spikes on a
shared machine hit them alike. Writes a markdown table (default benchmarks/results/cpu_kernels.md) with the CPU model,
the load average before and after, and whether each goal is met.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# No OMP_WAIT_POLICY here: lincomp runs the TVM kernels' parallel loops on torch's OpenMP threads
# (lincomp.lower.tvmir.threads), so no idle pool spins on the cores the other needs (bench_default_process.py).


def _keep_freed_memory() -> bool:
    """Ask glibc to serve and keep large blocks on its heap instead of mmap / munmap each one.

    torch's CPU allocator frees every temporary back to malloc; by default glibc unmaps blocks above a
    (moving) threshold, and the next call page-faults all of them in again: the compiled peers, whose
    chunked forms make tens of MB of temporaries a call, then time bimodally (measured: 8.4 or 16 ms for
    the same GLA call). Keeping freed memory gives every implementation its best, steady time."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):  # not glibc
        return False


KEEP_FREED = _keep_freed_memory()

import torch  # noqa: E402
import torch.nn.functional as Fn  # noqa: E402

import lincomp  # noqa: E402
from lincomp import presets  # noqa: E402
from lincomp.ir import lower  # noqa: E402
from lincomp.reference import window_mask  # noqa: E402
from lincomp.spec import AttentionSpec  # noqa: E402
from lincomp.testing import random_inputs, rel_err  # noqa: E402

B, H, D = 1, 4, 64


# ------------------------------------------------------------------------------------------ timing
def cpu_model() -> str:
    try:
        from lincomp.tuning import device_name
        return device_name("cpu")
    except Exception:
        return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------------------- peers
def flex_peer(mask_mod, L: int, block: int = 128, kv_len=None, score_mod=None):
    """torch.compile(flex_attention) with a block mask built once; returns (fn(q, k, v), build seconds)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    t0 = time.perf_counter()
    bm = create_block_mask(mask_mod, B=None, H=None, Q_LEN=L, KV_LEN=kv_len or L, device="cpu",
                           BLOCK_SIZE=block)
    built = time.perf_counter() - t0
    flex = torch.compile(flex_attention, dynamic=False)

    def run(q, k, v):
        return flex(q, k, v, block_mask=bm, score_mod=score_mod)
    return run, built


def flex_sinks_peer(window: int, L: int, sink_logits):
    """Sliding window + sink logits in FlexAttention (CPU flex has no return_lse): the m sinks are extra
    keys after the sequence with zero values, always visible, whose scores score_mod replaces."""
    m = sink_logits.shape[-1]

    window_mod = lower(presets.sliding_window(window)).mask_mod()

    def mask_mod(b, h, q, kv):
        return (kv >= L) | window_mod(b, h, q, kv)

    def score_mod(score, b, h, q, kv):
        return torch.where(kv >= L, sink_logits[h, (kv - L).clamp(0, m - 1)], score)

    run, built = flex_peer(mask_mod, L, kv_len=L + m, score_mod=score_mod)

    def run_sinks(q, k, v):
        pad = q.new_zeros(q.shape[0], k.shape[1], m, q.shape[-1])
        return run(q, torch.cat([k, pad], 2), torch.cat([v, pad[..., :v.shape[-1]]], 2))
    return run_sinks, built


def gla_chunked_torch(fq, fk, v, g, chunk: int = 64, normalize: bool = False, scale: float = 1.0):
    """Chunked gated linear attention in plain PyTorch (the compiled peer).

    fq, fk: [B, H, L, F] features; v: [B, H, L, Dv]; g: [B, H, L] or [B, H, L, F] log-gates.
    Intra-chunk: (q e^G)(k e^-G)^T (the usual form); chunk states by a masked decay matrix (no loop).
    """
    Bq, Hq, L, F = fq.shape
    Dv = v.shape[-1]
    n = L // chunk
    if g.dim() == 3:
        g = g[..., None]
    Fg = g.shape[-1]
    q = fq.reshape(Bq, Hq, n, chunk, F)
    k = fk.reshape(Bq, Hq, n, chunk, F)
    vv = v.reshape(Bq, Hq, n, chunk, Dv)
    G = g.reshape(Bq, Hq, n, chunk, Fg).cumsum(3)                    # inside each chunk
    Gend = G[:, :, :, -1]                                            # [B, H, n, Fg]
    qg, kg = q * G.exp(), k * (-G).exp()
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=fq.device).tril()
    A = (qg @ kg.transpose(-1, -2)).masked_fill(~causal, 0)          # [B, H, n, C, C]
    o = A @ vv
    den = A.sum(-1)
    kend = k * (Gend[:, :, :, None] - G).exp()                       # keys decayed to their chunk end
    U = kend.transpose(-1, -2) @ vv                                   # [B, H, n, F, Dv] per-chunk states
    u = kend.sum(3)                                                   # [B, H, n, F]
    Gc = Gend.cumsum(2)                                               # decay across chunks
    # S_c (state after chunk c) = sum_{c' <= c} exp(Gc_c - Gc_c') U_c'; the state entering c is S_{c-1}.
    mask = torch.ones(n, n, dtype=torch.bool, device=fq.device).tril(-1)   # c' < c
    Gstart = Gc - Gend                   # cumulative gate before chunk c; decay c' -> c: Gstart_c - Gc_c'
    dec = (Gstart[:, :, :, None, :] - Gc[:, :, None, :, :]).masked_fill(~mask[..., None], float("-inf")).exp()
    Sin = torch.einsum("bhcdf,bhdfv->bhcfv", dec, U)                  # [B, H, n, F, Dv]
    zin = torch.einsum("bhcdf,bhdf->bhcf", dec, u)
    qd = q * G.exp()
    o = o + qd @ Sin
    if normalize:
        den = den + (qd * zin[:, :, :, None, :]).sum(-1)
        o = o / den[..., None]
    else:
        o = o * scale
    return o.reshape(Bq, Hq, L, Dv)


def hedgehog_exp(x, w):
    p = torch.einsum("bhld,hde->bhle", x, w)
    return torch.cat([p.exp(), (-p).exp()], -1)


# ------------------------------------------------------------------------------------------- cases
class Bench:
    """Runs the cases. All implementations of a case (and, for windowed cases, the matmul that sets the
    FLOP floor) are timed interleaved -- one call of each per round -- so a load spike on the shared
    machine hits them alike; each reports its median."""

    def __init__(self, reps: int, quick: bool):
        self.reps, self.quick = reps, quick
        self.rows = []
        self.peaks = []

    def ours(self, spec, inputs):
        kern = lincomp.compile(spec, target="tvm")
        with torch.no_grad():
            t0 = time.perf_counter()
            out = kern(**inputs)
            first = time.perf_counter() - t0
        return kern, out, first

    def interleaved(self, fns: dict, slow=(), grad: bool = False) -> dict:
        """{name: median ms}; ``slow`` names run in every other round only (e.g. dense SDPA at 16K);
        ``grad``: autograd stays on (training steps).

        Each timed call directly follows an untimed call of the same implementation (not for ``slow``
        ones): every implementation is timed with its inputs and workspace warm in the caches, as inside
        a model. Timing each right after a different implementation would favour whichever runs after the
        one with the smaller memory footprint (it finds the shared inputs still in L3, 32 MB here).
        """
        times = {name: [] for name in fns}
        with torch.set_grad_enabled(grad):
            for fn in fns.values():       # warm-up
                fn()
            for r in range(self.reps):
                for name, fn in fns.items():
                    if name in slow and r % 2:
                        continue
                    if name not in slow:
                        fn()
                    t0 = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t0) * 1e3)
        return {name: statistics.median(t) for name, t in times.items()}

    def add(self, case, impl, ms, flops=None, peak=None, note=""):
        row = {"case": case, "impl": impl, "ms": ms, "note": note}
        if flops is not None:
            row["gflops"] = flops / (ms * 1e-3) / 1e9
            row["x_floor"] = ms / (flops / (peak * 1e9) * 1e3)
        self.rows.append(row)
        print(f"  {case:28s} {impl:34s} {ms:9.2f} ms  {note}", flush=True)
        return ms

    def windowed(self, case, ours, x, flops, peers: dict, notes: dict, slow=(), goal_flex=2.0, goal_floor=3.0):
        """A softmax-window case: ours (``self.ours(...)``'s triple), the peers and the matmul peak, interleaved."""
        kern, out, first = ours
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        fns = {"lincomp tvm": lambda: kern(**x), **peers, "matmul": lambda: a @ b}
        t = self.interleaved(fns, slow=slow)
        peak = 2 * 2048 ** 3 / (t.pop("matmul") * 1e-3) / 1e9
        self.peaks.append(peak)
        notes = dict(notes, **{"lincomp tvm": f"config {kern.config['window_fwd']['params']}; first call {first:.1f}s"})
        for name, ms in t.items():
            self.add(case, name, ms, flops, peak, notes.get(name, ""))
        self.goal(case, t["lincomp tvm"], flops, peak, [("flex", t["torch.compile(flex_attention)"], goal_flex)],
                  goal_floor)
        return kern, out

    # -- causal sliding window ------------------------------------------------------------------
    def swa(self, L: int, window: int = 256):
        spec = AttentionSpec(window={"kind": "1d", "left": window - 1, "right": 0}, causal=True)
        x = random_inputs(spec, B=B, H=H, L=L, D=D, seed=1)
        q, k, v = x["q"], x["k"], x["v"]
        pairs = window * L - window * (window - 1) // 2
        ours = self.ours(spec, x)
        flex, built = flex_peer(lower(spec).mask_mod(), L)
        with torch.no_grad():
            o_flex = flex(q, k, v)
        peers = {"torch.compile(flex_attention)": lambda: flex(q, k, v),
                 "SDPA dense (is_causal)": lambda: Fn.scaled_dot_product_attention(q, k, v, is_causal=True)}
        notes = {"torch.compile(flex_attention)": f"block mask {built:.1f}s; rel diff vs ours {rel_err(ours[1], o_flex):.1e}"}
        self.windowed(f"swa{window} L={L}", ours, x, 4 * D * pairs * B * H, peers, notes,
                      slow={"SDPA dense (is_causal)"})

    # -- CLEAR --------------------------------------------------------------------------------------
    def clear(self, radius: int = 8, grid=(64, 64), prefix: int = 64):
        self.grid_window(presets.clear(radius, grid, text_tokens=prefix),
                         f"clear r={radius} {grid[0]}x{grid[1]}+{prefix}")

    def grid_window(self, spec, case: str, goal_flex: float = 2.0, goal_floor: float = 3.0):
        """A 2D / 3D window (CLEAR's circle, sliding tiles, ...) against FlexAttention on the IR's mask_mod."""
        L = spec.expected_length()
        x = random_inputs(spec, B=B, H=H, D=D, seed=2)
        q, k, v = x["q"], x["k"], x["v"]
        pairs = int(window_mask(spec, L).sum())
        ours = self.ours(spec, x)
        flex, built = flex_peer(lower(spec).mask_mod(), L)
        with torch.no_grad():
            o_flex = flex(q, k, v)
        peers = {"torch.compile(flex_attention)": lambda: flex(q, k, v),
                 "SDPA dense (all pairs)": lambda: Fn.scaled_dot_product_attention(q, k, v)}
        notes = {"torch.compile(flex_attention)": f"row-major 128-blocks; block mask {built:.1f}s; "
                                                  f"rel diff vs ours {rel_err(ours[1], o_flex):.1e}"}
        self.windowed(case, ours, x, 4 * D * pairs * B * H, peers, notes, slow={"SDPA dense (all pairs)"},
                      goal_flex=goal_flex, goal_floor=goal_floor)

    # -- gated linear attention ---------------------------------------------------------------------
    def gla(self, gate: str, L: int = 4096):
        spec = presets.gla(gate)
        x = random_inputs(spec, B=B, H=H, L=L, D=D, seed=3)
        q, k, v, g = x["q"], x["k"], x["v"], x["g"]
        case = f"gla {gate} gate L={L}"
        kern, out, first = self.ours(spec, x)
        peer = torch.compile(gla_chunked_torch, dynamic=False)
        scale = D ** -0.5
        with torch.no_grad():
            o_peer = peer(q, k, v, g, 64, False, scale)
        t = self.interleaved({"lincomp tvm": lambda: kern(**x),
                              "torch.compile(chunked GLA, C=64)": lambda: peer(q, k, v, g, 64, False, scale)})
        self.add(case, "lincomp tvm", t["lincomp tvm"],
                 note=f"config {kern.config['linear_fwd']['params']}; first call {first:.1f}s")
        self.add(case, "torch.compile(chunked GLA, C=64)", t["torch.compile(chunked GLA, C=64)"],
                 note=f"rel diff vs ours {rel_err(out, o_peer):.1e}")
        self.goal(case, t["lincomp tvm"], None, None,
                  [("compiled chunked torch", t["torch.compile(chunked GLA, C=64)"], 3.0)])

    # -- Lizard ---------------------------------------------------------------------------------------
    def lizard(self, L: int = 4096, window: int = 128, sinks: int = 4, E: int = 64):
        spec = presets.lizard(window=window, sinks=sinks, feature_dim=E)
        x = random_inputs(spec, B=B, H=H, L=L, D=D, seed=4)
        case = f"lizard w={window} m={sinks} L={L}"
        kern, out, first = self.ours(spec, x)
        q, k, v, g = x["q"], x["k"], x["v"], x["g"]
        wq, wk, sl, alpha = x["feature_weight_q"], x["feature_weight_k"], x["sink_logits"], x["alpha"]
        flex, built = flex_sinks_peer(window, L, sl)
        gla = torch.compile(gla_chunked_torch, dynamic=False)
        feats = torch.compile(hedgehog_exp, dynamic=False)

        def window_branch():
            return flex(q, k, v)

        def linear_branch():
            return gla(feats(q, wq), feats(k, wk), v, g, 64, True, 1.0)

        with torch.no_grad():
            peer_out = linear_branch() + alpha[None, :, None, None] * window_branch()
        t = self.interleaved({"lincomp tvm": lambda: kern(**x), "flex window+sinks (peer part)": window_branch,
                              "compiled chunked GLA (peer part)": linear_branch})
        self.add(case, "lincomp tvm", t["lincomp tvm"], note=f"config {kern.config}; first call {first:.1f}s")
        t_w = self.add(case, "flex window+sinks (peer part)", t["flex window+sinks (peer part)"],
                       note=f"sinks as {sinks} zero-value keys with score_mod; block mask {built:.1f}s")
        t_l = self.add(case, "compiled chunked GLA (peer part)", t["compiled chunked GLA (peer part)"],
                       note=f"rel diff of the peer sum vs ours {rel_err(out, peer_out):.1e}")
        self.add(case, "peers summed", t_w + t_l)
        self.goal(case, t["lincomp tvm"], None, None, [("flex + chunked GLA", t_w + t_l, 1.0)])

    # -- goals ----------------------------------------------------------------------------------------
    def goal(self, case, t_ours, flops, peak, peers, goal_floor=3.0):
        notes = []
        for name, t_peer, want in peers:
            speed = t_peer / t_ours
            ok = speed >= want
            notes.append(f"{speed:.2f}x vs {name} (goal >= {want:g}x: {'met' if ok else 'NOT met'})")
        if flops is not None:
            floor = flops / (peak * 1e9) * 1e3
            x = t_ours / floor
            notes.append(f"{x:.2f}x the fp32 floor {floor:.2f} ms at {peak:.0f} GFLOP/s "
                         f"(goal <= {goal_floor:g}x: {'met' if x <= goal_floor else 'NOT met'})")
        self.rows.append({"case": case, "impl": "**goal**", "ms": None, "note": "; ".join(notes)})
        print(f"  {case:28s} goal: {'; '.join(notes)}", flush=True)


def save_markdown(path, lines: list) -> None:
    """Write a result table (``lines`` joined, trailing newline), creating its folder; say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def write_table(bench: Bench, path: Path, meta: dict, title: str = "CPU kernels: lincomp TVM vs peers") -> None:
    lines = [f"# {title}", "",
             f"- CPU: **{meta['cpu']}** (LLVM mcpu `{meta['mcpu']}`), torch {torch.__version__}, "
             f"threads {torch.get_num_threads()}",
             (f"- fp32 matmul peak (2048^3 torch matmul, timed interleaved with each windowed case): "
              f"**{min(bench.peaks):.0f}-{max(bench.peaks):.0f} GFLOP/s**; each case's floor uses its own"
              if bench.peaks else "- no windowed case ran (no FLOP floor)"),
             f"- load average before / after: {meta['load_before']} / {meta['load_after']} "
             "(the machine is shared; medians of the timed runs)",
             f"- B={B}, H={H}, D={D}, fp32; medians of {bench.reps} rounds after warm-up, implementations "
             "interleaved within each round, each timed call right after an untimed one of the same implementation "
             "(warm caches; dense SDPA every other round, without the untimed call); block masks and compiles happen "
             "outside the timing",
             f"- lincomp configs come from the tuning database (`benchmarks/tune_cpu.py`) when it has this CPU, "
             f"else the defaults; kernels' parallel loops on {meta['tvm_threads']}; "
             f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}",
             "- fp32 only (bf16: `benchmarks/bench_bf16_cpu.py`)", "",
             "| case | implementation | median ms | useful GFLOP/s | x fp32 floor | notes |",
             "| --- | --- | ---: | ---: | ---: | --- |"]
    for r in bench.rows:
        ms = "" if r["ms"] is None else f"{r['ms']:.2f}"
        gf = f"{r['gflops']:.0f}" if "gflops" in r else ""
        xf = f"{r['x_floor']:.2f}" if "x_floor" in r else ""
        lines.append(f"| {r['case']} | {r['impl']} | {ms} | {gf} | {xf} | {r['note']} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="L=4096 only, fewer reps")
    ap.add_argument("--only", default="swa,clear,gla,lizard")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_kernels.md"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    torch.manual_seed(0)
    from lincomp.lower.tvmir.build import host_cpu, usable_cores
    torch.set_num_threads(usable_cores())
    reps = 3 if args.quick else args.reps
    bench = Bench(reps, args.quick)
    meta = {"cpu": cpu_model(), "mcpu": host_cpu(), "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    print(f"CPU {meta['cpu']}; load {meta['load_before']}")
    only = set(args.only.split(","))
    if "swa" in only:
        for L in ((4096,) if args.quick else (4096, 16384)):
            bench.swa(L)
    if "clear" in only:
        bench.clear()
    if "gla" in only:
        bench.gla("scalar")
        bench.gla("vector")
    if "lizard" in only:
        bench.lizard()
    meta["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    from lincomp.lower.tvmir import threads
    meta["tvm_threads"] = threads.status()
    write_table(bench, Path(args.out), meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
