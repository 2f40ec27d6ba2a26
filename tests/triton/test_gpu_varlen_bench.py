"""benchmarks/gpu_varlen.py without a GPU: its correctness part runs in the Triton interpreter and passes."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.interpreter
def test_gpu_varlen_check_runs_and_passes_in_the_interpreter(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_varlen_bench", ROOT / "benchmarks" / "gpu_varlen.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.check_and_time(str(tmp_path), quick=True)
    checks = [r for r in rows if r["section"] == "check"]
    assert [r["case"] for r in checks] == list(mod.CHECK_SPECS)
    assert all(r["ok"] for r in checks), checks
    assert any(r.get("case") == "skipped" for r in rows)         # no CUDA: timings say so
    saved = json.loads((tmp_path / "varlen.json").read_text())
    assert saved["device"] == "cpu (interpreter)" and len(saved["rows"]) == len(rows)
    assert "| check | swa-sinks |" in (tmp_path / "varlen.md").read_text()
    sys.modules.pop("gpu_linear", None)
