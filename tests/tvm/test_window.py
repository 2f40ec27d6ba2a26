"""TVM window kernels (block-sparse softmax) against the fp64 reference: every window kind, prefix tokens,
sinks, GQA, causal and not, odd lengths, several tile configs."""

import pytest

pytest.importorskip("tvm")

from lincomp import presets  # noqa: E402
from lincomp.spec import AttentionSpec  # noqa: E402

WINDOWS = {
    "1d": {"kind": "1d", "left": 6, "right": 2},
    "1d-causal-swa": {"kind": "1d", "left": 7, "right": 0},
    "terraced": {"kind": "terraced", "block": 4},
    "2d-circle": {"kind": "2d", "grid": [5, 7], "radius": 3, "shape": "circle"},
    "2d-square": {"kind": "2d", "grid": [6, 5], "radius": 1, "shape": "square"},
    "3d-circle": {"kind": "3d", "grid": [2, 3, 5], "radius": 2, "shape": "circle"},
    "3d-square": {"kind": "3d", "grid": [3, 2, 4], "radius": 1, "shape": "square"},
    "dense": None,
    "2d-tile": {"kind": "2d", "grid": [6, 8], "shape": "tile", "tile": [2, 2], "kernel": [1, 3]},
    "3d-tile-natten": {"kind": "3d", "grid": [2, 4, 5], "shape": "tile", "tile": [1, 1, 1], "kernel": [1, 3, 3]},
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", list(WINDOWS))
def test_window_kinds(check, name, causal):
    spec = AttentionSpec(window=WINDOWS[name], causal=causal)
    check(spec, L=37, seed=1)


@pytest.mark.parametrize("name", ["1d", "terraced", "2d-circle", "3d-square"])
def test_prefix_sinks_gqa(check, name):
    spec = AttentionSpec(window=WINDOWS[name], causal=name == "terraced", prefix=3, sinks=2)
    check(spec, B=2, H=4, Hkv=2, L=41, seed=2)


@pytest.mark.parametrize("L", [1, 2, 17, 63, 64, 65, 130])
def test_odd_lengths_one_module(check, L):
    """Every length runs on the same compiled module (L is symbolic)."""
    kern, _ = check(presets.sliding_window(9, sinks=1), L=L, seed=L)
    assert len(kern._mods) == 1


@pytest.mark.parametrize("config", [
    {"block_m": 16, "block_n": 16}, {"block_m": 32, "block_n": 16, "mr_qk": 3, "mr_pv": 5},
    {"block_m": 16, "block_n": 64}, {"block_m": 64, "block_n": 32}])
def test_tile_configs_1d(check, config):
    check(AttentionSpec(window={"kind": "1d", "left": 20, "right": 3}, prefix=5, sinks=1),
          L=150, config={"window": config}, seed=3)


@pytest.mark.parametrize("config", [{"block_m": 16, "tile": [4, 4]}, {"block_m": 16, "tile": [2, 8]},
                                    {"block_m": 32, "tile": [4, 8]}, {"block_m": 64, "tile": [8, 8]}])
def test_tile_configs_grid(check, config):
    spec = presets.clear(radius=3, grid=(10, 13), text_tokens=6)
    check(spec, config={"window": config}, seed=4)


def test_clear_preset_shape(check):
    """The CLEAR layout at a small size: text prefix, circle r=4 on a 16x16 latent grid."""
    check(presets.clear(radius=4, grid=(16, 16), text_tokens=8), H=2, D=16, seed=5)


def test_head_dim_not_multiple_of_lanes(check):
    check(AttentionSpec(window={"kind": "1d", "left": 5, "right": 5}, sinks=3), L=29, D=12, seed=6)


@pytest.mark.parametrize("config", [None, {"window": {"block_m": 16, "tile": [2, 8]}},
                                    {"window": {"block_m": 32, "tile": [4, 8]}}])
def test_sliding_tiles(check, config):
    """STA on a small grid with text tokens, sinks and GQA; the default config's blocks sit inside the
    window's tiles (no partly visible tile pair), the others straddle them."""
    spec = presets.sta(grid=(8, 16), tile=(2, 8), kernel=(3, 1), text_tokens=5)
    spec = AttentionSpec.from_dict({**spec.to_dict(), "sinks": 2})
    check(spec, B=1, H=4, Hkv=2, config=config, seed=6)
