"""The trade-off picture (lincomp.models.tradeoff) and the per-layer error that explains it."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from lincomp.models.distill_cli import causal_lm_spec, linearize_student, minilm_spec
from lincomp.models.tradeoff import (attention_error_by_layer, flops_fraction, plot_tradeoff, point, speedup,
                                     tradeoff_markdown, window_only_spec)

ROOT = Path(__file__).resolve().parents[2]


def test_flops_fraction_follows_the_spec():
    hybrid = minilm_spec(64, 32)
    alone = window_only_spec(hybrid)
    assert flops_fraction(None, 512) == 1.0
    assert alone.linear is None and alone.window == hybrid.window and alone.prefix == hybrid.prefix
    # The window alone costs less than the hybrid; both shrink against dense as the length grows.
    for L in (256, 512, 2048):
        assert flops_fraction(alone, L) < flops_fraction(hybrid, L)
    assert flops_fraction(hybrid, 2048) < flops_fraction(hybrid, 512) < flops_fraction(hybrid, 256)
    assert window_only_spec(causal_lm_spec(window=8)).sinks == 0   # the recipes' untrained baseline


def test_point_rejects_bad_fields():
    with pytest.raises(ValueError, match="kind must be one of"):
        point("x", "dense", 256, 1.0)
    with pytest.raises(ValueError, match="metric must be"):
        point("x", "teacher", 256, 1.0, metric="accuracy")
    with pytest.raises(ValueError, match="no window"):
        window_only_spec(causal_lm_spec(window=8).__class__(causal=True))


def test_markdown_and_plot(tmp_path):
    g = torch.Generator().manual_seed(0)
    t_ms, s_ms, fid = (float(x) for x in torch.rand(3, generator=g) + 0.5)
    pts = [point("student", "student", 512, fid, spec=minilm_spec(64, 32), model_ms=s_ms, teacher_ms=t_ms),
           point("teacher", "teacher", 512, 1.0, model_ms=t_ms, teacher_ms=t_ms),
           point("ppl", "student", 512, 1.05, spec=causal_lm_spec(window=8), metric="ppl ratio", H=2, D=64)]
    assert speedup(pts[0]) == pytest.approx(t_ms / s_ms) and speedup(pts[2]) is None
    md = tradeoff_markdown(pts, batch=2)
    rows = [r for r in md.splitlines() if r.startswith("| 512")]
    assert rows[0].split("|")[2].strip() == "teacher"          # teacher first, then the student
    assert f"{t_ms / s_ms:.2f}x" in rows[1] and f"{100 * pts[0]['flops_fraction']:.0f}%" in rows[1]
    assert "ppl / teacher" in rows[2] and rows[2].rstrip().endswith("| - |")   # no speed measured: no speed-up
    pytest.importorskip("matplotlib")
    png = plot_tradeoff(pts, tmp_path / "sub" / "t.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_attention_error_by_layer(minilm):
    model, tok = minilm
    from lincomp.models.distill_cli import minilm_blocks
    x = minilm_blocks(tok, "heldout", 64, 2)
    rows = {}
    for name, spec in (("narrow", window_only_spec(minilm_spec(4, 8))), ("all", window_only_spec(minilm_spec(64)))):
        student = linearize_student(copy.deepcopy(model), spec, target="reference")
        rows[name] = attention_error_by_layer(student, model, x, batch_size=1)
    narrow, full = rows["narrow"], rows["all"]
    assert len(narrow) == 6 and narrow[0]["layer"].startswith("encoder.layer.0")
    # A window that covers every key is softmax attention: no error, no mass outside.
    assert max(r["local"] for r in full) < 1e-5 and max(r["end_to_end"] for r in full) < 1e-5
    assert max(r["outside"] for r in full) < 1e-6
    # A +-4 window hides real attention mass; the first layer sees the teacher's inputs either way.
    assert all(0.05 < r["outside"] < 1 and r["local"] > 1e-3 for r in narrow)
    assert narrow[0]["end_to_end"] == pytest.approx(narrow[0]["local"], rel=1e-4)


def test_benchmark_reads_the_committed_results():
    spec = importlib.util.spec_from_file_location("lincomp_tradeoff_bench", ROOT / "benchmarks" / "tradeoff.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.minilm_recorded(ROOT / "benchmarks" / "results" / "distill_minilm_cpu.md")
    windows = [s.window.left for s, _, _ in rows]
    assert len(windows) == len(set(windows)) >= 3 and 96 in windows
    assert all(0.5 < f <= 1 for _, fid, _ in rows for f in fid.values()) and all(256 in fid for _, fid, _ in rows)
    clm = bench.causal_lm_recorded(ROOT / "benchmarks" / "results" / "distill_causal_lm_cpu.md")
    assert clm and all(r["window"] >= 1 and r["student"] >= 1 for _, r in clm)
    with pytest.raises(ValueError, match="no '## Nothing' table"):
        bench.recorded_rows(ROOT / "benchmarks" / "results" / "distill_minilm_cpu.md", "Nothing")


def test_forward_times_take_turns_and_keep_the_fastest():
    import time

    from lincomp.models.tradeoff import forward_times_ms

    class Sleeper(torch.nn.Module):
        def __init__(self, seconds):
            super().__init__()
            self.seconds, self.calls = seconds, 0

        def forward(self, input_ids):
            self.calls += 1
            time.sleep(self.seconds)
            return input_ids

    slow, fast = Sleeper(0.02), Sleeper(0.001)
    t = forward_times_ms({"slow": slow, "fast": fast}, torch.zeros(1, 4, dtype=torch.long), reps=3, warmup=1)
    assert slow.calls == fast.calls == 4                       # warm-up + timed calls, the same for each
    assert t["slow"] >= 20 and t["fast"] >= 1 and t["fast"] < t["slow"]
