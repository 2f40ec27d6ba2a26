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


# ------------------------------------------------------------------------------------- key padding
@pytest.mark.filterwarnings("error::lincomp.runtime.kernel.LincompFallbackWarning")   # must run the kernel
@pytest.mark.parametrize("name, config", [
    ("1d", None), ("1d-causal-swa", {"window": {"block_m": 16, "block_n": 16, "kv_group": 2}}), ("dense", None),
    ("terraced", None), ("2d-circle", None), ("2d-tile", None)])
def test_key_padding_mask_runs_on_the_kernel(check, name, config):
    """Padded keys score -inf inside the kernel (full tiles too); a row with every key padded outputs 0."""
    spec = AttentionSpec(window=WINDOWS[name], causal=name in ("terraced", "1d-causal-swa"), prefix=2, sinks=1)
    kern, _ = check(spec, B=3, H=4, Hkv=2, L=37, seed=7, config=config, key_padding=True)
    assert len(kern._mods) == 1


@pytest.mark.filterwarnings("error::lincomp.runtime.kernel.LincompFallbackWarning")
def test_key_padding_mask_and_plain_calls_on_one_kernel(double):
    """One kernel holds the padded variant next to the plain one; each call runs the right one."""
    import torch
    import lincomp
    from lincomp.testing import random_inputs, rel_err
    spec = presets.sliding_window(6)
    kern = lincomp.compile(spec, target="tvm")
    x = random_inputs(spec, B=2, L=30, D=8, seed=8)
    kpm = torch.rand(2, 30, generator=torch.Generator().manual_seed(8)) > 0.4
    with torch.no_grad():
        for mask in (kpm, None, ~kpm):
            want = lincomp.reference(spec, **double(x), key_padding_mask=mask)
            assert rel_err(kern(**x, key_padding_mask=mask), want) <= 1e-4
    assert len(kern._mods) == 2


def test_key_padding_mask_with_elu1_features_falls_back():
    """elu1's phi(0) = 1: the linear kernel cannot drop a padded key, so the call says so and runs the reference."""
    import torch
    import lincomp
    from lincomp.runtime.kernel import LincompFallbackWarning
    from lincomp.testing import random_inputs, rel_err
    spec = AttentionSpec(causal=True, linear={"feature_map": "elu1", "gate": "scalar", "chunk_size": 8})
    x = random_inputs(spec, B=2, L=12, D=8, seed=1)
    kpm = torch.ones(2, 12, dtype=torch.bool)
    kpm[0, :4] = False
    with torch.no_grad(), pytest.warns(LincompFallbackWarning, match="elu1 feature map"):
        out = lincomp.compile(spec, target="tvm")(**x, key_padding_mask=kpm)
    assert rel_err(out, lincomp.reference(spec, **x, key_padding_mask=kpm)) <= 1e-5


@pytest.mark.parametrize("D", [48, 96, 128])
@pytest.mark.parametrize("name", ["lizard", "clear-pooled"])
def test_wide_heads_in_value_column_blocks(check, name, D):
    """Head dims past one P @ V pass (window.PV_COLS) run the product in column blocks, the rows per step fitted
    to a block; a head dim that is no power of two runs in power-of-two blocks (codegen.pow2_parts: 96 = 64 + 32):
    sinks, a linear branch and pooled keys included."""
    spec = presets.lizard(window=16, sinks=2, feature_dim=8) if name == "lizard" else \
        AttentionSpec(window={"kind": "2d", "grid": [8, 8], "radius": 2, "shape": "circle", "pool": 2}, prefix=4)
    check(spec, H=2, L=68 if name != "lizard" else 45, D=D, seed=3)
