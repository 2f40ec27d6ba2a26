"""Packed rows over ranks (2 and 3 local CPU processes): documents ending on rank borders give every rank
the single-process output and gradients; a document crossing a rank border raises ValueError."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import _varlen_workers  # noqa: E402  (spawned children import it by name)

from lincomp.distributed import run_local  # noqa: E402


@pytest.mark.parametrize("world", [2, 3])
def test_packed_rows_over_ranks(world):
    per_rank = run_local(_varlen_workers.packed_checks, world, timeout_s=90)
    bad = [f"rank {r} {spec} {k}: {e:.1e}" for r, res in enumerate(per_rank) for spec, errs in res.items()
           if spec != "crossing" for k, e in errs.items() if not e <= 1e-10]
    assert not bad, "\n".join(bad)
    assert all("crosses the rank border" in res["crossing"] for res in per_rank if res["crossing"]) and \
        any(res["crossing"] for res in per_rank)
