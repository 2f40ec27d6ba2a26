"""TVM chunked linear-attention kernels against the fp64 reference: feature maps, scalar / vector gates
(weak ones take the factored path, strong ones the sub-chunk path), normaliser, state in / out,
non-causal, GQA, chunk configs."""

import pytest

pytest.importorskip("tvm")

from lincomp.spec import AttentionSpec  # noqa: E402

MAPS = ["identity", "elu1", "relu", "hedgehog", "hedgehog_exp"]


def linear(fmap, gate=None, normalize=False, causal=True, feature_dim=None):
    return AttentionSpec(causal=causal, linear={"feature_map": fmap, "feature_dim": feature_dim, "gate": gate,
                                               "normalize": normalize, "chunk_size": 64})


@pytest.mark.parametrize("gate", [None, "scalar", "vector"])
@pytest.mark.parametrize("fmap", MAPS)
def test_causal_maps_and_gates(check, fmap, gate):
    normalize = fmap != "identity"
    check(linear(fmap, gate, normalize, feature_dim=8 if fmap.startswith("hedgehog") else None),
          B=2, H=2, L=45, seed=1)


@pytest.mark.parametrize("fmap", MAPS)
def test_non_causal(check, fmap):
    check(linear(fmap, None, fmap != "identity", causal=False, feature_dim=8 if fmap.startswith("hedgehog") else None),
          L=70, seed=2)


@pytest.mark.parametrize("gate", [None, "scalar", "vector"])
def test_state_in_and_out(check, gate):
    check(linear("elu1", gate, True), L=50, initial_state=True, return_state=True, seed=3)
    check(linear("identity", gate, False), L=50, initial_state=True, return_state=True, seed=4)


@pytest.mark.parametrize("strength", [0.05, 5.0, 40.0])
def test_gate_strength(check, strength):
    """Strong vector gates (a chunk decays past e^-60) take the sub-chunk path; it stays exact."""
    for gate in ("vector", "scalar"):
        check(linear("identity", gate), L=80, gate_strength=strength, seed=5,
              config={"linear": {"chunk": 32, "sub_chunk": 8}}, tol=1e-4)


@pytest.mark.parametrize("config", [{"chunk": 16}, {"chunk": 32, "mr": 8}, {"chunk": 64, "sub_chunk": 16}])
def test_chunk_configs(check, config):
    check(linear("hedgehog_exp", "vector", True, feature_dim=8), L=150, seed=6, config={"linear": config})


def test_gqa_and_odd_dims(check):
    check(linear("relu", "scalar", True), B=2, H=4, Hkv=2, L=33, D=12, seed=7)
    check(linear("hedgehog", "vector", True, feature_dim=6), B=1, H=4, Hkv=1, L=33, D=16, seed=8)
