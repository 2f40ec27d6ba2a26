"""The one config chooser every kernel family and target uses.

``choose(...)`` picks a kernel's launch parameters for one problem key, in this order:

1. ``fixed``: the caller pinned a config (a compile hint);
2. ``db``: the tuning database has this exact key (device name, backend, kernel, spec, dtype, bucket);
3. ``nearest``: the database has the nearest length bucket of the same problem;
4. ``tuned``: no entry, and the caller allows tuning on first use (``tune`` given): measure, store, use;
5. ``default``: the family's fixed default (no database, no timing).

Every kernel reports what it chose in one schema (``kernel.config[kernel name]``)::

    {"source": "fixed" | "db" | "nearest" | "tuned" | "default",
     "params": {...launch parameters...},
     "key": {"backend", "kernel", "device", "dtype", "bucket"},
     "origin": "<database file>"}          # db / nearest only

A database hit whose params the family rejects (``normalize`` raises ValueError) counts as a miss: a
stale or hand-edited entry never breaks a call. A broken database file never stops a call either.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from lincomp.tuning.db import TuningDB, dtype_name, shape_bucket
from lincomp.tuning.device import resolve_device_name

SOURCES = ("fixed", "db", "nearest", "tuned", "default")


@dataclass(frozen=True)
class Choice:
    """One kernel's config and where it came from (``as_dict()`` is the ``kernel.config`` schema)."""

    source: str
    params: dict
    key: dict = field(default_factory=dict)
    origin: Optional[str] = None   # the database file of a "db" / "nearest" choice

    def as_dict(self) -> dict:
        out = {"source": self.source, "params": dict(self.params), "key": dict(self.key)}
        if self.origin is not None:
            out["origin"] = self.origin
        return out


def _warn_rejected(hit, why: Exception) -> None:
    """A database entry that parses but that the family rejects: say so (kernels cache their choice per
    length bucket, so this is once per kernel and bucket), and go on with the next source."""
    from lincomp.tuning.db import TuningDBWarning
    warnings.warn(f"lincomp tuning db: entry {hit.key} in {hit.source}: {why}; ignored (see "
                  "`lincomp db validate`)", TuningDBWarning, stacklevel=4)


def choose(backend: str, kernel: str, spec: Any, dtype: Any, dims: Mapping[str, int], *, device: Any,
           default: Callable[[], Mapping], fixed: Optional[Mapping] = None,
           normalize: Callable[[Mapping], Mapping] = dict, tune: Optional[Callable[[], Mapping]] = None,
           db=None) -> Choice:
    """The config of ``kernel`` for this problem (see the module docstring for the order).

    ``dims``: the bucketed dims (L, D, ...); ``default()``: the family default; ``normalize(params)``:
    check / complete params (ValueError: reject); ``tune()``: measure and store, returning the best params
    (only called when the database has nothing); ``db``: a TuningDB (default: the user's + the shipped one).
    """
    dev = resolve_device_name(device)
    key = {"backend": backend, "kernel": kernel, "device": dev, "dtype": dtype_name(dtype),
           "bucket": shape_bucket(**dims)}
    if fixed is not None:
        return Choice("fixed", dict(normalize(fixed)), key)
    hit = None
    try:
        db = db if db is not None else TuningDB()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hit = db.lookup(backend, kernel, spec, dtype, dict(dims), device=dev, nearest=True)
    except Exception:  # a missing or unreadable database never stops a call
        hit = None
    if hit is not None:
        try:
            return Choice("db" if hit.exact else "nearest", dict(normalize(hit.config)), key,
                          None if hit.source is None else str(hit.source))
        except (ValueError, TypeError) as e:   # parses but out of range: the default runs instead
            _warn_rejected(hit, e)
    if tune is not None:
        return Choice("tuned", dict(normalize(tune())), key)
    return Choice("default", dict(normalize(default())), key)


__all__ = ["choose", "Choice", "SOURCES"]
