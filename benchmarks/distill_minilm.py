"""Distil all-MiniLM-L6-v2 into a window + Hedgehog hybrid; record embedding fidelity to the teacher.

    .venv/bin/python benchmarks/distill_minilm.py                 # the committed table (about 30-40 min on 1 CPU thread)
    .venv/bin/python benchmarks/distill_minilm.py --steps 20      # a quick look
    .venv/bin/python benchmarks/distill_minilm.py --threads 2     # use more cores (default 1: shared machine)

Writes benchmarks/results/distill_minilm_cpu.md (_gpu.md on a GPU) and out/distill/minilm/. An interrupted run
resumes from its checkpoints. Every `lincomp distill minilm` option works here (see its --help).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lincomp.models.distill_cli import benchmark_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(benchmark_main("minilm"))
