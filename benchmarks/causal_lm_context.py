"""Does the byte-level teacher use far context? Teacher vs the same teacher restricted to a sliding window.

    .venv/bin/python benchmarks/causal_lm_context.py --teacher scrambled        # the committed table

Trains (or loads, from <out>/teacher, the folder `benchmarks/distill_causal_lm.py --teacher T --out <out>`
uses) the teacher, then measures held-out perplexity of the teacher and of the teacher with its attention cut
to a causal window of W keys (no training), at the training length and at 4x it, by position. Writes
benchmarks/results/causal_lm_context_<teacher>_cpu.md. 1 torch thread by default (the machine is shared).
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lincomp._atomic import atomic_write_text  # noqa: E402
from lincomp.models import causal_lm as clm  # noqa: E402
from lincomp.models.corpus import corpus_info  # noqa: E402
from lincomp.models.distill_cli import context_use, machine_info  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", choices=sorted(clm.TEACHERS), default="scrambled")
    p.add_argument("--out", default=None, help="default out/distill/causal_lm_<teacher>")
    p.add_argument("--windows", type=int, nargs="+", default=[16, 64, 128, 256])
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows at the training length")
    p.add_argument("--long-factor", type=int, default=4, help="also evaluate at this multiple of the length")
    p.add_argument("--long-windows", type=int, default=16, help="held-out windows at the long length")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = clm.TEACHERS[a.teacher]
    out = Path(a.out or f"out/distill/causal_lm_{a.teacher}")
    t0 = time.perf_counter()
    teacher, info = clm.train_teacher(cfg, out / "teacher")
    heldout = clm.corpus_tokens("heldout", data=cfg.data)
    runs = {}
    for n, count in ((cfg.seq_len, a.eval_windows), (a.long_factor * cfg.seq_len, a.long_windows)):
        runs[n] = {"count": count, **context_use(teacher, clm.eval_windows(heldout, n, count), a.windows)}
    r = {"teacher": {k: v for k, v in info.items() if k != "history"}, "name": a.teacher, "runs": runs,
         "machine": machine_info(), "corpus": corpus_info(), "heldout_bytes": int(heldout.numel()),
         "wall_s": time.perf_counter() - t0}
    atomic_write_text(out / "context_use.json", json.dumps(r, indent=2, default=str) + "\n")
    cmd = "python benchmarks/causal_lm_context.py " + " ".join(sys.argv[1:] if argv is None else argv)
    dest = Path(a.results or ROOT / "benchmarks" / "results" / f"causal_lm_context_{a.teacher}_cpu.md")
    atomic_write_text(dest, markdown(r, cmd.strip()))
    print(dest.read_text() if dest.exists() else "", f"wrote {dest}", sep="\n")
    return 0


def markdown(r: dict, cmd: str) -> str:
    t, m, c = r["teacher"], r["machine"], r["corpus"]
    cfg = t["config"]
    lines = [f"# Does the byte-level teacher `{r['name']}` use far context?", "",
             f"- machine: {m['cpu']}; torch {m['torch']} with {m['torch_threads']} thread(s); Python {m['python']}",
             f"- teacher: {cfg['layers']} layers x {cfg['hidden_size']} hidden, {cfg['heads']} heads; "
             f"{cfg['steps']} steps of {cfg['batch_size']} x {cfg['seq_len']} bytes (lr {cfg['lr']}, seed "
             f"{cfg['seed']}) on {t['train_tokens']} bytes of the stdlib source ({cfg['data']}); trained in "
             f"{t['wall_s']:.0f} s",
             f"- corpus: Python {c['python']} stdlib ({c['files']} files, {c['files_heldout']} held out by path "
             f"hash, sha256 {c['sha256']}); held-out text {r['heldout_bytes']} bytes",
             f"- command: `{cmd}` ({r['wall_s']:.0f} s)", "",
             "Held-out perplexity (bytes) of the teacher and of the same weights with attention cut to a causal "
             "sliding window of W keys (no training). \"< b\" / \">= b\": predicted positions before / from "
             "byte b of each window.", ""]
    for n, run in r["runs"].items():
        buckets = [k for k in run["teacher"] if k != "perplexity"]
        head = ["model", "perplexity", "/ teacher"] + [f"{k.replace('before_', '< ').replace('from_', '>= ')}"
                                                       for k in buckets]
        lines += [f"## Windows of {n} bytes ({run['count']} held-out windows)", "",
                  "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        tp = run["teacher"]["perplexity"]
        rows = [("teacher", run["teacher"])] + [(f"window {w} alone", v) for w, v in run["windows"].items()]
        for name, v in rows:
            lines.append(f"| {name} | {v['perplexity']:.4f} | {v['perplexity'] / tp:.4f} | "
                         + " | ".join(f"{v[k]:.4f}" for k in buckets) + " |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
