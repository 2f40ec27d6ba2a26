"""lincomp.distributed on 2 and 4 local CPU processes (gloo, 127.0.0.1): outputs and gradients of
every rank equal the single-process reference (<= 1e-5, fp32) for 1D, terraced, 2D/3D (CLEAR with a
prefix, exact and approximate mode), linear (scalar / vector gates, non-causal) and hybrid specs,
uneven splits, GQA, no-overlap, and ranks with an empty halo (rank 0 of every causal case; the
zero-reach case for all). One process group per world size runs every check (start-up is slow)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _workers  # noqa: E402  (spawned children import it by name)

from lincomp.distributed import run_local  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module", params=[2, 4], ids=["2ranks", "4ranks"])
def results(request):
    return request.param, run_local(_workers.group_checks, request.param, timeout_s=90)


def test_outputs_and_gradients_match_single_process(results):
    world, per_rank = results
    bad = []
    for rank, res in enumerate(per_rank):
        for case, errs in res["cases"].items():
            bad += [f"rank {rank} {case} {key}: {e:.2e}" for key, e in errs.items() if not e <= TOL]
    assert not bad, f"{world} ranks:\n" + "\n".join(bad)
    assert len(per_rank[0]["cases"]) >= 20


def test_traffic_model_matches_measured_bytes(results):
    world, per_rank = results
    for rank, res in enumerate(per_rank):
        for name, (measured, model, ok) in res["traffic"].items():
            assert ok, f"{name}: output differs from the reference (rank {rank})"
            for kind, nbytes in model.items():
                assert measured.get(kind, 0) == nbytes, f"{name} rank {rank} {kind}: {measured} vs model {model}"
    halo = [res["traffic"]["clear-exact"][0]["halo"] for res in per_rank]
    assert all(h > 0 for h in halo)


def test_bad_calls_raise_naming_the_fix(results):
    _, per_rank = results
    msgs = per_rank[0]["errors"]
    assert "shard inputs with lincomp.distributed.shard" in msgs["length"]
    assert "ranks but the group has" in msgs["world"]
    assert "prefix_mode must be one of" in msgs["prefix_mode"]
    assert msgs["shared_noncausal"].startswith("NotImplementedError") and "causal=true" in msgs["shared_noncausal"]


def _random_cases(world: int, count: int) -> list:
    """``count`` specs drawn by hypothesis (derandomized) that ``world`` ranks can split."""
    from hypothesis import given, settings, strategies as st

    from lincomp.distributed import Layout, global_plan
    from lincomp.distributed.selfcheck import Case
    from lincomp.testing import spec_strategy

    cases = []

    @settings(max_examples=10 * count, derandomize=True, database=None)
    @given(spec=spec_strategy(max_prefix=3), seed=st.integers(0, 10**6), flags=st.booleans())
    def collect(spec, seed, flags):
        if len(cases) >= count or (spec.combine == "shared" and not spec.causal):
            return
        L = spec.expected_length() or 19
        try:
            global_plan(spec, Layout.for_spec(spec, world, length=L), flags)
        except ValueError:            # a grid too small for this many ranks
            return
        stateful = spec.linear is not None and spec.causal and spec.combine != "shared"
        cases.append(Case(f"random-{len(cases)}-{spec.summary()}", spec.to_dict(), L=L, seed=seed, overlap=flags,
                          initial_state=stateful and flags, return_state=stateful and not flags))

    collect()
    return cases


def test_random_specs_on_3_ranks():
    from lincomp.distributed.selfcheck import check
    cases = _random_cases(3, 16)
    per_rank = run_local(check, 3, cases, timeout_s=90)
    bad = [f"rank {r} {case} {key}: {e:.2e}" for r, res in enumerate(per_rank) for case, errs in res.items()
           for key, e in errs.items() if not e <= TOL]
    assert not bad, "\n".join(bad)
    assert len(cases) == 16 and len(per_rank[0]) == 16
