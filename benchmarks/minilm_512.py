"""all-MiniLM-L6-v2 at its 512-token limit with <= 50% of dense attention FLOPs: where the error comes from.

    .venv/bin/python benchmarks/distill_minilm.py --window 64 --feature-dim 32 --length 512 \\
        --finetune-length 512 --steps 60 --finetune-steps 60 --batch-size 4 --extra-text --eval-blocks 32 \\
        --eval-length 512 --eval-length 256 --out out/distill/minilm_w64e32_L512 --threads 1
    .venv/bin/python benchmarks/minilm_512.py --run out/distill/minilm_w64e32_L512
    .venv/bin/python benchmarks/minilm_512.py --window 64          # the window alone, no trained student

Lists which operating points fit the FLOPs budget at 512 tokens and measures per layer
(``attention_error_by_layer``) the teacher's attention mass outside the window and the window alone's attention
error, at 256 and 512 tokens; with --run (a finished `lincomp distill minilm` folder: results.json and
student.safetensors) the student's error too. Writes benchmarks/results/minilm_512_<cpu|gpu>.md.
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
    p.add_argument("--run", default=None, metavar="DIR",
                   help="a finished `lincomp distill minilm` output folder: its student joins the per-layer table")
    p.add_argument("--window", type=int, default=64, help="window each side when there is no --run (default 64)")
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512])
    p.add_argument("--texts", type=int, default=8, help="held-out texts per length (default 8)")
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
    r = json.loads((Path(a.run) / "results.json").read_text()) if a.run else None
    spec = AttentionSpec.coerce(r["spec"]) if r else minilm_spec(a.window, 32)
    tok, teacher = load_minilm()
    models = {"window alone": linearize_student(copy.deepcopy(teacher), window_only_spec(spec))}
    if r:
        models["student"] = load_student(copy.deepcopy(teacher), Path(a.run) / "student.safetensors",
                                         target=training_target(teacher))
    errs = {}
    for L in a.lengths:
        x = minilm_blocks(tok, "heldout", L, a.texts)
        for name, model in models.items():
            errs[f"{name} @ {L}"] = attention_error_by_layer(model, teacher, x, batch_size=2)
            print(f"{name} @ {L}: " + ", ".join(f"{e['local']:.3f}" for e in errs[f"{name} @ {L}"]), flush=True)
    m = machine_info()
    Lmax = max(a.lengths)
    budget = [f"| window | E | attention FLOPs at {Lmax} (% of dense) | within 50% |", "| --- | --- | --- | --- |"]
    for w in (16, 32, 64, 96):
        for e in (32, 64, 128):
            f = flops_fraction(minilm_spec(w, e), Lmax)
            budget.append(f"| +-{w} | {e} | {100 * f:.0f}% | {'yes' if f <= 0.5 else 'no'} |")
    md = [f"# all-MiniLM-L6-v2 at {Lmax} tokens within 50% of dense attention FLOPs", "",
          f"- machine: {m['cpu']}; torch {m['torch']} with {a.threads} thread(s)",
          f"- window: +-{spec.window.left} + [CLS] (`{window_only_spec(spec).summary()}`)",
          f"- command: `python benchmarks/minilm_512.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
          "## Operating points that fit the budget", "", *budget, ""]
    if r:
        packages = (r["corpus"].get("extra_text") or {}).get("packages")
        md += [f"## Student `{spec.summary()}` ({100 * flops_fraction(spec, Lmax):.0f}% of dense at {Lmax})", "",
               f"Trained by `{a.run}`: stage 1 {r['steps']} x {r['batch_size']} x {r['corpus']['train_length']} "
               f"tokens, stage 2 {r['finetune_steps']} steps, seed {r['seed']}, "
               f"{'stdlib + packages' if packages else 'stdlib'} docstrings. Mean embedding cosine: "
               + ", ".join(f"{f['after']['mean']:.4f} at {L} tokens" for L, f in r["fidelity"].items()) + ".", ""]
    md += [f"## Where the error comes from, per layer ({a.texts} held-out texts per length)", "",
           "*Outside*: the teacher's softmax probability on keys the window (+ [CLS]) does not cover, averaged over "
           "queries and heads: the share of attention the linear branch has to carry. *Local*: relative error "
           "||output - softmax|| / ||softmax|| of the layer fed the teacher's hidden states (its own approximation); "
           "*end to end*: the same with the model's own hidden states (earlier layers' error included).", "",
           "| model @ length | " + " | ".join(f"layer {i}" for i in range(len(next(iter(errs.values()))))) + " |",
           "|" + " --- |" * (1 + len(next(iter(errs.values()))))]
    for key, rows in errs.items():
        if key.startswith("window alone"):
            md.append(f"| outside the window @ {key.split('@')[1].strip()} | "
                      + " | ".join(f"{100 * e['outside']:.1f}%" for e in rows) + " |")
        md.append(f"| {key}: local | " + " | ".join(f"{e['local']:.3f}" for e in rows) + " |")
        md.append(f"| {key}: end to end | " + " | ".join(f"{e['end_to_end']:.3f}" for e in rows) + " |")
    md += [""] + mixed_layers(teacher, tok, Lmax, a.texts * 2)
    dest = Path(a.results or RESULTS / f"minilm_512_{'gpu' if torch.cuda.is_available() else 'cpu'}.md")
    atomic_write_text(dest, "\n".join(md) + "\n")
    atomic_write_text(dest.with_suffix(".json"), json.dumps(errs, indent=1) + "\n")
    print("\n".join(md))
    print(f"wrote {dest}")
    return 0


# (window each side, layers left on exact softmax): the window alone elsewhere, no training
MIXED = ((64, ()), (64, (5,)), (64, (0, 5)), (32, (0, 5)), (96, (0, 5)))


def mixed_layers(teacher, tok, L: int, texts: int) -> list:
    """Markdown rows: embedding cosine at ``L`` tokens when the layers that look furthest beyond the window stay
    on softmax and the others run the window alone (no training), with the FLOPs share of the mix."""
    from lincomp.models import linearize
    from lincomp.models.distill import embedding_fidelity
    from lincomp.models.distill_cli import minilm_blocks, minilm_spec
    from lincomp.models.tradeoff import flops_fraction, window_only_spec

    x = minilm_blocks(tok, "heldout", L, texts)
    out = [f"## Softmax where the window sees least ({texts} held-out texts of {L} tokens, no training)", "",
           "| window elsewhere | layers on exact softmax | attention FLOPs (% of dense) | mean cosine | worst text |",
           "| --- | --- | --- | --- | --- |"]
    for w, soft in MIXED:
        spec = window_only_spec(minilm_spec(w))
        plan = {f"encoder.layer.{i}.attention.self": None if i in soft else spec for i in range(6)}
        f = embedding_fidelity(linearize(copy.deepcopy(teacher), plan, target="auto"), teacher, x)
        share = sum(1.0 if i in soft else flops_fraction(spec, L) for i in range(6)) / 6
        out.append(f"| +-{w} | {', '.join(map(str, soft)) or 'none'} | {100 * share:.0f}% | {f['mean']:.4f} | "
                   f"{f['min']:.4f} |")
        print(out[-1], flush=True)
    return out + [""]


if __name__ == "__main__":
    sys.exit(main())
