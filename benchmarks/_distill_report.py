"""The distillation recipes' result tables: markdown writers and the entry point of
``benchmarks/distill_<recipe>.py``, which runs a recipe through the ``lincomp distill`` options and writes
the committed table into ``benchmarks/results/`` (the package itself never writes into the repository).
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lincomp._atomic import atomic_write_text  # noqa: E402
from lincomp.models.distill_cli import _bytes, _f, _measured, machine_info, register  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def results_markdown(r: dict, command: str = "", rebuilt: bool = False) -> str:
    """A commit-ready markdown table of a recipe's results (either recipe); ``rebuilt``: the table comes from a
    finished run's results.json (``--table-only``), not from a run of ``command``."""
    m = r.get("machine") or machine_info()
    c = r["corpus"]
    what = "all-MiniLM-L6-v2 (window + Hedgehog)" if r["recipe"] == "minilm" else "byte-level Llama (Lizard-style)"
    lines = [f"# Distillation: {what}",
             "", f"- machine: {m['cpu']}{', ' + m['gpu'] if m.get('gpu') else ''}; torch {m['torch']} with "
             f"{m['torch_threads']} thread(s); Python {m['python']}",
             f"- spec: `{r['spec_summary']}` = `{json.dumps(r['spec'], sort_keys=True)}`",
             f"- corpus: {c['kind']} of Python {c['python']} ({c['files']} files, {c['files_heldout']} held out by "
             f"path hash, sha256 {c['sha256']})" + (_extra_text_md(c) if r["recipe"] == "minilm" else ""),
             f"- steps: stage 1 attention transfer {r['steps']} (lr {r['lr']}), stage 2 LoRA fine-tuning "
             f"{r['finetune_steps']} (lr {r.get('finetune_lr', '-')}); batch "
             f"{r['batch_size']}; seed {r['seed']}; device {r['device']}",
             f"- wall time: {r['wall_s']:.0f} s for the run that wrote this; training " +
             (", ".join(f"{k} {v:.0f} s" for k, v in r["train_s"].items()) if r.get("train_s") else "-") +
             " (earlier sessions of a resumed run included)"]
    if command:
        lines.append(f"- command: `{command}`")
    if rebuilt:
        lines.append("- this table was rebuilt from the finished runs' results.json; the same command without "
                     "`--table-only` trains them")
    lines.append("")
    if r["recipe"] == "minilm":
        reach = r["spec"]["window"]
        lines += [f"Mean cosine similarity of sentence embeddings (mean-pooled last hidden state, as "
                  f"sentence-transformers computes them) to the teacher's, on held-out docstrings. The window "
                  f"sees {reach['left']} tokens each side (+{r['spec']['prefix']} global [CLS]); stage 1 trained on "
                  f"{c['train_length']}-token texts, stage 2 on {c.get('finetune_length', c['train_length'])}-token "
                  "texts.", "",
                  "| eval length | texts | window only | linearised, before | after stage 1 | after stage 2 "
                  "| final: min | final: 5th pct |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for L, f in r["fidelity"].items():
            a = f["after"]
            get = lambda k: _f(f.get(k, {}).get("mean"))  # noqa: E731
            lines.append(f"| {L} | {a['n']} | {get('window_only')} | {get('before')} | {get('after_attention')} | "
                         f"{get('after_finetune')} | {_f(a['min'])} | {_f(a['p05'])} |")
        lines += ["", f"**final mean cosine: " + ", ".join(f"{_f(f['after']['mean'])} at {L} tokens"
                                                          for L, f in r["fidelity"].items()) + "**"]
    else:
        t = r["teacher"]
        p = r["perplexity"]
        lines += [f"Teacher `{t.get('name', 'source')}`: {t['config']['layers']} layers x "
                  f"{t['config']['hidden_size']} hidden, {t['config']['heads']} heads, trained "
                  f"{t['config']['steps']} steps of {t['config'].get('batch_size', 8)} x "
                  f"{t['config']['seq_len']} bytes on {t['train_tokens']} bytes "
                  f"({t['wall_s']:.0f} s). Held-out perplexity over {r['eval_windows']} windows of {r['seq_len']} "
                  f"bytes (the window sees {r['spec']['window']['left'] + 1} keys).", "",
                  "| model | perplexity | / teacher |", "| --- | --- | --- |"]
        for k in ("teacher", "window_only", "before", "after_attention", "after_finetune"):
            if k in p:
                lines.append(f"| {k.replace('_', ' ')} | {p[k]:.4f} | {p[k] / p['teacher']:.4f} |")
        lines += ["", f"**student / teacher: {r['ratio']:.4f}**", "",
                  "Decode memory (fp32, all layers):", "", "| context | teacher KV cache | student state + window |",
                  "| --- | --- | --- |"]
        for mm in r["decode_memory"]:
            lines.append(f"| {mm['context']} | {_bytes(mm['teacher_kv_bytes'])}{_measured(mm, 'teacher')} | "
                         f"{_bytes(mm['student_bytes'])}{_measured(mm, 'student')} |")
        lines += ["", "Computed from the shapes; \"measured\" sums the tensors actually held after prefilling that "
                  "many tokens (the teacher's transformers DynamicCache; the student's lincomp decoders, via "
                  "`lincomp.models.generate`)."]
        if r.get("long"):
            lines += ["", _length_md([r])]
    return "\n".join(lines) + "\n"


def _steps(r: dict) -> str:
    """Stage 1 + stage 2 steps of a run."""
    return f"{r['steps']} + {r['finetune_steps']}"


def _train_s(r: dict) -> str:
    t = r.get("train_s") or {}
    return f"{sum(t.values()):.0f}" if t and set(t) == set(r["final_loss"]) else "-"


def _extra_text_md(c: dict) -> str:
    pk = (c.get("extra_text") or {}).get("packages")
    if not pk:
        return "; training text: the stdlib's docstrings only"
    return ("; extra training text: the docstrings of " + ", ".join(f"{n} {v['version']}" for n, v in pk.items())
            + f" ({sum(v['files'] for v in pk.values())} files, sha256 {c['extra_text']['sha256']}); "
            f"{c['train_blocks']} training blocks in all")


def _training_md(r: dict) -> str:
    c = r["corpus"]
    text = "stdlib + packages" if (c.get("extra_text") or {}).get("packages") else "stdlib"
    seed = f"; seed {r['seed']}" if r.get("seed") else ""
    return (f"{r['steps']} x {c['train_length']} tok + {r['finetune_steps']} x "
            f"{c.get('finetune_length', c['train_length'])} tok; {text}{seed}")


def sweep_markdown(runs: Sequence[dict]) -> str:
    """A markdown table comparing recipe results that differ in their window (or any spec field)."""
    if runs[0]["recipe"] == "minilm":
        lengths = list(runs[0]["fidelity"])
        head = (["spec", "stage 1 + stage 2 steps; training text"]
                + [f"{k} @ {L}" for L in lengths for k in ("window only", "final")] + ["training s"])
        rows = [[f"`{r['spec_summary']}`", _training_md(r)]
                + [_f(r["fidelity"].get(L, {}).get(k, {}).get("mean")) for L in lengths
                   for k in ("window_only", "after")]
                + [_train_s(r)] for r in runs]
        title = "Mean cosine similarity to the teacher by spec and training"
    else:
        head = ["spec", "window keys", "steps", "window only / teacher", "after stage 1", "after stage 2",
                "training s"]
        rows = []
        for r in runs:
            p, t = r["perplexity"], r["perplexity"]["teacher"]
            rows.append([f"`{r['spec_summary']}`", str(r["spec"]["window"]["left"] + 1), _steps(r),
                         _f(p.get("window_only", float("nan")) / t), _f(p["after_attention"] / t),
                         _f(p["after_finetune"] / t) if "after_finetune" in p else "-",
                         _train_s(r)])
        title = "Perplexity / teacher by window (the smaller the window, the more the linear branch must carry)"
        if any(r.get("long") for r in runs):
            return _md_table(title, head, rows) + "\n" + _length_md(runs)
    return _md_table(title, head, rows)


def _md_table(title: str, head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    return "\n".join([f"## {title}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head),
                      *("| " + " | ".join(r) + " |" for r in rows)]) + "\n"


def _length_md(runs: Sequence[dict]) -> str:
    """Length generalisation of causal-LM runs: perplexity / teacher at the distillation length and at each
    longer held-out length, the teacher's own perplexity at each (it too is evaluated beyond its training
    length) and the drift: student ratio at the longest length / at the distillation length."""
    head = ["spec", "steps", "length (bytes)", "windows", "teacher perplexity", "window only / teacher", "student / teacher",
            "student ratio / its ratio at the distillation length"]
    rows = []
    for r in runs:
        p = r["perplexity"]
        base = r["ratio"]
        final = p.get("after_finetune", p["after_attention"])
        rows.append([f"`{r['spec_summary']}`", _steps(r), f"{r['seq_len']} (distillation)", str(r["eval_windows"]),
                     _f(p["teacher"]), _f(p.get("window_only", float("nan")) / p["teacher"]),
                     _f(final / p["teacher"]), "1.0000"])
        for n, lp in (r.get("long") or {}).items():
            rows.append([f"`{r['spec_summary']}`", _steps(r), n, str(lp["windows"]), _f(lp["teacher"]),
                         _f(lp.get("window_only", float("nan")) / lp["teacher"]), _f(lp["student"] / lp["teacher"]),
                         _f(lp["student"] / lp["teacher"] / base)])
    return _md_table("Length generalisation (the same models on longer held-out windows)", head, rows)


def benchmark_main(recipe: str, argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``benchmarks/distill_<recipe>.py``: run the recipe with ``lincomp distill`` options plus
    ``--threads N`` (torch CPU threads, default 1 or $LINCOMP_THREADS: the machine is shared),
    ``--sweep-window W [W ...]`` (one run per window, each in ``<out>_w<W>``; the table details the first and
    compares all), ``--compare DIR ...`` (earlier runs to add to the comparison), ``--table-only`` (finished
    runs' results.json only, no training) and ``--results PATH``;
    writes ``benchmarks/results/distill_<recipe>_<cpu|gpu>.md``."""
    import os

    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--threads", type=int, default=int(os.environ.get("LINCOMP_THREADS", "1")))
    pre.add_argument("--results", default=None)
    pre.add_argument("--sweep-window", type=int, nargs="+", default=None)
    pre.add_argument("--out", default=f"out/distill/{recipe}")
    pre.add_argument("--compare", nargs="+", default=[], metavar="DIR",
                     help="earlier runs' output folders to add to the comparison table")
    pre.add_argument("--table-only", action="store_true",
                     help="rebuild the table from the results.json of finished runs, training nothing")
    ours, rest = pre.parse_known_args(argv)
    torch.set_num_threads(ours.threads)
    parser = argparse.ArgumentParser(prog=f"benchmarks/distill_{recipe}.py")
    register(parser.add_subparsers(dest="command", required=True))
    runs = []
    for w in ours.sweep_window or [None]:
        extra = [] if w is None else ["--window", str(w)]
        if w is not None and recipe == "causal_lm" and "--teacher-dir" not in rest:
            extra += ["--teacher-dir", f"{ours.out}/teacher"]   # one teacher for the whole sweep
        out = ours.out if w is None else f"{ours.out}_w{w}"
        if not ours.table_only:
            args = parser.parse_args(["distill", recipe.replace("_", "-"), *rest, *extra, "--out", out])
            args.func(args)
        elif not (Path(out) / "results.json").exists():
            raise SystemExit(f"--table-only: {out}/results.json does not exist; run without --table-only first")
        runs.append(json.loads((Path(out) / "results.json").read_text()))
    runs += [json.loads((Path(d) / "results.json").read_text()) for d in ours.compare]
    kind = "gpu" if runs[0]["device"].startswith("cuda") else "cpu"
    dest = Path(ours.results or RESULTS / f"distill_{recipe}_{kind}.md")
    cmd = f"python benchmarks/distill_{recipe}.py {' '.join(argv)}".strip()
    md = results_markdown(runs[0], cmd, rebuilt=ours.table_only)
    if len(runs) > 1:
        md += "\n" + sweep_markdown(runs)
    atomic_write_text(dest, md)
    print(f"wrote {dest}")
    return 0
