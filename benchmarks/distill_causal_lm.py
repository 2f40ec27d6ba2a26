"""Train a small byte-level Llama, linearise it Lizard-style, distil; record perplexity and decode memory.

    .venv/bin/python benchmarks/distill_causal_lm.py                 # the committed table (about 1 h on 1 CPU thread, teacher included)
    .venv/bin/python benchmarks/distill_causal_lm.py --steps 20      # a quick look
    .venv/bin/python benchmarks/distill_causal_lm.py --threads 2     # use more cores (default 1: shared machine)

Writes benchmarks/results/distill_causal_lm_cpu.md (_gpu.md on a GPU) and out/distill/causal_lm/. An interrupted run
resumes from its checkpoints. Every `lincomp distill causal-lm` option works here (see its --help).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lincomp.models.distill_cli import benchmark_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(benchmark_main("causal_lm"))
