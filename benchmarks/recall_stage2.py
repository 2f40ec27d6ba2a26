"""Stage-2 settings of the recall recipe on a cached teacher: one Lizard student, scored at 1024 tokens.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/recall_stage2.py --run /tmp/recall/real/r4s0 \\
        --finetune-steps 800 --finetune-lr 3e-3 --train-pairs 32 --tag g

``--run``: a finished ``lincomp distill recall`` folder (its ``teacher/`` and ``data/eval_p<n>_L1024``).
Stage 1 is the recipe's up to commit 55bfb94 (200 steps at 256 tokens on rows with 8 and 32 pairs, cached in
``--cache`` so that stage-2 settings can be compared on the same stage-1 student); stage 2 trains LoRA + the
learned parts with the answer loss at ``--finetune-length`` on rows with ``--train-pairs`` pairs. Prints the
near / far accuracy after each stage and writes ``<cache>/<tag>.json``. The results: benchmarks/results/recall_cpu.md.
"""

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    import torch
    from transformers import LlamaForCausalLM

    from lincomp import presets
    from lincomp.models import recall as R
    from lincomp.models.distill import distill, learned_named_parameters
    from lincomp.models.distill_cli import linearize_student

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--cache", default="/tmp/recall_stage2")
    p.add_argument("--feature-dim", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--finetune-steps", type=int, default=400)
    p.add_argument("--finetune-lr", type=float, default=2e-3)
    p.add_argument("--finetune-length", type=int, default=1024)
    p.add_argument("--train-pairs", default="8,32", help="comma-separated pairs counts of the stage-2 rows")
    p.add_argument("--eval-pairs", default="32")
    p.add_argument("--tag", default="run")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    os.makedirs(a.cache, exist_ok=True)
    teacher = LlamaForCausalLM.from_pretrained(f"{a.run}/teacher").eval()
    vocab = R.RecallTeacherConfig(seed=0).vocab
    evals = {int(n): R.load_dataset(f"{a.run}/data/eval_p{n}_L1024.safetensors")[0] for n in a.eval_pairs.split(",")}
    torch.manual_seed(0)
    student = linearize_student(copy.deepcopy(teacher), presets.lizard(window=64, feature_dim=a.feature_dim))
    ck = Path(a.cache) / f"s1_fd{a.feature_dim}_s{a.steps}_l256_lr0.01_bs4_m4.pt"
    if ck.exists():    # the same stage 1 as a run before: compare stage-2 settings on one stage-1 student
        saved = torch.load(ck)
        with torch.no_grad():
            for k, v in learned_named_parameters(student).items():
                v.copy_(saved[k])
    else:
        distill(student, teacher, R.batches([8, 32], 256, 4, seed=1, vocab=vocab), attention_steps=a.steps,
                lr=1e-2, seed=0, progress=False)
        torch.save({k: v.detach().clone() for k, v in learned_named_parameters(student).items()}, ck)

    def score(stage):
        out = {n: R.query_accuracy(student, b, 64) for n, b in evals.items()}
        print(a.tag, stage, {n: {"near": round(o["near"], 3), "far": round(o["far"], 3)} for n, o in out.items()},
              flush=True)
        return out

    score("after_attention")
    t0 = time.perf_counter()
    pairs = [int(x) for x in a.train_pairs.split(",")]
    data = R.batches([n for n in pairs if 4 * n <= a.finetune_length], a.finetune_length, 4, seed=1, vocab=vocab)
    res = distill(student, teacher, data, attention_steps=0, finetune_steps=a.finetune_steps,
                  finetune_lr=a.finetune_lr, task_loss="lm", seed=0, progress=False, log_every=25)
    for h in res.history["finetune"][::4]:
        print(h["step"], round(h["loss"], 3), round(h["elapsed_s"], 1))
    out = score("after_finetune")
    (Path(a.cache) / f"{a.tag}.json").write_text(json.dumps({"args": vars(a), "accuracy": out,
                                                             "finetune_s": time.perf_counter() - t0}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
