"""lincomp.distributed on 2 and 4 local CPU processes (gloo, 127.0.0.1): outputs and gradients of
every rank equal the single-process reference (<= 1e-5, fp32) for 1D, terraced, 2D/3D (CLEAR with a
prefix, exact and approximate mode), linear (scalar / vector gates, non-causal) and hybrid specs,
uneven splits, GQA, no-overlap, and ranks with an empty halo (rank 0 of every causal case; the
zero-reach case for all). One process group per world size runs every check (start-up is slow)."""

import os
import random
import sys

import pytest
import torch

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

    pool = {}

    @settings(max_examples=20 * count, derandomize=True, database=None)
    @given(spec=spec_strategy(max_prefix=3, shapes=("circle", "square")), seed=st.integers(0, 10**6),
           flags=st.booleans())
    def collect(spec, seed, flags):
        if spec.combine == "shared" and not spec.causal:
            return
        L = spec.expected_length() or 19
        try:
            global_plan(spec, Layout.for_spec(spec, world, length=L), flags)
        except ValueError:            # a grid too small for this many ranks
            return
        stateful = spec.linear is not None and spec.causal and spec.combine != "shared"
        pool.setdefault(spec.key(), (spec, L, seed, flags, stateful))

    collect()
    picked = random.Random(0).sample(sorted(pool), min(count, len(pool)))   # spread over the whole run
    return [Case(f"random-{i}-{pool[k][0].summary()}", pool[k][0].to_dict(), L=pool[k][1], seed=pool[k][2],
                 overlap=pool[k][3], dtype=torch.float64, initial_state=pool[k][4] and pool[k][3],
                 return_state=pool[k][4] and not pool[k][3]) for i, k in enumerate(picked)]


def test_random_specs_on_3_ranks():
    """16 hypothesis-drawn specs (every window kind, linear, hybrids) on 3 ranks, in fp64 (<= 1e-9): an
    exact equivalence check, free of fp32 rounding noise on gradients that are zero in exact math."""
    from lincomp.distributed.selfcheck import check
    cases = _random_cases(3, 16)
    per_rank = run_local(check, 3, cases, timeout_s=90)
    bad = [f"rank {r} {case} {key}: {e:.2e}" for r, res in enumerate(per_rank) for case, errs in res.items()
           for key, e in errs.items() if not e <= 1e-9]
    assert not bad, "\n".join(bad)
    assert len(cases) == 16 and len(per_rank[0]) == 16
