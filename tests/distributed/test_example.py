"""examples/distributed_attention.py under torchrun: 2 gloo processes on 127.0.0.1 match one process."""

import os
import re
import subprocess
import sys
from pathlib import Path

from lincomp.distributed import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_example_runs_under_torchrun_and_matches_one_process():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    if os.path.exists("/sys/class/net/lo"):
        env["GLOO_SOCKET_IFNAME"] = "lo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(ROOT / "examples" / "distributed_attention.py"), "--check",
           "--target", "reference"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    err = float(re.search(r"max relative error against one process: (\S+)", out.stdout).group(1))
    assert err <= 1e-5, out.stdout
    assert "rank 1: box" in out.stdout
