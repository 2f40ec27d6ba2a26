"""The generated window kernels compile for an H100 (sm_90) on this CPU-only machine.

Triton's full compiler (with its bundled ptxas) runs on the exact launch arguments, so code that only
the interpreter accepts, shared-memory overflows and register spills are caught without a GPU.
"""

import pytest
import torch

pytest.importorskip("triton")

from lincomp.lower.triton import window as W  # noqa: E402
from lincomp.lower.triton.aot import compile_launch  # noqa: E402
from lincomp.presets import clear, sliding_window  # noqa: E402
from lincomp.spec import AttentionSpec, GridWindow  # noqa: E402

H100_SHARED = 232448   # bytes of shared memory per block on sm_90


def _launches(spec, kernel, cfg, D, dtype=torch.bfloat16, sinks=False, kpm=False, Hkv=2):
    L = spec.expected_length() or 1024
    q = torch.randn(1, 4, L, D, dtype=dtype)
    k, v = torch.randn(1, Hkv, L, D, dtype=dtype), torch.randn(1, Hkv, L, D, dtype=dtype)
    sink = torch.randn(4, spec.sinks) if sinks else None
    mask = torch.ones(1, L, dtype=torch.bool) if kpm else None
    mod = W.load_kernels(spec, mode="jit")
    if kernel == "window_fwd":
        return [W.forward_launch(mod, spec, q, k, v, sink, mask, 0.1, cfg)[0]]
    o, lse = torch.randn_like(q), torch.randn(1, 4, L)
    return W.backward_launches(mod, spec, o, q, k, v, o, lse, lse, mask, 0.1, cfg)[0]


def _check(launches):
    for launch in launches:
        info = compile_launch(launch, arch=90)
        assert info["shared"] <= H100_SHARED, info
        assert info["spill_bytes"] == 0, info


CASES = {
    "swa-128-sinks-kpm": (AttentionSpec(window={"kind": "1d", "left": 127, "right": 0}, causal=True, sinks=4), 128),
    "clear-r8": (clear(8, (32, 32), 512), 128),
    "clear-r16": (clear(16, (32, 32), 512), 128),
    "3d-d256": (AttentionSpec(window=GridWindow((4, 8, 8), 2, "square"), prefix=16), 256),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kernel", W.KERNELS)
def test_heuristic_configs_compile_for_sm90(case, kernel):
    spec, D = CASES[case]
    extra = {"sinks": True, "kpm": True} if "sinks" in case else {}
    _check(_launches(spec, kernel, W.heuristic_config(kernel, spec, D, D), D, **extra))


@pytest.mark.slow
@pytest.mark.parametrize("spec", [sliding_window(1024), clear(16, (32, 32), 512)], ids=["swa", "clear"])
@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("kernel", W.KERNELS)
def test_every_search_space_config_compiles_for_sm90(spec, D, kernel):
    for cfg in W.search_space(kernel, spec, D, D):
        _check(_launches(spec, kernel, cfg, D)[-2:])
