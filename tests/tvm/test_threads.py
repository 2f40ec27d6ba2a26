"""TVM kernels' parallel loops on torch's OpenMP threads (lincomp.lower.tvmir.threads): same results as
TVM's own pool at every thread count, the pool choice is checked, and the status line names the pool."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("tvm")

import lincomp  # noqa: E402
from lincomp import presets  # noqa: E402
from lincomp.lower.tvmir import threads  # noqa: E402
from lincomp.reference import reference  # noqa: E402
from lincomp.testing import random_inputs, rel_err  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SPECS = {"window": presets.sliding_window(24, sinks=2), "gla": presets.gla("vector")}

CHILD = textwrap.dedent("""
    import sys, torch, lincomp
    from lincomp import presets
    from lincomp.lower.tvmir import threads
    from lincomp.testing import random_inputs
    spec = {spec}
    x = random_inputs(spec, B=2, H=3, L=200, D=16, seed=5)
    with torch.no_grad():
        o = lincomp.compile(spec, target="tvm")(**x)
    torch.save(o, sys.argv[1])
    print(threads.status())
""")

SPEC_EXPR = {"window": "presets.sliding_window(24, sinks=2)", "gla": 'presets.gla("vector")'}

needs_openmp = pytest.mark.skipif(threads.openmp_runtime() is None,
                                  reason="torch loaded no OpenMP runtime to share")


def _run(spec):
    x = random_inputs(spec, B=2, H=3, L=200, D=16, seed=5)
    with torch.no_grad():
        return lincomp.compile(spec, target="tvm")(**x), x


@needs_openmp
@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_thread_count_gives_the_same_bits(name):
    spec = SPECS[name]
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            o, x = _run(spec)
            outs.append(o)
    finally:
        torch.set_num_threads(before)
    assert "OpenMP" in threads.status()
    ref = reference(spec, **{k: t.double() if t.is_floating_point() else t for k, t in x.items()})
    assert rel_err(outs[0], ref) <= 1e-4
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


@needs_openmp
@pytest.mark.parametrize("name", sorted(SPECS))
def test_openmp_and_tvm_pools_agree_bit_for_bit(name, tmp_path):
    outs = {}
    for pool in ("auto", "tvm"):
        env = dict(os.environ, PYTHONPATH=str(ROOT), LINCOMP_TVM_POOL=pool)
        path = tmp_path / f"{pool}.pt"
        res = subprocess.run([sys.executable, "-c", CHILD.format(spec=SPEC_EXPR[name]), str(path)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        outs[pool] = (torch.load(path), res.stdout.strip().splitlines()[-1])
    assert "OpenMP" in outs["auto"][1]
    assert "LINCOMP_TVM_POOL=tvm" in outs["tvm"][1]
    assert torch.equal(outs["auto"][0], outs["tvm"][0])


def test_bad_pool_choice_names_the_variable(monkeypatch):
    monkeypatch.setenv(threads.ENV, "gomp")
    with pytest.raises(ValueError, match="LINCOMP_TVM_POOL"):
        threads.choice()
