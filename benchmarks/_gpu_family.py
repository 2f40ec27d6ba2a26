"""What every GPU family script shares: correctness first, timings on CUDA only, tables written."""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

import torch


def run_family(name: str, title: str, check, time_all, out_dir: str, quick: bool, table) -> list:
    """Rows of ``check(device, quick)`` then ``time_all(device, quick)`` (CUDA only), written to
    ``<out_dir>/<name>.md`` and ``.json``. Without CUDA the check runs in the Triton interpreter."""
    t0 = time.time()
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before lincomp generates and imports kernels
    device = torch.device("cuda" if cuda else "cpu")
    rows = check(device, quick)
    if cuda:
        try:
            rows += time_all(device, quick)
        except Exception as e:  # keep the correctness rows even when timing breaks
            rows.append({"section": "timing", "case": "all", "error": f"{type(e).__name__}: {e}"[:300]})
            traceback.print_exc()
    else:
        rows.append({"section": "timing", "case": "skipped",
                     "note": "no CUDA device: correctness ran in the Triton interpreter only"})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu (interpreter)"
    (out / f"{name}.md").write_text(f"# {title} on {gpu} ({time.time() - t0:.0f} s)\n\n" + table(rows) + "\n")
    (out / f"{name}.json").write_text(json.dumps({"device": gpu, "rows": rows}, indent=1, default=str))
    return rows
