"""The generated window kernels compile for an H100 (sm_90) on this CPU-only machine.

Triton's full compiler (with its bundled ptxas) runs on the exact launch arguments (in a clean
subprocess), so code that only the interpreter accepts, shared-memory overflows and register spills
are caught without a GPU.
"""

import pytest

pytest.importorskip("triton")

from lincomp.lower.triton import window_launch as W  # noqa: E402
from lincomp.lower.triton.aot import compile_cases  # noqa: E402
from lincomp.presets import clear, sliding_window  # noqa: E402
from lincomp.spec import AttentionSpec, GridWindow  # noqa: E402

H100_SHARED = 232448   # bytes of shared memory per block on sm_90


def _assert_fits(rows, n_cases, max_spill=0):
    assert {r["case"] for r in rows} == set(range(n_cases))
    bad = [r for r in rows if "error" in r or r["shared"] > H100_SHARED or r["spill_bytes"] > max_spill]
    assert not bad, "\n".join(map(str, bad))


def test_heuristic_configs_compile_for_sm90_without_spills():
    specs = [
        (AttentionSpec(window={"kind": "1d", "left": 127, "right": 0}, causal=True, sinks=4), 128, True),
        (clear(8, (32, 32), 512), 128, False),
        (clear(16, (32, 32), 512), 128, False),
        (AttentionSpec(window=GridWindow((4, 8, 8), 2, "square"), prefix=16), 256, False),
        (AttentionSpec(causal=True), 64, False),
    ]
    cases = [{"spec": s.to_dict(), "kernel": k, "D": D, "sinks": extra, "kpm": extra}
             for s, D, extra in specs for k in W.KERNELS]
    rows = compile_cases(cases)
    _assert_fits(rows, len(cases))
    assert {r["name"] for r in rows} == {"window_fwd", "window_bwd_delta", "window_bwd_dq", "window_bwd_dkdv"}


@pytest.mark.slow
def test_every_search_space_config_compiles_for_sm90_without_spills():
    cases = [{"spec": s.to_dict(), "kernel": k, "D": D, "config": cfg}
             for s in (sliding_window(1024), clear(16, (32, 32), 512)) for D in (64, 128, 256)
             for k in W.KERNELS for cfg in W.search_space(k, s, D, D)]
    _assert_fits(compile_cases(cases), len(cases), max_spill=64)   # a few spilled bytes are harmless
