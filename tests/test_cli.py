"""The lincomp command as a user runs it (a subprocess): --version, and one style of user error everywhere:
``lincomp CMD: error: MESSAGE`` on stderr, exit status 2, no traceback."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lincomp
from lincomp import cli

ROOT = Path(__file__).resolve().parents[1]


def _lincomp(*argv, timeout=300, **extra_env):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **extra_env)
    env.pop("LINCOMP_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "lincomp.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=timeout)


def test_version():
    out = _lincomp("--version")
    assert out.returncode == 0 and out.stdout.startswith(f"lincomp {lincomp.__version__} ")


@pytest.mark.parametrize("argv, message", [
    (["explain", "no-such-preset"], "lincomp explain: error: 'no-such-preset' is not a preset"),
    (["db", "show", "--db", "/no/such/folder"], "lincomp db show: error: --db /no/such/folder: no such folder"),
    (["db", "validate", "--db", "/no/such/folder"], "lincomp db validate: error: --db /no/such/folder"),
    (["distill", "minilm", "--steps", "-3"], "lincomp distill minilm: error: argument --steps: -3 must be >= 0"),
    (["distill", "causal-lm", "--lr", "0"], "lincomp distill causal-lm: error: argument --lr: 0 must be > 0"),
    (["explain"], "error:"),
], ids=["explain-preset", "db-show", "db-validate", "distill-steps", "distill-lr", "explain-no-spec"])
def test_user_errors_exit_2_without_traceback(argv, message):
    out = _lincomp(*argv)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_distill_on_a_missing_device_is_a_user_error():
    out = _lincomp("distill", "causal-lm", "--device", "cuda", "--steps", "1")
    assert out.returncode == 2 and "no CUDA device" in out.stderr and "Traceback" not in out.stderr


def test_run_maps_user_errors_and_keeps_bugs(monkeypatch, capsys):
    def failing(exc):
        return argparse.Namespace(command="explain", func=lambda a: (_ for _ in ()).throw(exc))

    monkeypatch.delenv("LINCOMP_DEBUG", raising=False)
    assert cli.run_command(failing(ValueError("window.left must be >= 0"))) == 2
    assert capsys.readouterr().err.strip() == "lincomp explain: error: window.left must be >= 0"
    assert cli.run_command(failing(SystemExit("lincomp explain: already phrased"))) == 2
    assert capsys.readouterr().err.strip() == "lincomp explain: already phrased"
    with pytest.raises(RuntimeError):                # a bug keeps its traceback
        cli.run_command(failing(RuntimeError("internal")))
    with pytest.raises(SystemExit):                  # argparse's own exits (status codes) pass through
        cli.run_command(failing(SystemExit(0)))
    monkeypatch.setenv("LINCOMP_DEBUG", "1")
    with pytest.raises(ValueError):
        cli.run_command(failing(ValueError("shown with its traceback")))


def test_tune_budget_keeps_the_best_and_says_where_results_went(tmp_path):
    pytest.importorskip("tvm")
    db = tmp_path / "db"
    out = _lincomp("tune", "gla-scalar", "--target", "tvm", "-L", "64", "--heads", "1", "--dim", "16",
                   "--budget", "0.001s", timeout=600, LINCOMP_TUNING_DB=str(db))
    assert out.returncode == 0, out.stderr
    assert "time budget ran out" in out.stdout and f"results stored in {db}" in out.stdout
    assert max(len(line) for line in out.stdout.splitlines() if str(db) not in line) <= 100
    assert list(db.glob("*.json"))                      # the best found so far was stored


@pytest.mark.parametrize("budget", ["0", "-5s", "soon", "infm"])
def test_tune_budget_bad_values_are_usage_errors(budget):
    out = _lincomp("tune", "gla-scalar", "--budget", budget)
    assert out.returncode == 2 and "--budget" in out.stderr and "Traceback" not in out.stderr
