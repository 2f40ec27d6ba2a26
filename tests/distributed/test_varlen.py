"""Packed rows over ranks (2 to 4 local CPU processes). Documents ending on rank borders: every rank runs its
own documents. Documents crossing rank borders (one or several, length-1 documents, borders exactly on a
document start, random boundaries and slices): the halo and linear state are carried across the border and
restart at document starts. Either way every rank gets its slice of the single-process reference's output and
gradients (fp64); a terraced window over a crossing document raises ValueError."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _varlen_workers  # noqa: E402  (spawned children import it by name)

from lincomp.distributed import run_local  # noqa: E402


def _bad(per_rank, skip=()) -> list:
    return [f"rank {r} {case} {k}: {e:.1e}" for r, res in enumerate(per_rank) for case, errs in res.items()
            if case not in skip for k, e in errs.items() if not e <= 1e-10]


@pytest.mark.parametrize("world", [2, 3])
def test_packed_rows_over_ranks(world):
    per_rank = run_local(_varlen_workers.packed_checks, world, timeout_s=90)
    bad = _bad(per_rank, skip=("crossing",))
    assert not bad, "\n".join(bad)
    assert all("crosses the rank border" in res["crossing"] for res in per_rank if res["crossing"]) and \
        any(res["crossing"] for res in per_rank)


@pytest.mark.parametrize("world,random_rows", [(2, 2), (3, 1), (4, 0)])
def test_documents_crossing_rank_borders(world, random_rows):
    per_rank = run_local(_varlen_workers.crossing_checks, world, random_rows, timeout_s=180)
    assert len(per_rank[0]) == (2 + random_rows) * len(_varlen_workers.CROSSING_SPECS)
    bad = _bad(per_rank)
    assert not bad, "\n".join(bad)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3, 4])
def test_documents_crossing_rank_borders_many_random_rows(world):
    bad = _bad(run_local(_varlen_workers.crossing_checks, world, 8, timeout_s=600))
    assert not bad, "\n".join(bad)
