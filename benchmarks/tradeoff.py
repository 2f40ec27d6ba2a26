"""The trade-off picture of the distillation recipes: fidelity against measured speed and attention FLOPs.

    .venv/bin/python benchmarks/tradeoff.py                      # about 10 min with --threads 2
    .venv/bin/python benchmarks/tradeoff.py --runs out/distill/minilm_w64e32_L512   # add finished runs

For each window of the MiniLM recipe (+-16/32/64/96) at 256 and 512 tokens: the distilled students' fidelity
(mean embedding cosine to the teacher, as recorded in benchmarks/results/distill_minilm_cpu.md and in the
results.json of any --runs folder), the window alone (measured here on held-out docstrings) and the teacher;
for the causal-LM recipe the perplexity ratios recorded in distill_causal_lm_cpu.md. Every point's model
forward time is measured here against the stock SDPA teacher at the same length in the same process (weights
do not change the time, so each student's spec is timed on a freshly linearised copy), and its attention
FLOPs are counted from the spec. Writes benchmarks/results/tradeoff_<cpu|gpu>.md and .png.
"""

import argparse
import copy
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lincomp._atomic import atomic_write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def recorded_rows(md_path: Path, title: str) -> list:
    """The rows of the markdown table under ``## <title>...`` in a committed results file, as lists of cells."""
    text = md_path.read_text()
    at = text.find("## " + title)
    if at < 0:
        raise ValueError(f"{md_path}: no '## {title}' table; rebuild it with its benchmark's --table-only")
    rows = []
    for line in text[at:].splitlines()[1:]:
        if line.startswith("## "):
            break
        if line.startswith("| `"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _num(cell: str):
    return None if cell in ("-", "") else float(cell)


def minilm_recorded(md_path: Path) -> list:
    """``[(spec, {L: final mean cosine}, note)]``: the first row of each spec in the committed MiniLM table
    (the recipe's own run; later rows of the same spec are seeds / variants)."""
    from lincomp.models.distill_cli import minilm_spec

    rows, seen = [], set()
    for cells in recorded_rows(md_path, "Mean cosine similarity to the teacher by spec and training"):
        summary = cells[0].strip("`")
        m = re.fullmatch(r"w1d(\d+)\.(\d+)_p1_linhedgehog(\d+)-n_shared", summary)
        if m is None or summary in seen:
            continue
        spec = minilm_spec(int(m[1]), int(m[3]))
        if spec.summary() != summary:
            raise ValueError(f"{md_path}: cannot rebuild the spec of {summary!r} (got {spec.summary()!r})")
        seen.add(summary)
        fid = {256: _num(cells[3]), 512: _num(cells[5])}    # columns: window only / final, @256 then @512
        rows.append((spec, {L: f for L, f in fid.items() if f is not None}, cells[1]))
    return rows


def causal_lm_recorded(md_path: Path) -> list:
    """``[(spec, {"window only": ratio, "student": ratio})]`` from the committed causal-LM window table."""
    from lincomp.models.distill_cli import causal_lm_spec

    out = []
    for cells in recorded_rows(md_path, "Perplexity / teacher by window"):
        spec = causal_lm_spec(window=int(cells[1]))
        if spec.summary() != cells[0].strip("`"):
            raise ValueError(f"{md_path}: cannot rebuild the spec of {cells[0]} (got {spec.summary()!r})")
        out.append((spec, {"window": _num(cells[2]), "student": _num(cells[4] if cells[4] != "-" else cells[3])}))
    return out


def _label(spec) -> str:
    lin = spec.linear
    w = spec.window.left if not spec.causal else spec.window.left + 1
    return (f"+-{w}" if not spec.causal else f"{w} keys") + (f" E{lin.feature_dim}" if lin is not None else "")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/tradeoff.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512], help="MiniLM lengths (default 256 512)")
    p.add_argument("--runs", nargs="*", default=[], metavar="DIR",
                   help="finished `lincomp distill minilm` output folders (their results.json) to add")
    p.add_argument("--eval-blocks", type=int, default=32, help="held-out texts per length for the window alone")
    p.add_argument("--batch", type=int, default=4, help="texts per timed forward (default 4)")
    p.add_argument("--reps", type=int, default=5, help="timed forwards per model and length (the fastest is kept)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-causal-lm", action="store_true", help="leave out the causal-LM recipe's points")
    p.add_argument("--results", default=None, help="markdown path (default benchmarks/results/tradeoff_<cpu|gpu>.md)")
    p.add_argument("--reuse", action="store_true",
                   help="keep the points already in the results' .json and measure only new ones (each new "
                        "point's teacher time is measured with it, in this process)")
    a = p.parse_args(argv)

    import torch

    from lincomp.models.distill import embedding_fidelity
    from lincomp.models.distill_cli import linearize_student, load_minilm, machine_info, minilm_blocks
    from lincomp.models.tradeoff import measure_speed, plot_tradeoff, point, tradeoff_markdown, window_only_spec
    from lincomp.spec import AttentionSpec

    torch.set_num_threads(a.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok, teacher = load_minilm(device)
    kind = "gpu" if device == "cuda" else "cpu"
    md_path = Path(a.results or RESULTS / f"tradeoff_{kind}.md")
    last = md_path.with_suffix(".json")
    old = json.loads(last.read_text()) if a.reuse and last.exists() else []
    have = {(p["label"], p["L"], p["metric"]) for p in old}
    recorded = [(s, f, f"recorded: distill_minilm_cpu.md ({note})", _label(s))
                for s, f, note in minilm_recorded(RESULTS / "distill_minilm_cpu.md")]
    for d in a.runs:
        r = json.loads((Path(d) / "results.json").read_text())
        spec = AttentionSpec.coerce(r["spec"])
        recorded.append((spec, {int(L): f["after"]["mean"] for L, f in r["fidelity"].items()},
                         f"recorded: {d}/results.json ({r['steps']} x {r['corpus']['train_length']} tok + "
                         f"{r['finetune_steps']} x {r['corpus'].get('finetune_length')} tok)",
                         f"{_label(spec)} ({r['corpus']['train_length']}-tok training)"))
    points, specs = [], {}
    heldout = {L: minilm_blocks(tok, "heldout", L, a.eval_blocks) for L in a.lengths}
    windows = sorted({s.window.left for s, *_ in recorded})
    for L in a.lengths:
        points.append(point("teacher", "teacher", L, 1.0))
        for w in windows:
            spec = window_only_spec(next(s for s, *_ in recorded if s.window.left == w))
            label = f"+-{w} window"
            if (label, L, "cosine") in have:
                continue
            win = linearize_student(copy.deepcopy(teacher), spec, target="auto")
            f = embedding_fidelity(win, teacher, heldout[L])
            print(f"L={L} window alone +-{w}: cosine {f['mean']:.4f}", flush=True)
            points.append(point(label, "window", L, f["mean"], spec=spec, fidelity_min=f["min"],
                                source=f"measured here ({f['n']} held-out texts)"))
            specs[label] = spec
            del win
        for spec, fid, source, label in recorded:
            if L in fid and (label, L, "cosine") not in have:
                points.append(point(label, "student", L, fid[L], spec=spec, source=source))
                specs[label] = spec
    g = torch.Generator().manual_seed(0)
    tokens = {L: heldout[L][torch.randperm(heldout[L].shape[0], generator=g)[:a.batch]].to(device)
              for L in a.lengths}
    measure_speed(points, teacher, specs, tokens, reps=a.reps)
    points = [p for p in old if p["metric"] == "cosine"] + [p for p in points if (p["label"], p["L"], p["metric"])
                                                            not in have]
    clm_points = [p for p in old if p["metric"] == "ppl ratio"]
    if not a.no_causal_lm and not clm_points:
        clm_points = causal_lm_points(a, device)
    png = plot_tradeoff(points + clm_points, md_path.with_suffix(".png"),
                        title="fidelity against speed and attention FLOPs (each point: one model at one length)")
    m = machine_info()
    cmd = "python benchmarks/tradeoff.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [f"# Trade-off: fidelity against speed and attention FLOPs ({kind.upper()})", "",
          f"- machine: {m['cpu']}{', ' + m['gpu'] if m.get('gpu') else ''}; torch {m['torch']} with {a.threads} "
          f"thread(s); device {device}", f"- command: `{cmd.strip()}`", "",
          "all-MiniLM-L6-v2 (6 layers, 12 heads, D = 32). Fidelity: mean cosine similarity of sentence embeddings "
          "to the teacher on held-out stdlib docstrings; the students' values are those recorded by their "
          "distillation runs (source column below), the window alone's are measured here. Speed: the whole "
          "model's forward on a batch of held-out texts, lincomp (compiled kernels) against the stock SDPA "
          "teacher at the same length in the same process. Attention FLOPs: counted from the spec "
          "(`lincomp.ir.cost.estimate`), the rest of the model is the same in both.", "",
          tradeoff_markdown(points, batch=a.batch)]
    if clm_points:
        md += ["## Causal LM (byte-level Llama, Lizard-style, 512 bytes)", "",
               "Fidelity: held-out perplexity / the teacher's (lower is better), recorded in "
               "distill_causal_lm_cpu.md. Speed: an untrained model of the teacher's shape (4 layers, 2 heads, "
               "D = 64) timed here, the weights do not change the time.", "",
               tradeoff_markdown(clm_points, batch=a.batch)]
    md += ["## Sources", ""] + sorted({f"- {p['label']} @ {p['L']}: {p['source']}" for p in points + clm_points
                                      if p["kind"] == "student"})
    if png:
        md += ["", f"![trade-off]({png.name})"]
    atomic_write_text(md_path, "\n".join(md) + "\n")
    atomic_write_text(md_path.with_suffix(".json"), json.dumps(points + clm_points, indent=1) + "\n")
    print(f"wrote {md_path}" + (f" and {png}" if png else ""))
    return 0


def causal_lm_points(a, device: str) -> list:
    """The causal-LM recipe's recorded perplexity ratios, timed on an untrained model of the teacher's shape."""
    import torch

    from lincomp.models import causal_lm as clm
    from lincomp.models.tradeoff import measure_speed, point, window_only_spec

    cfg = clm.TeacherConfig()
    H, D, L = cfg.heads, cfg.hidden_size // cfg.heads, cfg.seq_len
    points, specs = [point("teacher", "teacher", L, 1.0, metric="ppl ratio", H=H, D=D)], {}
    for spec, ratio in causal_lm_recorded(RESULTS / "distill_causal_lm_cpu.md"):
        for kind, s in (("window", window_only_spec(spec)), ("student", spec)):
            label = _label(s) + (" window" if kind == "window" else "")
            points.append(point(label, kind, L, ratio[kind], spec=s, metric="ppl ratio", H=H, D=D,
                                source="recorded: distill_causal_lm_cpu.md"))
            specs[label] = s
    torch.manual_seed(0)
    teacher = clm.tiny_llama(cfg).to(device).eval()
    tokens = {L: torch.randint(0, 256, (a.batch, L), device=device)}
    return measure_speed(points, teacher, specs, tokens, reps=a.reps)


if __name__ == "__main__":
    sys.exit(main())
