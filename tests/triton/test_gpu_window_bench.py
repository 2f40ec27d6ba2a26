"""CPU-safe parts of benchmarks/gpu_window.py: analytic pair counts, FLOPs, tables, the no-GPU path."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given

from lincomp.reference import window_mask
from lincomp.testing import spec_strategy

ROOT = Path(__file__).resolve().parents[2]




def _load():
    spec = importlib.util.spec_from_file_location("gpu_window_bench", ROOT / "benchmarks" / "gpu_window.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BENCH = _load()


@pytest.fixture(scope="module")
def bench():
    return BENCH


@given(spec=spec_strategy(windows=("1d", "terraced", "2d", "3d", None), linear=False, hybrids=False,
                          max_prefix=7, max_grid=9))
def test_useful_pairs_equal_the_mask_count(spec):
    b = BENCH
    for L in ([spec.expected_length()] if spec.expected_length() else [1, 13, 40]):
        assert b.useful_pairs(spec, L) == int(window_mask(spec, L).sum()), (spec, L)


def test_benchmark_specs_pair_counts(bench):
    # sliding window w at L: w keys per row except the first w - 1 rows
    spec = bench.swa_spec(1024)
    L = 131072
    assert bench.useful_pairs(spec, L) == 1024 * L - 1024 * 1023 // 2
    # CLEAR on 256^2 + 512: runs in O(r^2), checked against a mask on a smaller grid
    small = bench.clear_spec(8, 40, prefix=20)
    assert bench.useful_pairs(small, 1620) == int(window_mask(small, 1620).sum())
    big = bench.useful_pairs(bench.clear_spec(32, 256), 256 * 256 + 512)
    assert 0 < big < (256 * 256 + 512) ** 2
    assert bench.flops(10, 1, 2, 128, False) == 4 * 128 * 10 * 2
    assert bench.flops(10, 1, 2, 128, True) == 4 * 128 * 10 * 2 * 3.5


def test_table_writing_and_summary(bench, tmp_path):
    rows = [{"family": "window", "case": "swa w=128 L=8K", "pass": "check", "dtype": "bfloat16",
             "max_rel_err": 3e-3, "ok": True},
            {"family": "window", "kind": "1d", "case": "swa w=128 L=8K", "pass": "fwd", "L": 8192, "density": 0.015,
             "lincomp_ms": 0.5, "flex_ms": 0.6, "sdpa_ms": 2.0, "lincomp_tflops": 300.0, "flex_tflops": 250.0,
             "sdpa_tflops": 350.0, "vs_flex": 1.2, "goal_vs_flex": 1.1, "vs_sdpa": 0.86, "goal_met": True,
             "err_vs_flex": 1e-3, "config": {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3},
             "device": "NVIDIA H100 80GB HBM3"},
            {"family": "window", "kind": "2d", "case": "clear r=8", "pass": "fwd+bwd", "vs_flex": 2.0,
             "vs_sdpa": 0.5, "goal_met": False},
            {"family": "window", "kind": "2d", "case": "clear r=32", "error": "RuntimeError: boom"},
            {"family": "window", "case": "clear r=16", "skipped": "time budget"}]
    rows.append({"family": "window", "case": "summary", "summary": bench.summarize(rows)})
    jpath, mpath = bench.write_table(rows, str(tmp_path / "out"))
    assert json.loads(jpath.read_text())[1]["lincomp_ms"] == 0.5
    text = mpath.read_text()
    assert "NVIDIA H100" in text and "| swa w=128 L=8K | fwd |" in text and "block_m=128" in text
    assert "boom" in text and "time budget" in text and "| NO |" in text
    s = rows[-1]["summary"]
    assert s["goals met"] == "1/2" and abs(s["1d fwd vs flex (geomean)"] - 1.2) < 1e-9


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_check_and_time_without_a_gpu(bench, tmp_path):
    rows = bench.check_and_time(str(tmp_path), quick=True)
    assert rows and rows[0]["skipped"] == "no CUDA device"
    assert (tmp_path / "window.md").exists()


def test_flex_mask_mods_match_the_spec(bench):
    """The FlexAttention peer runs the IR's mask_mod of each benchmarked spec."""
    mask_for = bench._peers()["mask_for"]
    for spec in (bench.swa_spec(7), bench.clear_spec(3, 7, prefix=11)):
        L = spec.expected_length() or 60
        idx = torch.arange(L)
        got = mask_for(spec)(0, 0, idx[:, None], idx[None, :])
        assert torch.equal(got, window_mask(spec, L)), spec
