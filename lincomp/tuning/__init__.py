"""Autotuning: device identity, the per-device tuning database, and a measured config search.

Importing this package imports neither torch, triton nor tvm; they load when a device is queried or
a kernel is timed.
"""

from lincomp.tuning.db import (Entry, Problem, TuningDB, TuningDBError, TuningDBWarning, bucket_distance,
                               parse_bucket, shape_bucket, user_db_path)
from lincomp.tuning.device import device_name, device_slug, library_versions
from lincomp.tuning.search import TuneResult, TuningError, median_time_ms, time_budget, tune

__all__ = ["TuningDB", "Entry", "Problem", "TuningDBError", "TuningDBWarning", "shape_bucket", "parse_bucket",
           "bucket_distance", "user_db_path", "device_name", "device_slug", "library_versions", "tune",
           "TuneResult", "TuningError", "median_time_ms", "time_budget"]
