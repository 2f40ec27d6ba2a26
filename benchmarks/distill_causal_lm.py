"""Train a small byte-level Llama, linearise it Lizard-style, distil; record perplexity and decode memory.

    .venv/bin/python benchmarks/distill_causal_lm.py --sweep-window 8 16 64   # the committed table
    .venv/bin/python benchmarks/distill_causal_lm.py --steps 20 --finetune-steps 5 --out out/quick
    # the teacher that needs far context (identifier-scrambled source, 1024 bytes), with a 4x-length evaluation:
    # (its committed table, one window per run; the teacher is cached in out/distill/causal_lm_scrambled/teacher):
    .venv/bin/python benchmarks/distill_causal_lm.py --teacher scrambled --steps 150 --finetune-steps 100 \
        --batch-size 2 --eval-windows 16 --long-eval 4096 --long-windows 4 \
        --teacher-dir out/distill/causal_lm_scrambled/teacher --out out/distill/causal_lm_scrambled_s150 \
        --sweep-window 64 --results benchmarks/results/distill_causal_lm_scrambled_cpu.md

The teacher trains once (about 15 min at 1 thread on a quiet machine; cached in <out>/teacher); each window
then takes about 30 min at 1 thread. Writes benchmarks/results/distill_causal_lm_cpu.md (_gpu.md on a GPU)
and out/distill/causal_lm[_w<W>]/. An interrupted run resumes from its checkpoints; a finished one only
re-measures. Every `lincomp distill causal-lm` option works here (see its --help), plus --threads N
(default 1: the machine is shared), --results PATH, --sweep-window W... and --compare DIR...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _distill_report import benchmark_main  # noqa: E402  (benchmarks/_distill_report.py)

if __name__ == "__main__":
    sys.exit(benchmark_main("causal_lm"))
