"""all-MiniLM-L6-v2 at its 512-token limit with <= 50% of dense attention FLOPs: where the error comes from.

    .venv/bin/python benchmarks/distill_minilm.py --window 64 --feature-dim 32 --length 512 \\
        --finetune-length 512 --steps 60 --finetune-steps 60 --batch-size 4 --extra-text --eval-blocks 32 \\
        --eval-length 512 --eval-length 256 --out out/distill/minilm_w64e32_L512 --threads 1
    .venv/bin/python benchmarks/minilm_512.py --run out/distill/minilm_w64e32_L512

Reads a finished `lincomp distill minilm` run (its results.json and student.safetensors), lists which
operating points fit the FLOPs budget at 512 tokens, and measures per layer (``attention_error_by_layer``)
the student's and the window alone's attention error against the teacher and the teacher's attention mass
outside the window. Writes benchmarks/results/minilm_512_<cpu|gpu>.md.
"""

import argparse
import copy
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from lincomp._atomic import atomic_write_text  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/minilm_512.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, metavar="DIR", help="a finished `lincomp distill minilm` output folder")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--texts", type=int, default=8, help="held-out texts for the per-layer errors (default 8)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default=None)
    a = p.parse_args(argv)

    import torch

    from lincomp.models.distill import load_student
    from lincomp.models.distill_cli import (linearize_student, load_minilm, machine_info, minilm_blocks, minilm_spec,
                                            training_target)
    from lincomp.models.tradeoff import attention_error_by_layer, flops_fraction, window_only_spec
    from lincomp.spec import AttentionSpec

    torch.set_num_threads(a.threads)
    run = Path(a.run)
    r = json.loads((run / "results.json").read_text())
    spec = AttentionSpec.coerce(r["spec"])
    tok, teacher = load_minilm()
    student = load_student(copy.deepcopy(teacher), run / "student.safetensors", target=training_target(teacher))
    window = linearize_student(copy.deepcopy(teacher), window_only_spec(spec))
    x = minilm_blocks(tok, "heldout", a.length, a.texts)
    errs = {"window alone": attention_error_by_layer(window, teacher, x, batch_size=2),
            "student": attention_error_by_layer(student, teacher, x, batch_size=2)}
    m = machine_info()
    L = a.length
    packages = (r["corpus"].get("extra_text") or {}).get("packages")
    text = "stdlib + packages' docstrings" if packages else "stdlib docstrings"
    budget = ["| window | E | attention FLOPs at %d (%% of dense) | within 50%% |" % L, "| --- | --- | --- | --- |"]
    for w in (16, 32, 64, 96):
        for e in (32, 64, 128):
            f = flops_fraction(minilm_spec(w, e), L)
            budget.append(f"| +-{w} | {e} | {100 * f:.0f}% | {'yes' if f <= 0.5 else 'no'} |")
    fid = r["fidelity"]
    rows = ["| eval length | window alone | linearised, before | after stage 1 | after stage 2 | worst text |",
            "| --- | --- | --- | --- | --- | --- |"]
    for Lk, f in fid.items():
        g = lambda k: f"{f[k]['mean']:.4f}" if k in f else "-"  # noqa: E731
        rows.append(f"| {Lk} | {g('window_only')} | {g('before')} | {g('after_attention')} | {g('after_finetune')} | "
                    f"{f['after']['min']:.4f} |")
    layer = ["| layer | teacher attention mass outside the window | window alone: local | student: local | "
             "student: end to end |", "| --- | --- | --- | --- | --- |"]
    for w, s in zip(errs["window alone"], errs["student"]):
        layer.append(f"| {w['layer'].split('.')[2]} | {100 * w['outside']:.1f}% | {w['local']:.3f} | {s['local']:.3f} "
                     f"| {s['end_to_end']:.3f} |")
    md = [f"# all-MiniLM-L6-v2 at {L} tokens within 50% of dense attention FLOPs",
          "", f"- machine: {m['cpu']}; torch {m['torch']} with {a.threads} thread(s)",
          f"- student: `{spec.summary()}` ({100 * flops_fraction(spec, L):.0f}% of dense attention FLOPs at {L} "
          f"tokens), trained by `{run}`: stage 1 {r['steps']} x {r['batch_size']} x {r['corpus']['train_length']} "
          f"tokens, stage 2 {r['finetune_steps']} x {r['batch_size']} x {r['corpus'].get('finetune_length')} tokens, "
          f"seed {r['seed']}, training text: {text}",
          f"- command: `python benchmarks/minilm_512.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
          "## Operating points that fit the budget", "", *budget, "",
          "## Fidelity of the student (mean embedding cosine to the teacher, held-out docstrings)", "", *rows, "",
          f"## Where the error comes from, per layer ({x.shape[0]} held-out texts of {L} tokens)", "",
          "Relative error of the attention output, ||student - softmax|| / ||softmax||: *local* with each layer fed "
          "the teacher's hidden states (that layer's own approximation), *end to end* with the student's own hidden "
          "states (earlier layers' error included). Attention mass outside: the teacher's softmax probability on "
          "keys the window (+ [CLS]) does not cover, averaged over queries and heads; the linear branch has to "
          "carry it.", "", *layer, ""]
    dest = Path(a.results or RESULTS / f"minilm_512_{'gpu' if torch.cuda.is_available() else 'cpu'}.md")
    atomic_write_text(dest, "\n".join(md) + "\n")
    atomic_write_text(dest.with_suffix(".json"), json.dumps(errs, indent=1) + "\n")
    print("\n".join(md))
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
