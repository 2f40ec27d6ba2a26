"""Distil all-MiniLM-L6-v2 into a window + Hedgehog hybrid; record embedding fidelity to the teacher.

    .venv/bin/python benchmarks/distill_minilm.py               # the committed table (about 45 min with --threads 2)
    .venv/bin/python benchmarks/distill_minilm.py --steps 20 --finetune-steps 0 --out out/quick   # a quick look
    .venv/bin/python benchmarks/distill_minilm.py --window 16 --feature-dim 32 --finetune-steps 150 \
        --out out/distill/minilm_w16e32                         # the smaller-window comparison row
    .venv/bin/python benchmarks/distill_minilm.py --compare out/distill/minilm_w16e32   # both in one table

Writes benchmarks/results/distill_minilm_cpu.md (_gpu.md on a GPU) and out/distill/minilm/. An interrupted
run resumes from its checkpoints; a finished one only re-measures. Every `lincomp distill minilm` option
works here (see its --help), plus --threads N (default 1: the machine is shared), --results PATH,
--sweep-window W... and --compare DIR...
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _distill_report import benchmark_main  # noqa: E402  (benchmarks/_distill_report.py)

if __name__ == "__main__":
    sys.exit(benchmark_main("minilm"))
