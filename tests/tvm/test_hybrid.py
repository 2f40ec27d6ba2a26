"""Hybrids: combine="sum" (Lizard: linear + alpha * window with sinks) and combine="shared" (LoLCATs: one
normaliser; the window kernel removes the linear terms of keys inside the window), every window kind."""

import pytest

pytest.importorskip("tvm")

from lincomp import presets  # noqa: E402
from lincomp.spec import AttentionSpec  # noqa: E402

WINDOWS = [{"kind": "1d", "left": 5, "right": 0}, {"kind": "terraced", "block": 4},
           {"kind": "2d", "grid": [5, 6], "radius": 2, "shape": "circle"}]


def test_lizard_preset(check):
    check(presets.lizard(window=8, sinks=4, feature_dim=8), B=2, H=4, Hkv=2, L=53, initial_state=True,
          return_state=True, seed=1)


def test_lolcats_preset(check):
    check(presets.lolcats(block=4, feature_dim=8), B=2, H=2, L=45, initial_state=True, seed=2)


@pytest.mark.parametrize("combine", ["sum", "shared"])
@pytest.mark.parametrize("gate", [None, "scalar", "vector"])
def test_hybrid_windows_and_gates(check, combine, gate):
    """Each gate with a different window kind (all pairs would triple the compile time)."""
    window = {None: 0, "scalar": 1, "vector": 2}[gate]
    fmap = "elu1" if gate != "vector" else "hedgehog"
    spec = AttentionSpec(window=WINDOWS[window], causal=True, prefix=2, sinks=2 if combine == "sum" else 0,
                         linear={"feature_map": fmap, "feature_dim": 6 if fmap == "hedgehog" else None,
                                 "gate": gate, "normalize": True}, combine=combine)
    check(spec, B=1, H=2, L=40, seed=4)


@pytest.mark.parametrize("combine", ["sum", "shared"])
def test_non_causal_hybrids(check, combine):
    spec = AttentionSpec(window={"kind": "2d", "grid": [6, 6], "radius": 2, "shape": "square"}, prefix=3,
                         linear={"feature_map": "relu", "gate": None, "normalize": True}, combine=combine)
    check(spec, H=2, seed=5)


@pytest.mark.filterwarnings("error::lincomp.runtime.kernel.LincompFallbackWarning")   # must run the kernels
@pytest.mark.parametrize("spec, sizes", [
    (presets.lizard(window=8, sinks=2, feature_dim=8), {"H": 4, "Hkv": 2}),
    (presets.lolcats(block=4, feature_dim=8), {}),
    (AttentionSpec(window={"kind": "1d", "left": 4, "right": 3}, linear={"feature_map": "relu", "normalize": True},
                   combine="sum"), {}),
    (presets.gla("vector", chunk_size=8), {}),
], ids=["lizard", "lolcats", "relu-sum", "gla-vector"])
def test_key_padding_mask_on_the_kernels(check, spec, sizes):
    """Padded keys leave the softmax (-inf scores) and the linear sums (zero features); a row whose keys are all
    padded outputs 0 (the check's last batch row)."""
    check(spec, B=3, L=29, seed=11, key_padding=True, **sizes)


@pytest.mark.parametrize("config", [{"block_m": 16, "block_n": 16}, {"block_m": 16, "block_n": 8, "kv_group": 2}])
def test_minilm_shape_shared_hybrid(check, config):
    """The MiniLM demo's shape (non-causal window + a [CLS] prefix + hedgehog, shared normaliser), long enough
    for key tiles the plan marks fully visible (with 2-tile steps their in-window linear terms skip the mask),
    hedgehog E = 12 (the max / sum reductions over E run 6 lanes wide, in two steps), D = 128 (P @ V in column
    blocks)."""
    spec = AttentionSpec(window={"kind": "1d", "left": 20, "right": 20}, prefix=1,
                         linear={"feature_map": "hedgehog", "feature_dim": 12, "normalize": True}, combine="shared")
    check(spec, H=2, L=90, D=128, seed=6, config={"window": config})
