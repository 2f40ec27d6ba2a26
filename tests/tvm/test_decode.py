"""TVMDecoder: feeding a sequence token by token gives the whole-sequence reference output (and the
ReferenceDecoder's), for windows with prefix / sinks, dense causal softmax, gated linear, both hybrids."""

import pytest
import torch

pytest.importorskip("tvm")

from lincomp import presets  # noqa: E402
from lincomp.reference import ReferenceDecoder, reference  # noqa: E402
from lincomp.spec import AttentionSpec  # noqa: E402
from lincomp.testing import random_inputs, rel_err  # noqa: E402


SPECS = {
    "swa+sinks": presets.sliding_window(5, sinks=2),
    "terraced+prefix": AttentionSpec(window={"kind": "terraced", "block": 3}, causal=True, prefix=2),
    "2d-circle+prefix": AttentionSpec(window={"kind": "2d", "grid": [4, 5], "radius": 2, "shape": "circle"},
                                      causal=True, prefix=2),
    "2d-tile+prefix": AttentionSpec(window={"kind": "2d", "grid": [4, 6], "shape": "tile", "tile": [2, 2],
                                            "kernel": [1, 3]}, causal=True, prefix=2),
    "dense-causal": AttentionSpec(causal=True),
    "gla-vector": presets.gla("vector"),
    "linear-elu1-scalar": AttentionSpec(causal=True, linear={"feature_map": "elu1", "gate": "scalar",
                                                             "normalize": True}),
    "lizard": presets.lizard(window=4, feature_dim=4),
    "lolcats": presets.lolcats(block=3, feature_dim=4),
    "shared-vector-gate": AttentionSpec(window={"kind": "1d", "left": 3, "right": 0}, causal=True,
                                        linear={"feature_map": "elu1", "normalize": True, "gate": "vector"},
                                        combine="shared"),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_decoder_matches_reference(double, name):
    from lincomp.lower.tvm import TVMDecoder
    spec = SPECS[name]
    L = spec.expected_length() or 23
    with_state = spec.linear is not None and spec.combine != "shared"
    x = random_inputs(spec, B=2, H=4, Hkv=2, L=L, D=8, seed=1, initial_state=with_state)
    weights = {k: x[k] for k in ("feature_weight_q", "feature_weight_k", "sink_logits", "window_gamma", "alpha")
               if k in x}
    dec = TVMDecoder(spec, initial_state=x.get("initial_state"), **weights)
    ref_dec = ReferenceDecoder(spec, initial_state=x.get("initial_state"), **weights)
    outs, ref_outs = [], []
    for t in range(L):
        args = [x[n][:, :, t:t + 1] for n in ("q", "k", "v")] + [x["g"][:, :, t:t + 1] if "g" in x else None]
        outs.append(dec.step(*args))
        ref_outs.append(ref_dec.step(*args))
    o = torch.cat(outs, 2)
    ref = reference(spec, **double(x))
    assert rel_err(o, ref) <= 1e-4
    assert rel_err(o, torch.cat(ref_outs, 2)) <= 1e-4
    if spec.window is not None:   # bounded memory: prefix + reach (+ the current token)
        assert dec.cache_len <= spec.prefix + spec.window.reach(True) + 1
    assert "def decode_step" in dec.source


def test_decoder_rejects_non_causal():
    from lincomp.lower.tvm import TVMDecoder
    with pytest.raises(ValueError, match="causal"):
        TVMDecoder(AttentionSpec(window={"kind": "1d", "left": 3, "right": 3}))


@pytest.mark.parametrize("name", ["lizard", "shared-vector-gate"])
def test_serial_and_parallel_steps_are_bit_identical(monkeypatch, name):
    """Small steps skip the parallel launch (SERIAL_WORK); the loop body is the same, so the outputs are too."""
    import lincomp.lower.tvmir.decode as decode
    spec = SPECS[name]
    x = random_inputs(spec, B=2, H=4, Hkv=2, L=10, D=8, seed=3)
    weights = {k: x[k] for k in ("feature_weight_q", "feature_weight_k", "sink_logits", "window_gamma", "alpha")
               if k in x}
    outs = {}
    for parallel in (False, True):
        monkeypatch.setattr(decode, "SERIAL_WORK", 0 if parallel else 1 << 62)
        dec = decode.TVMDecoder(spec, **weights)
        outs[parallel] = torch.cat([dec.step(*[x[n][:, :, t:t + 1] for n in ("q", "k", "v")],
                                             x["g"][:, :, t:t + 1] if "g" in x else None) for t in range(10)], 2)
        assert dec.parallel is parallel and ("T.parallel" in dec.source) is parallel
    assert torch.isfinite(outs[True]).all() and torch.equal(outs[False], outs[True])


def test_step_work_picks_serial_for_one_small_token():
    from lincomp.lower.tvmir.decode import SERIAL_WORK, step_work
    spec = presets.lizard(window=128, sinks=4, feature_dim=32)   # benchmarks/bench_decode.py's layers
    one = step_work(spec, B=1, H=8, D=64, Dv=64, F=64, E=32, nc=129)
    assert one == 8 * (129 * 128 + 3 * 64 * 64 + 2 * 64 * 32) and one < SERIAL_WORK
    assert step_work(spec, B=64, H=8, D=64, Dv=64, F=64, E=32, nc=129) >= SERIAL_WORK
