"""Measured search over a small config space, shared by the GPU (Triton) and CPU (TVM) backends.

``tune`` builds every config, times it, skips the ones that fail (and says why), stores the best in
the tuning database, and does no work at all when the database already holds the exact key.
Correctness checks belong in ``build`` (raise to reject a config); ``tune`` only measures.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from lincomp.tuning.db import Entry, TuningDB, TuningDBError, TuningDBWarning

# progress(i, n, config, time_ms or None, error or None), called after each candidate
ProgressFn = Callable[[int, int, dict, Optional[float], Optional[str]], None]


class TuningError(RuntimeError):
    """No config of the space built and ran; the message lists why each failed."""


@dataclass
class TuneResult:
    """The chosen config. ``cached`` is True when it came from the database without any work;
    ``budget_hit`` when a :func:`time_budget` ran out before all ``space`` configs were measured."""

    config: dict
    time_ms: float
    cached: bool
    candidates: list = field(default_factory=list)
    entry: Optional[Entry] = None
    space: int = 0
    budget_hit: bool = False


# The monotonic time (s) at which every search running in this context stops trying new configs.
_DEADLINE: "contextvars.ContextVar[Optional[float]]" = contextvars.ContextVar("lincomp_tuning_deadline", default=None)


@contextlib.contextmanager
def time_budget(seconds: Optional[float]):
    """Inside it, every :func:`tune` (of any backend: kernels call it) measures new configs only until
    ``seconds`` after entering, then keeps the best found so far (at least one config is measured per
    search, and the run-off is skipped). ``None``: no budget."""
    if seconds is not None and not (isinstance(seconds, (int, float)) and seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"the time budget must be a positive number of seconds, got {seconds!r}")
    token = _DEADLINE.set(None if seconds is None else time.monotonic() + float(seconds))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def _out_of_time() -> bool:
    deadline = _DEADLINE.get()
    return deadline is not None and time.monotonic() >= deadline


def median_time_ms(fn: Callable[[], Any], *, warmup: int = 3, reps: int = 10, device: Any = None) -> float:
    """Median wall time of ``fn()`` in milliseconds.

    On CUDA each rep is bracketed by ``torch.cuda.Event``s (GPU time, no host sync per rep); on a CPU
    by ``time.perf_counter``. ``device=None``: CUDA when available, else CPU; pass "cpu" to time CPU
    kernels on a GPU machine.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    import torch

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for _ in range(warmup):  # compile caches, autotuners, allocator growth, CPU frequency ramp
        fn()
    if dev.type == "cuda":
        with torch.cuda.device(dev):
            torch.cuda.synchronize()
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(reps)]
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def tune(space: Sequence[Mapping], build: Callable[[dict], Callable[[], Any]],
         bench: Optional[Callable[[Callable[[], Any]], float]] = None, *,
         backend: str, kernel: str, spec: Any, dtype: Any, dims: Union[Mapping[str, int], str],
         db: Optional[TuningDB] = None, device: Any = None, force: bool = False,
         progress: Union[None, bool, ProgressFn] = None, runoff: int = 3, rounds: int = 3) -> TuneResult:
    """Time every config of ``space`` and keep the fastest.

    A run-off decides between the ``runoff`` fastest configs of the first pass: they are timed again in
    ``rounds`` interleaved rounds and ranked by their median (a load spike during one config's single
    measurement cannot pick the winner; the first pass's times stay in ``candidates``).

    ``build(config)`` returns a zero-argument callable running the kernel (raise to reject the config);
    ``bench(fn)`` returns its median time in ms (default: ``median_time_ms``). The key
    (backend, kernel, spec, dtype, dims bucket, device) selects the database entry: if ``db`` holds it
    exactly and ``force`` is False nothing is built or run. ``progress``: True for a tqdm bar (if
    tqdm is installed), or a callable ``progress(i, n, config, time_ms, error)``.
    Raises TuningError when every config fails.
    """
    if db is not None and not force:
        hit = db.lookup(backend, kernel, spec, dtype, dims, device=device, nearest=False)
        if hit is not None:
            return TuneResult(config=hit.config, time_ms=hit.time_ms, cached=True,
                              candidates=hit.candidates, entry=hit, space=len(hit.candidates))

    configs = _unique_configs(space)
    if not configs:
        raise ValueError(f"the search space for {backend}/{kernel} is empty; give at least one config")
    bench = bench if bench is not None else median_time_ms
    bar, report = _progress(progress, len(configs), f"{backend}/{kernel}")
    candidates, runners = [], {}
    budget_hit = False
    try:
        for i, config in enumerate(configs):
            if _out_of_time() and any("time_ms" in c for c in candidates):
                budget_hit = True
                break
            time_ms, error, runners[i] = _measure(config, build, bench)
            candidates.append({"config": config, "error": error} if error else {"config": config, "time_ms": time_ms})
            if report is not None:
                report(i, len(configs), config, time_ms, error)
            if bar is not None:
                best = min((c["time_ms"] for c in candidates if "time_ms" in c), default=None)
                bar.set_postfix_str("best -" if best is None else f"best {best:.3g} ms")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    ok = [(c, runners[i]) for i, c in enumerate(candidates) if "time_ms" in c]
    if not ok:
        reasons = "\n".join(f"  {json.dumps(c['config'], sort_keys=True)}: {c['error']}" for c in candidates)
        raise TuningError(f"no config of {backend}/{kernel} built and ran:\n{reasons}")
    finalists = sorted(ok, key=lambda cr: cr[0]["time_ms"])[:max(1, runoff)]
    best = finalists[0][0] if _out_of_time() else _run_off(finalists, bench, rounds)
    best_ms = best.get("runoff_ms", best["time_ms"])
    entry = None
    if db is not None:
        try:
            entry = db.record(backend, kernel, spec, dtype, dims, best["config"], best_ms,
                              candidates=candidates, device=device)
        except (OSError, TuningDBError) as e:  # a read-only or foreign db must not lose the result
            warnings.warn(f"lincomp tuning: could not store the result for {backend}/{kernel}: {e}",
                          TuningDBWarning, stacklevel=2)
    return TuneResult(config=best["config"], time_ms=best_ms, cached=False,
                      candidates=candidates, entry=entry, space=len(configs), budget_hit=budget_hit)


def _run_off(finalists: list, bench: Callable, rounds: int) -> dict:
    """Of ``[(candidate, runner)]``, the candidate with the lowest median over ``rounds`` interleaved
    re-timings (its entry gains ``runoff_ms``); one that fails now drops out. Ties keep the given order."""
    if len(finalists) < 2 or rounds < 1:
        return finalists[0][0]
    times = {i: [] for i in range(len(finalists))}
    for _ in range(rounds):
        for i, (_, fn) in enumerate(finalists):
            t, error = _time(fn, bench)
            if error is None:
                times[i].append(t)
    ranked = [(statistics.median(ts), i) for i, ts in times.items() if len(ts) == rounds]
    if not ranked:
        return finalists[0][0]
    for t, i in ranked:
        finalists[i][0]["runoff_ms"] = t
    return finalists[min(ranked)[1]][0]


def _measure(config: dict, build: Callable, bench: Callable) -> tuple:
    """(time_ms, None, runner) or (None, why it failed, None)."""
    try:
        fn = build(dict(config))  # a copy: build may not edit the stored config
    except Exception as e:  # any failure rejects this config only
        return None, f"build: {type(e).__name__}: {_short(e)}", None
    t, error = _time(fn, bench)
    return t, error, (fn if error is None else None)


def _time(fn: Callable, bench: Callable) -> tuple:
    """(time_ms, None) or (None, why it failed)."""
    try:
        t = float(bench(fn))
    except Exception as e:
        return None, f"run: {type(e).__name__}: {_short(e)}"
    if not math.isfinite(t) or t < 0:
        return None, f"run: bench returned {t!r}, not a time in ms"
    return t, None


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _unique_configs(space: Sequence[Mapping]) -> list:
    """Configs as JSON-native dicts in the space's order, duplicates dropped."""
    seen, out = set(), []
    for n, config in enumerate(space):
        if not isinstance(config, Mapping):
            raise TypeError(f"space[{n}] must be a dict of config values, got {type(config).__name__}")
        config = dict(config)
        try:
            text = json.dumps(config, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(f"space[{n}] must be JSON data (it is stored in the tuning db): {e}") from None
        if json.loads(text) != config:
            raise TypeError(f"space[{n}] must be JSON-native (lists, not tuples; str keys): {config!r}")
        if text not in seen:
            seen.add(text)
            out.append(config)
    return out


def _progress(progress: Union[None, bool, ProgressFn], total: int, desc: str) -> tuple:
    """(tqdm bar or None, callback or None)."""
    if callable(progress):
        return None, progress
    if progress:
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional: tune silently
            return None, None
        return tqdm(total=total, desc=desc, unit="cfg", leave=True), None   # the bar stays: a record of the run
    return None, None
