"""``lincomp demo`` / ``make demo``: the main job end to end, with a report.

spec -> tune -> compile -> linearise all-MiniLM-L6-v2 -> distil briefly -> measure:

1. **spec**: a non-causal window + Hedgehog hybrid for the encoder (``distill_cli.minilm_spec``);
2. **tune**: ``lincomp.tune`` on this device (TVM on a CPU, Triton on a GPU); a second run costs nothing;
3. **compile**: ``lincomp.compile(spec, "auto")``, checked against the reference oracle;
4. **linearize** + **distill**: the real all-MiniLM-L6-v2, a short layer-local attention transfer on
   stdlib docstrings, embedding fidelity to the teacher on held-out text longer than the window;
5. **speed**: the compiled kernel against dense SDPA and FlexAttention (the window part only, with a
   block mask) across lengths; **flops**: attention FLOPs saved against dense attention;
6. **trade-off**: fidelity AND the whole model's speed at the same lengths (256, 512 tokens) for the
   student, the window alone and the teacher, with attention FLOPs (``out/demo/tradeoff.png``);
7. **report**: ``out/demo/report.md`` and ``out/demo/report.png``.

A section whose backend is missing is skipped with the reason printed (and written to the report); the
others still run. On a GPU the same command runs the Triton kernels and the model on CUDA.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence

from lincomp._atomic import atomic_write_bytes, atomic_write_text


class _Demo:
    """Runs the sections in order, shares their results, records what was skipped and why."""

    def __init__(self, args: argparse.Namespace):
        import torch

        self.args = args
        self.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.gpu = self.device.startswith("cuda")
        self.out = Path(args.out)
        self.results: dict = {"sections": {}, "skipped": {}}
        self.spec = None
        self.kernel = None
        self.teacher = self.student = self.tokenizer = None

    # -- plumbing ----------------------------------------------------------------------------------
    def section(self, name: str, title: str, fn: Callable[[], Optional[dict]]) -> None:
        print(f"\n== {title} " + "=" * max(0, 72 - len(title)), flush=True)
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # fallback / dropout notes are summarised in the report
                out = fn() or {}
        except _Skip as why:
            self._skip(name, str(why))
            return
        except Exception as e:  # a broken backend must not take the other sections down
            self._skip(name, f"{type(e).__name__}: {e}".splitlines()[0][:300])
            if self.args.verbose:
                traceback.print_exc()
            return
        out["wall_s"] = time.perf_counter() - t0
        self.results["sections"][name] = out
        print(f"({name}: {out['wall_s']:.1f} s)", flush=True)

    def _skip(self, name: str, why: str) -> None:
        self.results["skipped"][name] = why
        print(f"SKIPPED {name}: {why}", flush=True)

    # -- sections ----------------------------------------------------------------------------------
    def do_spec(self) -> dict:
        from lincomp.models.distill_cli import minilm_spec

        a = self.args
        self.spec = minilm_spec(a.window, a.feature_dim, a.combine)
        print(f"{self.spec.summary()}\n{self.spec.to_json()}")
        print(f"window: {a.window} tokens each side + [CLS] global; Hedgehog linear attention (E = {a.feature_dim}) "
              f"over every other token; combine = {a.combine!r}")
        return {"spec": self.spec.to_dict(), "summary": self.spec.summary()}

    def _compiled(self):
        """The kernel ``lincomp.compile(spec, "auto")`` picks for this device; _Skip when only the reference is left."""
        import torch

        import lincomp
        from lincomp.runtime.kernel import ReferenceKernel

        if self.kernel is None:
            self.kernel = lincomp.compile(self.spec, "auto")
        chosen = getattr(self.kernel, "kernel_for", lambda d: self.kernel)(torch.device(self.device))
        if isinstance(chosen, ReferenceKernel):
            raise _Skip(f"no compiled backend for {self.device} here ({'Triton' if self.gpu else 'TVM'} is not "
                        "installed or failed to load); only the plain-PyTorch reference is available")
        return chosen

    def do_tune(self) -> dict:
        import lincomp
        from lincomp.autotune import format_rows

        self._compiled()
        rows = lincomp.tune(self.spec, "auto", lengths=self.args.lengths, heads=12, head_dim=32,
                            dtype="bfloat16" if self.gpu else "float32", device=self.device,
                            progress=not self.args.no_progress)
        print(format_rows(rows))
        return {"rows": rows}

    def do_compile(self) -> dict:
        import torch

        import lincomp
        from lincomp.testing import random_inputs, rel_err

        chosen = self._compiled()
        inputs = random_inputs(self.spec, B=1, H=12, L=min(self.args.lengths), D=32,
                               feature_dim=self.args.feature_dim, device=self.device, seed=1)
        out = self.kernel(**inputs)
        ref = lincomp.reference(self.spec, **{k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point()
                                                  else v) for k, v in inputs.items()})
        err = rel_err(out, ref)
        print(f"target: {chosen.target}; relative error vs the fp64 reference at L={min(self.args.lengths)}: {err:.2e}")
        if not err <= 1e-4 * (50 if self.gpu else 1):
            raise RuntimeError(f"the compiled kernel disagrees with the reference (rel err {err:.2e})")
        return {"target": chosen.target, "rel_err": err}

    def do_linearize(self) -> dict:
        from lincomp.models.distill_cli import linearize_student, load_minilm

        self.tokenizer, self.teacher = load_minilm(self.device)
        self.student = linearize_student(copy.deepcopy(self.teacher), self.spec)
        from lincomp.models import learned_parameters

        n = sum(p.numel() for p in learned_parameters(self.student))
        lin = next(m.lincomp for m in self.student.modules() if hasattr(m, "lincomp"))
        print(f"all-MiniLM-L6-v2: 6 layers x 12 heads linearised; {n} learned parameters added; "
              f"attention runs through lincomp (target {lin.target!r})")
        return {"learned_parameters": n, "target": lin.target}

    def do_distill(self) -> dict:
        from lincomp.models.distill import distill, embedding_fidelity
        from lincomp.models.distill_cli import minilm_blocks, shuffled_batches

        if self.student is None:
            raise _Skip("the model was not linearised (see the linearize section)")
        a = self.args
        heldout = minilm_blocks(self.tokenizer, "heldout", a.eval_length, a.eval_blocks)
        before = embedding_fidelity(self.student, self.teacher, heldout)
        print(f"held-out: {heldout.shape[0]} docstring texts of {a.eval_length} tokens (the window sees "
              f"{2 * a.window + 1} + [CLS])")
        print(f"cosine similarity to the teacher before distillation: {before['mean']:.4f}")
        hist, fallbacks = [], 0
        target = next(m.lincomp for m in self.student.modules() if hasattr(m, "lincomp")).target
        if a.steps:
            from lincomp.runtime.kernel import LincompFallbackWarning

            train = minilm_blocks(self.tokenizer, "train", a.train_length, a.steps * a.batch_size)
            with warnings.catch_warnings(record=True) as caught:   # a call the kernels do not cover warns
                warnings.simplefilter("always", LincompFallbackWarning)
                t0 = time.perf_counter()
                res = distill(self.student, self.teacher, shuffled_batches(train, a.batch_size, 0),
                              attention_steps=a.steps, lr=a.lr, seed=0, progress=not a.no_progress)
                step_s = (time.perf_counter() - t0) / a.steps
            fallbacks = sum(issubclass(w.category, LincompFallbackWarning) for w in caught)
            hist = res.history.get("attention", [])
            print(f"trained through target {target!r} ({'forward and backward kernels' if target != 'reference' else 'autograd through the reference'}"
                  f"; {fallbacks} calls fell back to the reference); {step_s:.2f} s per step")
        after = embedding_fidelity(self.student, self.teacher, heldout)
        print(f"cosine similarity to the teacher after {a.steps} steps: {after['mean']:.4f} (min {after['min']:.4f})")
        out = {"before": before, "after": after, "steps": a.steps, "loss": [h["loss"] for h in hist],
               "train_length": a.train_length, "eval_length": a.eval_length, "target": target,
               "fallbacks": fallbacks}
        full = self._full_student(heldout)
        if full is not None:
            out["full"] = full
        elif after["mean"] < 0.99:
            print("(a brief run: `lincomp distill minilm` trains both stages; its student is evaluated here when "
                  f"found at {a.student or 'the --student path'})")
        return out

    def _full_student(self, heldout) -> Optional[dict]:
        """Fidelity of a student saved by ``lincomp distill minilm`` for the same spec, if there is one."""
        from lincomp.models.distill import embedding_fidelity, load_student
        from lincomp.models.distill_cli import training_target

        if not self.args.student or not Path(self.args.student).is_file():
            return None
        path = Path(self.args.student)
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("spec") != self.spec.canonical_json():
                print(f"({path} holds a student for another spec; not evaluated)")
                return None
        student = load_student(copy.deepcopy(self.teacher), path, target=training_target(self.teacher))
        fid = embedding_fidelity(student, self.teacher, heldout)
        print(f"cosine similarity of the full `lincomp distill minilm` student ({path}): {fid['mean']:.4f} "
              f"(min {fid['min']:.4f})")
        return {**fid, "path": str(path)}

    def do_speed(self) -> dict:
        import torch

        from lincomp.testing import random_inputs
        from lincomp.tuning.search import median_time_ms

        kernel = self._compiled()
        dtype = torch.bfloat16 if self.gpu else torch.float32
        flex, flex_why = _flex(self.spec, self.device)
        if flex is None:
            print(f"FlexAttention column skipped: {flex_why}")
        rows = []
        for L in self.args.lengths:
            inp = random_inputs(self.spec, B=1, H=12, L=L, D=32, feature_dim=self.args.feature_dim,
                                dtype=dtype, device=self.device, seed=2)
            q, k, v = inp["q"], inp["k"], inp["v"]
            reps = 5 if L >= 4096 and not self.gpu else 15
            with torch.no_grad():
                row = {"L": L,
                       "sdpa_ms": median_time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v),
                                                 warmup=5, reps=reps, device=self.device),
                       "lincomp_ms": median_time_ms(lambda: kernel(**inp), warmup=5, reps=reps, device=self.device)}
                if flex is not None:
                    try:
                        fn = flex(L, q, k, v)
                        row["flex_ms"] = median_time_ms(fn, warmup=1, reps=reps, device=self.device)
                    except Exception as e:  # one length failing to compile must not lose the others
                        row["flex_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            rows.append(row)
            print(f"L={L:6d}  lincomp {row['lincomp_ms']:9.3f} ms   SDPA (dense) {row['sdpa_ms']:9.3f} ms   "
                  f"Flex (window only) {_ms(row.get('flex_ms'))}   speed-up vs SDPA "
                  f"{row['sdpa_ms'] / row['lincomp_ms']:.2f}x", flush=True)
        return {"rows": rows, "dtype": str(dtype).replace("torch.", ""), "target": kernel.target,
                "flex_note": flex_why}

    def do_flops(self) -> dict:
        from lincomp.ir.cost import estimate

        rows = []
        for L in sorted(set(self.args.lengths) | {self.args.eval_length}):
            e = estimate(self.spec, L, B=1, H=12, D=32, E=self.args.feature_dim)
            rows.append({"L": L, "flops": e.flops, "dense_flops": e.dense_flops, "saved": e.flops_saved})
            print(f"L={L:6d}  lincomp {e.flops / 1e6:10.1f} MFLOP   dense {e.dense_flops / 1e6:10.1f} MFLOP   "
                  f"saved {100 * e.flops_saved:5.1f}%")
        return {"rows": rows}

    def do_tradeoff(self) -> dict:
        """Fidelity and model speed at the SAME lengths: the student, the window alone and the teacher."""

        from lincomp.models.distill import embedding_fidelity
        from lincomp.models.distill_cli import linearize_student, minilm_blocks
        from lincomp.models.tradeoff import measure_speed, plot_tradeoff, point, window_only_spec

        if self.student is None:
            raise _Skip("the model was not linearised (see the linearize section)")
        a, d = self.args, self.results["sections"].get("distill", {})
        window_spec = window_only_spec(self.spec)
        window = linearize_student(copy.deepcopy(self.teacher), window_spec, target="auto")
        mine_label = f"student ({d.get('steps', 0)} steps)"
        points, tokens = [], {}
        for L in a.tradeoff_lengths:
            heldout = minilm_blocks(self.tokenizer, "heldout", L, a.eval_blocks)
            mine = d["after"] if L == d.get("eval_length") else embedding_fidelity(self.student, self.teacher, heldout)
            alone = embedding_fidelity(window, self.teacher, heldout)
            points += [point("teacher", "teacher", L, 1.0),
                       point("window alone", "window", L, alone["mean"], spec=window_spec, fidelity_min=alone["min"]),
                       point(mine_label, "student", L, mine["mean"], spec=self.spec, fidelity_min=mine["min"])]
            tokens[L] = heldout[:a.tradeoff_batch].to(self.device)
        del window
        measure_speed(points, self.teacher, {"window alone": window_spec, mine_label: self.spec}, tokens,
                      reps=3 if a.quick else 5)
        png = plot_tradeoff(points, self.out / "tradeoff.png", title=f"{self.spec.summary()}: fidelity vs speed")
        return {"points": points, "batch": a.tradeoff_batch, "png": png.name if png else None}

    # -- report ------------------------------------------------------------------------------------
    def report(self) -> None:
        from lincomp.models.distill_cli import machine_info

        self.results["machine"] = machine_info()
        self.results["device"] = self.device
        self.out.mkdir(parents=True, exist_ok=True)
        md = _markdown(self.results, self.args)
        png = _plot(self.results, self.out / "report.png")
        if png:
            md += f"\n![report]({png.name})\n"
        atomic_write_text(self.out / "report.md", md)
        atomic_write_text(self.out / "results.json", json.dumps(self.results, indent=2, default=str) + "\n")
        print("\n" + _summary(self.results))
        print(f"\nreport: {self.out / 'report.md'}" + (f" and {png}" if png else " (no plot: matplotlib missing)"))


class _Skip(Exception):
    """A section cannot run here; the message says why."""


def _ms(x) -> str:
    return f"{x:9.3f} ms" if x is not None else "        -   "


def _flex(spec, device: str):
    """``(make(L, q, k, v) -> fn, None)`` running the spec's window (+ prefix) with FlexAttention, or
    ``(None, why)``. FlexAttention has no linear branch: its time is the window part alone."""
    try:
        import torch
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as e:
        return None, f"FlexAttention is not in this torch ({e})"
    from lincomp.ir import lower
    if spec.window is None:
        return None, "the spec has no window for FlexAttention to compute"
    compiled = torch.compile(flex_attention, dynamic=False)
    mask_mod = lower(spec).mask_mod()   # the IR's rule, the one every lincomp kernel prints

    def make(L, q, k, v):
        bm = create_block_mask(mask_mod, 1, 1, L, L, device=device)
        return lambda: compiled(q, k, v, block_mask=bm)

    return make, "FlexAttention computes the window (+ prefix) part only: it has no linear branch"


def _summary(r: dict) -> str:
    """The closing terminal table."""
    s = r["sections"]
    rows = [("result", "value")]
    if "compile" in s:
        rows.append(("kernel vs reference (rel err)", f"{s['compile']['rel_err']:.1e} ({s['compile']['target']})"))
    if "distill" in s:
        d = s["distill"]
        rows.append((f"embedding cosine, {d['eval_length']} tokens",
                     f"{d['before']['mean']:.4f} -> {d['after']['mean']:.4f} ({d['steps']} steps)"))
        rows.append(("distillation trained through", f"{d.get('target')} ({d.get('fallbacks', 0)} fallbacks)"))
        if "full" in d:
            rows.append(("embedding cosine, full distill run", f"{d['full']['mean']:.4f}"))
    if "speed" in s:
        for row in s["speed"]["rows"]:
            flex = f" (vs Flex window-only {row['flex_ms'] / row['lincomp_ms']:.2f}x)" if "flex_ms" in row else ""
            rows.append((f"speed-up vs SDPA, L={row['L']}", f"{row['sdpa_ms'] / row['lincomp_ms']:.2f}x{flex}"))
    if "flops" in s:
        for row in s["flops"]["rows"]:
            rows.append((f"attention FLOPs saved, L={row['L']}", f"{100 * row['saved']:.1f}%"))
    for p in s.get("tradeoff", {}).get("points", []):
        if p["kind"] != "teacher":
            rows.append((f"trade-off L={p['L']}: {p['label']}", f"cosine {p['fidelity']:.4f}, "
                         f"{p['teacher_ms'] / p['model_ms']:.2f}x SDPA model speed, "
                         f"{100 * p['flops_fraction']:.0f}% of dense attention FLOPs"))
    for name, why in r["skipped"].items():
        rows.append((f"SKIPPED {name}", why[:100]))
    widths = [max(len(x[i]) for x in rows) for i in range(2)]
    fmt = lambda x: f"{x[0].ljust(widths[0])}  {x[1]}"  # noqa: E731
    return "\n".join([fmt(rows[0]), fmt(("-" * widths[0], "-" * widths[1])), *map(fmt, rows[1:])])


def _markdown(r: dict, args: argparse.Namespace) -> str:
    s, m = r["sections"], r["machine"]
    lines = ["# lincomp demo report", "",
             f"- machine: {m['cpu']}{', ' + m['gpu'] if m.get('gpu') else ''}; torch {m['torch']} "
             f"({m['torch_threads']} threads); device {r['device']}",
             f"- spec: `{s['spec']['summary']}`" if "spec" in s else "- spec: -",
             f"- wall time of the sections: {sum(x.get('wall_s', 0) for x in s.values()):.0f} s", ""]
    if r["skipped"]:
        lines += ["## Skipped", ""] + [f"- **{k}**: {v}" for k, v in r["skipped"].items()] + [""]
    if "tune" in s:
        lines += ["## Tuning", "", "| target | kernel | L | time ms | configs tried | cached |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for row in s["tune"]["rows"]:
            lines.append(f"| {row['target']} | {row['kernel']} | {row['L']} | {row['time_ms']:.3f} | "
                         f"{row['candidates']} | {'yes' if row['cached'] else 'no'} |")
        lines.append("")
    if "compile" in s:
        c = s["compile"]
        lines += ["## Compile", "",
                  f"Target `{c['target']}`; relative error against the fp64 reference: {c['rel_err']:.2e}.", ""]
    if "distill" in s:
        d = s["distill"]
        lines += ["## Fidelity (all-MiniLM-L6-v2)", "",
                  f"Mean cosine similarity of mean-pooled sentence embeddings to the teacher on held-out stdlib "
                  f"docstrings of {d['eval_length']} tokens ({d['after']['n']} texts); the window sees "
                  f"{2 * args.window + 1} tokens + [CLS]. Layer-local attention transfer, {d['steps']} steps of "
                  f"{args.batch_size} x {d['train_length']} tokens, trained through target `{d.get('target')}` "
                  f"({d.get('fallbacks', 0)} calls fell back to the reference).", "",
                  "| | mean | min | 5th percentile |", "| --- | --- | --- | --- |"]
        rows = [("before distillation", d["before"]), (f"after {d['steps']} steps here", d["after"])]
        if "full" in d:
            rows.append((f"full `lincomp distill minilm` run (`{d['full']['path']}`)", d["full"]))
        for name, f in rows:
            mean = f"{f['mean']:.4f}" if name.startswith("before") else f"**{f['mean']:.4f}**"
            lines.append(f"| {name} | {mean} | {f['min']:.4f} | {f['p05']:.4f} |")
        lines.append("")
    if "tradeoff" in s:
        from lincomp.models.tradeoff import tradeoff_markdown

        t = s["tradeoff"]
        lines += ["## Trade-off: fidelity and speed at the same lengths", "",
                  "Each row is one model at one length: embedding cosine to the teacher on held-out texts of that "
                  "length, the whole model's forward time against the stock (SDPA) teacher on the same texts in "
                  "the same process, and attention FLOPs as a share of dense. The window alone is the hybrid "
                  "without its linear branch: what the linear branch buys is the gap between the two.", "",
                  tradeoff_markdown(t["points"], batch=t["batch"])]
        if t.get("png"):
            lines += [f"![trade-off]({t['png']})", ""]
    if "speed" in s:
        sp = s["speed"]
        lines += ["## Kernel speed only (B=1, H=12, D=32, " + sp["dtype"] + ")", "",
                  "Attention alone on random inputs, out to lengths where fidelity is not measured (see the "
                  "trade-off above for both at the same lengths). "
                  f"lincomp target `{sp['target']}`. SDPA: dense attention (what the teacher runs). "
                  f"FlexAttention: {sp['flex_note'] or 'window only'}.", "",
                  "| L | lincomp ms | SDPA ms | Flex ms | vs SDPA | vs Flex |", "| --- | --- | --- | --- | --- | --- |"]
        for row in sp["rows"]:
            fl = row.get("flex_ms")
            flex_ms = "-" if fl is None else f"{fl:.3f}"
            vs_flex = "-" if fl is None else f"{fl / row['lincomp_ms']:.2f}x"
            lines.append(f"| {row['L']} | {row['lincomp_ms']:.3f} | {row['sdpa_ms']:.3f} | {flex_ms} | "
                         f"{row['sdpa_ms'] / row['lincomp_ms']:.2f}x | {vs_flex} |")
        lines.append("")
    if "flops" in s:
        lines += ["## Attention FLOPs (B=1, H=12, D=32)", "", "| L | lincomp MFLOP | dense MFLOP | saved |",
                  "| --- | --- | --- | --- |"]
        for row in s["flops"]["rows"]:
            lines.append(f"| {row['L']} | {row['flops'] / 1e6:.1f} | {row['dense_flops'] / 1e6:.1f} | "
                         f"{100 * row['saved']:.1f}% |")
        lines.append("")
    return "\n".join(lines)


def _plot(r: dict, path: Path) -> Optional[Path]:
    """report.png: time vs length (left), FLOPs saved (middle), distillation loss and fidelity (right)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    s = r["sections"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    if "speed" in s:
        rows = s["speed"]["rows"]
        Ls = [x["L"] for x in rows]
        ax.plot(Ls, [x["lincomp_ms"] for x in rows], "o-", label=f"lincomp ({s['speed']['target']})")
        ax.plot(Ls, [x["sdpa_ms"] for x in rows], "s--", label="SDPA (dense)")
        fl = [(x["L"], x["flex_ms"]) for x in rows if "flex_ms" in x]
        if fl:
            ax.plot(*zip(*fl), "^:", label="FlexAttention (window only)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "speed: skipped", ha="center", transform=ax.transAxes)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("ms per call")
    ax.set_title("attention time")
    ax = axes[1]
    if "flops" in s:
        rows = s["flops"]["rows"]
        ax.bar([str(x["L"]) for x in rows], [100 * x["saved"] for x in rows])
        ax.set_ylim(0, 100)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("% of dense attention FLOPs saved")
    ax.set_title("FLOPs saved")
    ax = axes[2]
    if "distill" in s:
        d = s["distill"]
        if d["loss"]:
            ax.plot(range(1, len(d["loss"]) + 1), d["loss"], label="attention MSE")
            ax.set_yscale("log")
            ax.set_xlabel("step")
            ax.legend(loc="upper right")
        ax.set_title(f"distillation: cosine {d['before']['mean']:.3f} -> {d['after']['mean']:.3f}")
    else:
        ax.set_title("distillation: skipped")
    fig.tight_layout()
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ---------------------------------------------------------------------------------------------- CLI
def _add_arguments(p: argparse.ArgumentParser) -> None:
    from lincomp.models.distill_cli import MINILM_WINDOW

    p.add_argument("--out", default="out/demo", help="report folder (default out/demo)")
    p.add_argument("--lengths", type=int, nargs="+", default=None,
                   help="lengths for tuning and timing (default: 256 1024 4096 on CPU, 1024 4096 16384 on GPU)")
    p.add_argument("--steps", type=int, default=40, help="attention-transfer steps (default 40: a brief run)")
    p.add_argument("--student", default="out/distill/minilm/student.safetensors", metavar="PATH",
                   help="a student saved by `lincomp distill minilm` to evaluate beside the brief run, when it "
                        "exists and has the same spec (default: out/distill/minilm/student.safetensors)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--train-length", type=int, default=256, help="training text length in tokens (default 256)")
    p.add_argument("--eval-length", type=int, default=256, help="held-out text length in tokens (default 256)")
    p.add_argument("--eval-blocks", type=int, default=32, help="held-out texts (default 32)")
    p.add_argument("--tradeoff-lengths", type=int, nargs="+", default=[256, 512],
                   help="lengths where the trade-off section measures fidelity AND model speed (default 256 512)")
    p.add_argument("--tradeoff-batch", type=int, default=1, help="texts per timed model forward (default 1)")
    p.add_argument("--window", type=int, default=MINILM_WINDOW,
                   help=f"window tokens each side (default {MINILM_WINDOW}, as `lincomp distill minilm`)")
    p.add_argument("--feature-dim", type=int, default=64, help="Hedgehog E (default 64)")
    p.add_argument("--combine", choices=["shared", "sum"], default="shared")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--skip", nargs="*", default=[], choices=list(SECTIONS), help="sections to leave out")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every section (tests)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--verbose", action="store_true", help="print the traceback of a skipped section")


SECTIONS = {"spec": "spec", "tune": "tune on this device", "compile": "compile and check",
            "linearize": "linearise all-MiniLM-L6-v2", "distill": "distil briefly and measure fidelity",
            "speed": "kernel speed vs SDPA and FlexAttention", "flops": "attention FLOPs",
            "tradeoff": "trade-off: fidelity and model speed at the same lengths"}


def run(args: argparse.Namespace) -> int:
    """Run every section, then write the report; returns 0 (skipped sections are reported, not fatal)."""
    import torch

    if args.quick:
        args.lengths = args.lengths or [128, 256]
        args.steps, args.eval_blocks, args.eval_length, args.train_length = min(args.steps, 2), 4, 128, 64
        args.batch_size, args.student, args.tradeoff_lengths = 2, "", [128]
    if args.lengths is None:
        args.lengths = [1024, 4096, 16384] if torch.cuda.is_available() and args.device != "cpu" else [256, 1024, 4096]
    demo = _Demo(args)
    print(f"lincomp demo on {demo.device}; report in {demo.out}/")
    for name, title in SECTIONS.items():
        if name in args.skip:
            demo._skip(name, "left out with --skip")
        elif name != "spec" and demo.spec is None:
            demo._skip(name, "no spec")
        else:
            demo.section(name, title, getattr(demo, f"do_{name}"))
    demo.report()
    return 0


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``demo`` to the ``lincomp`` command's subparsers."""
    p = subparsers.add_parser("demo", help="run the main job end to end and write a report",
                              description=__doc__.split("\n\n")[0] + " Spec -> tune -> compile -> linearise "
                              "all-MiniLM-L6-v2 -> distil briefly -> fidelity, speed and FLOPs, written to "
                              "out/demo/report.md and report.png.")
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m lincomp.demo [options]``."""
    parser = argparse.ArgumentParser(prog="lincomp demo", description=__doc__.split("\n\n")[0])
    _add_arguments(parser)
    return run(parser.parse_args(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
