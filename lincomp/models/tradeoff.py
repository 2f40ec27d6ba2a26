"""The trade-off picture of a linearised model: fidelity against measured speed and attention FLOPs.

One *point* is one model (the teacher, the window alone, a distilled student) at one sequence length:

- ``fidelity``: mean cosine similarity of sentence embeddings to the teacher (``metric="cosine"``, 1 for the
  teacher, higher is better) or held-out perplexity / the teacher's (``metric="ppl ratio"``, lower is better);
- ``model_ms`` / ``teacher_ms``: the whole model's forward time and the stock (SDPA) teacher's, measured in
  the same process at the same length and batch, turn by turn, fastest call, so ``teacher_ms / model_ms`` is
  the speed-up;
- ``flops_fraction``: attention FLOPs / dense attention FLOPs (``lincomp.ir.cost.estimate``; the rest of the
  model, identical in both, is not counted).

Speed does not depend on the trained weights: a freshly linearised model with a student's spec times the same
as the student, which is how points for students known only by their recorded fidelity get a measured speed.
"""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path
from typing import List, Mapping, Optional, Sequence

import torch

from lincomp._atomic import atomic_write_bytes

KINDS = ("teacher", "window", "student")   # plot order; "window": the window alone, no linear branch


def flops_fraction(spec, L: int, *, H: int = 12, D: int = 32) -> float:
    """Attention FLOPs of ``spec`` at length ``L`` / dense attention's (1.0 for ``spec=None``: the teacher)."""
    if spec is None:
        return 1.0
    from lincomp.ir.cost import estimate

    lin = getattr(spec, "linear", None)
    e = estimate(spec, L, B=1, H=H, D=D, E=lin.feature_dim if lin is not None else None)
    return e.flops / e.dense_flops


@contextlib.contextmanager
def inference_target(model: torch.nn.Module, target: str = "auto"):
    """Run every linearised layer of ``model`` on ``target`` inside the block (training may have used the
    reference where the compiled backend has no backward; a timed forward should use the compiled kernels)."""
    from lincomp.models.modules import LinearizedAttention

    saved = [(m, m.target) for m in model.modules() if isinstance(m, LinearizedAttention)]
    for m, _ in saved:
        m.target = target
    try:
        yield model
    finally:
        for m, old in saved:
            m.target = old


def forward_times_ms(models: Mapping[str, torch.nn.Module], tokens: torch.Tensor, *, reps: int = 5,
                     warmup: int = 2) -> dict:
    """``{name: ms}``: the fastest of ``reps`` timed ``model(tokens)`` calls (``[B, L]`` token ids, gradients off).

    The models take turns call by call, so a burst of load on a shared machine slows all of them alike, and
    the fastest call is the one least disturbed by it (a median would still carry the other jobs' load).
    """
    import time

    sync = torch.cuda.synchronize if tokens.device.type == "cuda" else (lambda: None)
    best = {name: math.inf for name in models}
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        for m in models.values():
            stack.enter_context(inference_target(m))
        for _ in range(warmup):
            for m in models.values():
                m(input_ids=tokens)
        for _ in range(reps):
            for name, m in models.items():
                sync()
                t0 = time.perf_counter()
                m(input_ids=tokens)
                sync()
                best[name] = min(best[name], 1e3 * (time.perf_counter() - t0))
    return best


def point(label: str, kind: str, L: int, fidelity: float, *, spec=None, metric: str = "cosine",
          model_ms: Optional[float] = None, teacher_ms: Optional[float] = None, fidelity_min: Optional[float] = None,
          H: int = 12, D: int = 32, source: str = "measured here") -> dict:
    """One point of the picture (a JSON-able dict); ``kind``: one of :data:`KINDS`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if metric not in ("cosine", "ppl ratio"):
        raise ValueError(f"metric must be 'cosine' or 'ppl ratio', got {metric!r}")
    return {"label": label, "kind": kind, "L": int(L), "metric": metric, "fidelity": float(fidelity),
            "fidelity_min": fidelity_min, "spec": spec.summary() if spec is not None else "softmax (SDPA)",
            "flops_fraction": flops_fraction(spec, L, H=H, D=D), "model_ms": model_ms, "teacher_ms": teacher_ms,
            "source": source}


def measure_speed(points: List[dict], teacher: torch.nn.Module, specs: Mapping[str, object],
                  tokens: Mapping[int, torch.Tensor], *, reps: int = 5, log=print) -> List[dict]:
    """Fill ``model_ms`` / ``teacher_ms`` of ``points`` in place: per length in ``tokens`` (``{L: [B, L]}``),
    the teacher and one freshly linearised copy per spec in ``specs`` (``{point label: spec}``; the weights do
    not change the time), timed turn by turn (:func:`forward_times_ms`). Points of other lengths or labels are
    left as they are."""
    from lincomp.models.distill_cli import linearize_student

    models = {"teacher": teacher}
    for label, spec in specs.items():
        models[label] = linearize_student(copy.deepcopy(teacher), spec, target="auto")
    for L, x in tokens.items():
        times = forward_times_ms(models, x, reps=reps)
        for p in points:
            if p["L"] == L:
                p["teacher_ms"] = times["teacher"]
                p["model_ms"] = times["teacher"] if p["kind"] == "teacher" else times.get(p["label"], p["model_ms"])
        log(f"L={L}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in times.items()))
    return points


def speedup(p: dict) -> Optional[float]:
    """Teacher time / this model's time at the same length (None when either was not measured)."""
    if p.get("model_ms") and p.get("teacher_ms"):
        return p["teacher_ms"] / p["model_ms"]
    return None


def _fmt(x, spec: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def tradeoff_markdown(points: Sequence[dict], *, batch: Optional[int] = None) -> str:
    """The picture as a markdown table, one row per point, grouped by metric and length."""
    lines = ["| length | model | spec | fidelity | worst text | attention FLOPs (% of dense) | forward ms | "
             "SDPA teacher ms | speed-up |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in sorted(points, key=lambda p: (p["metric"], p["L"], KINDS.index(p["kind"]), p["flops_fraction"])):
        s = speedup(p)
        what = "cosine" if p["metric"] == "cosine" else "ppl / teacher"
        lines.append(f"| {p['L']} | {p['label']} | `{p['spec']}` | {_fmt(p['fidelity'])} {what} | "
                     f"{_fmt(p.get('fidelity_min'))} | {100 * p['flops_fraction']:.0f}% | "
                     f"{_fmt(p['model_ms'], '.1f')} | {_fmt(p['teacher_ms'], '.1f')} | "
                     f"{_fmt(s, '.2f') + 'x' if s else '-'} |")
    note = (f" Forward time: the whole model on a batch of {batch} text{'s' if batch != 1 else ''}, the fastest of repeated calls taken "
            "turn by turn with the teacher's." if batch else "")
    return "\n".join(lines) + "\n" + note.lstrip() + ("\n" if note else "")


_STYLE = {"teacher": ("*", "black", 160), "window": ("s", "tab:gray", 60), "student": ("o", "tab:blue", 60)}


def plot_tradeoff(points: Sequence[dict], path, *, title: str = "") -> Optional[Path]:
    """Write the picture as a PNG: one column per (metric, length), fidelity against the measured speed-up
    (top row) and against attention FLOPs as a share of dense (bottom row). None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    groups = sorted({(p["metric"], p["L"]) for p in points})
    if not groups:
        raise ValueError("plot_tradeoff: no points to plot")
    fig, axes = plt.subplots(2, len(groups), figsize=(4.6 * len(groups), 7.6), squeeze=False)
    for col, (metric, L) in enumerate(groups):
        pts = [p for p in points if (p["metric"], p["L"]) == (metric, L)]
        for row, (xkey, xlabel) in enumerate((("speedup", "speed-up of the model vs stock SDPA (measured)"),
                                              ("flops", "attention FLOPs, % of dense"))):
            ax = axes[row][col]
            for kind in KINDS:
                ks = [p for p in pts if p["kind"] == kind]
                xs = [speedup(p) if xkey == "speedup" else 100 * p["flops_fraction"] for p in ks]
                ks = [(x, p) for x, p in zip(xs, ks) if x is not None]
                if not ks:
                    continue
                marker, color, size = _STYLE[kind]
                ax.scatter([x for x, _ in ks], [p["fidelity"] for _, p in ks], marker=marker, c=color, s=size,
                           label={"teacher": "teacher (softmax)", "window": "window alone",
                                  "student": "distilled student"}[kind], zorder=3)
                for x, p in ks:
                    ax.annotate(p["label"], (x, p["fidelity"]), fontsize=7, xytext=(4, 3),
                                textcoords="offset points")
            if xkey == "speedup":
                ax.axvline(1.0, color="black", lw=0.6, ls=":")
            else:
                ax.axvline(100.0, color="black", lw=0.6, ls=":")
            if metric == "cosine":
                ax.axhline(0.99, color="tab:red", lw=0.6, ls="--")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("embedding cosine to the teacher" if metric == "cosine" else "perplexity / teacher")
            ax.set_title(f"{L} tokens" + ("" if metric == "cosine" else " (causal LM)"))
            ax.grid(alpha=0.3)
        if axes[0][col].get_legend_handles_labels()[0]:   # nothing timed at this length: no legend
            axes[0][col].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def window_only_spec(spec):
    """The window-alone baseline of a hybrid ``spec``: its window and prefix, no linear branch and no sinks
    (sink logits are learned; the recipes' baselines are the untrained window)."""
    from lincomp.spec import AttentionSpec

    if spec.window is None:
        raise ValueError(f"{spec.summary()}: no window to keep for the window-alone baseline")
    return AttentionSpec(window=spec.window, causal=spec.causal, prefix=spec.prefix)


def attention_error_by_layer(student: torch.nn.Module, teacher: torch.nn.Module, blocks: torch.Tensor,
                             batch_size: int = 4) -> List[dict]:
    """Where a linearised ``student``'s error comes from, per attention layer, on token ``blocks`` ``[N, L]``:

    - ``local``: ||lincomp(q, k, v) - softmax(q, k, v)|| / ||softmax(q, k, v)|| with every layer fed the
      teacher's hidden states (the layer's own approximation error: what stage 1 trains down);
    - ``end_to_end``: ||student attention output - teacher's|| / ||teacher's||, each model on its own hidden
      states (the error earlier layers pass on included; stage 2 aims at this);
    - ``outside``: the teacher's attention probability mass outside the student's window and prefix, averaged
      over queries and heads: the share of attention the linear branch (or nothing) must carry.

    Returns one dict per layer, in model order (``{"layer", "local", "end_to_end", "outside"}``).
    """
    from lincomp.models import capture_attention
    from lincomp.models.distill import LayerLocalTransfer, run_model
    from lincomp.models.modules import LinearizedAttention
    from lincomp.reference.masks import window_mask

    spec = next((m.spec for m in student.modules() if isinstance(m, LinearizedAttention)), None)
    if spec is None:
        raise ValueError("attention_error_by_layer: the student is not linearised (lincomp.linearize)")
    eager = copy.deepcopy(teacher)
    eager.set_attn_implementation("eager")   # SDPA returns no attention probabilities
    sums: dict = {}
    with torch.no_grad():
        for i in range(0, blocks.shape[0], batch_size):
            x = blocks[i:i + batch_size].to(next(teacher.parameters()).device)
            with capture_attention(teacher) as t_caps:
                probs = eager(input_ids=x, output_attentions=True).attentions
                run_model(teacher, x)
            with capture_attention(student) as s_caps:
                run_model(student, x)
            with LayerLocalTransfer(student) as local:
                run_model(student, x)
            keep = window_mask(spec, x.shape[1], x.device).float()   # the window set, as the oracle defines it
            for j, name in enumerate(t_caps):
                t, s = t_caps[name].float(), s_caps[name].float()
                acc = sums.setdefault(name, {"t2": 0.0, "e2e": 0.0, "local_mse": 0.0, "outside": 0.0, "n": 0})
                acc["t2"] += t.pow(2).mean().item()
                acc["e2e"] += (s - t).pow(2).mean().item()
                acc["local_mse"] += local.losses[j].item()
                acc["outside"] += (1 - (probs[j].float() * keep).sum(-1)).mean().item()
                acc["n"] += 1
    return [{"layer": name, "local": math.sqrt(a["local_mse"] / a["t2"]), "end_to_end": math.sqrt(a["e2e"] / a["t2"]),
             "outside": a["outside"] / a["n"]} for name, a in sums.items()]


__all__ = ["KINDS", "flops_fraction", "inference_target", "forward_times_ms", "point", "measure_speed", "speedup",
           "tradeoff_markdown", "plot_tradeoff", "window_only_spec", "attention_error_by_layer"]
