"""The tuning database: measured best kernel configs, one JSON file per device.

Format (tuning_db/README.md has the full description)::

    {"format": "lincomp-tuning-db", "version": 1, "device": "NVIDIA H100 80GB HBM3",
     "entries": {"<backend>|<kernel>|<spec key>|<dtype>|<bucket>": {
         "backend": "triton", "kernel": "window_fwd", "spec": "<spec key>", "dtype": "float16",
         "bucket": "D=64,H=4,L=4096", "config": {...}, "time_ms": 0.41,
         "candidates": [{"config": {...}, "time_ms": 0.52}, {"config": {...}, "error": "..."}],
         "versions": {"torch": "2.11.0", "triton": "3.6.0", ...}, "timestamp": "2026-11-26T12:00:00Z"}}}

Two folders are read, the user's first: ``$LINCOMP_TUNING_DB`` (or ``~/.cache/lincomp/tuning_db``),
where new results are written, then the repository's ``tuning_db/`` of shipped configs.

Reading never raises into a model run: a corrupt file, a foreign format or version, or an entry
that fails validation is reported with a warning and ignored (``lincomp db validate`` lists them).
Writing is atomic (temp file + rename) and safe for concurrent processes (an exclusive OS lock, via filelock, on
a sidecar ``<file>.lock``; the file is re-read and merged under the lock).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import threading
import time
import warnings
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Iterable, Iterator, List, Mapping, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from lincomp._atomic import atomic_write_text
from lincomp._files import shipped_path
from lincomp.tuning.device import device_slug, library_versions, resolve_device_name

# A writer waits this long (s) for another process's write to finish before giving up with an error.
LOCK_TIMEOUT_S = 120.0

FORMAT = "lincomp-tuning-db"
VERSION = 1
ENV_VAR = "LINCOMP_TUNING_DB"
# Shipped configs: the wheel's package data (lincomp/_data/tuning_db) or the checkout's tuning_db/.
SHIPPED_DB = shipped_path("tuning_db")
# Sequence-length dims: bucketed to the next power of two and matched by nearness. Others are exact.
LENGTH_DIMS = frozenset({"L", "Lq", "Lk"})

_SEP = "|"
_DIM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REQUIRED = {"backend": str, "kernel": str, "spec": str, "dtype": str, "bucket": str, "config": dict}


class TuningDBWarning(UserWarning):
    """A tuning database file or entry was unusable and is ignored."""


class TuningDBError(RuntimeError):
    """A result could not be written (the target file belongs to another format, version or device)."""


# ------------------------------------------------------------------------------------ key parts
def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def shape_bucket(**dims: int) -> str:
    """The bucket of a problem shape: length dims (L, Lq, Lk) -> next power of two, others exact.

    ``shape_bucket(L=3000, D=64, H=4) == shape_bucket(L=4000, D=64, H=4) == "D=64,H=4,L=4096"``.
    Pass the dims that change the best config (usually H, D and L; B if it matters).
    """
    parts = []
    for name in sorted(dims):
        value = dims[name]
        if not _DIM_NAME.match(name):
            raise ValueError(f"shape dim name {name!r} must be an identifier such as 'L' or 'D'")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"shape dim {name} must be a positive int, got {value!r}")
        parts.append(f"{name}={next_pow2(value) if name in LENGTH_DIMS else value}")
    return ",".join(parts)


def parse_bucket(bucket: str) -> dict:
    """``"D=64,L=4096"`` -> ``{"D": 64, "L": 4096}``; raises ValueError on a malformed bucket."""
    if not isinstance(bucket, str):
        raise ValueError(f"bucket must be a string like 'D=64,L=4096', got {bucket!r}")
    dims = {}
    for part in filter(None, bucket.split(",")):
        name, eq, value = part.partition("=")
        if not eq or not _DIM_NAME.match(name) or not value.isdigit() or int(value) < 1:
            raise ValueError(f"bucket {bucket!r}: {part!r} is not NAME=positive-int")
        dims[name] = int(value)
    if bucket != shape_bucket(**dims):  # sorted names, lengths already powers of two
        raise ValueError(f"bucket {bucket!r} is not canonical; expected {shape_bucket(**dims)!r}")
    return dims


def _bucket_of(dims: Union[Mapping[str, int], str]) -> str:
    if isinstance(dims, str):
        parse_bucket(dims)  # validates
        return dims
    return shape_bucket(**dict(dims))


def bucket_distance(a: Mapping[str, int], b: Mapping[str, int]) -> Optional[float]:
    """Sum of |log2| differences over length dims; None when the other dims differ (not comparable)."""
    if a.keys() != b.keys() or any(a[k] != b[k] for k in a if k not in LENGTH_DIMS):
        return None
    return sum(abs(math.log2(a[k]) - math.log2(b[k])) for k in a if k in LENGTH_DIMS)


def dtype_name(dtype: Any) -> str:
    """torch.float16 / "torch.float16" / "float16" -> "float16" (no torch import needed)."""
    name = str(dtype).strip()
    name = name[len("torch."):] if name.startswith("torch.") else name
    if not name or _SEP in name:
        raise ValueError(f"dtype {dtype!r} is not a dtype name such as 'float16'")
    return name


def spec_key(spec: Any) -> tuple:
    """(key, spec dict or None): a spec key string passes through; specs and dicts are keyed."""
    if isinstance(spec, str):
        return spec, None
    from lincomp.spec import AttentionSpec
    spec = AttentionSpec.coerce(spec)
    d = spec.to_dict()
    d.pop("name", None)
    return spec.key(), d


def entry_key(backend: str, kernel: str, spec: str, dtype: str, bucket: str) -> str:
    """The key of an entry in a device file: its five parts joined with '|'."""
    parts = (backend, kernel, spec, dtype, bucket)
    for name, part in zip(("backend", "kernel", "spec", "dtype", "bucket"), parts):
        if not isinstance(part, str) or _SEP in part or (not part and name != "bucket"):
            raise ValueError(f"{name} must be a non-empty string without '{_SEP}', got {part!r}")
    return _SEP.join(parts)


def user_db_path() -> Path:
    """Where new results go: $LINCOMP_TUNING_DB, else ~/.cache/lincomp/tuning_db (read at call time)."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lincomp" / "tuning_db"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Problem:
    """Something wrong in a database file (or in one of its entries)."""

    path: Path
    message: str
    entry: Optional[str] = None

    def __str__(self) -> str:
        where = f"{self.path} [{self.entry}]" if self.entry else str(self.path)
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class Entry:
    """One tuned result. ``exact`` is False when a lookup fell back to the nearest length bucket."""

    backend: str
    kernel: str
    spec: str
    dtype: str
    bucket: str
    config: dict
    time_ms: float
    candidates: list = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    timestamp: str = ""
    spec_dict: Optional[dict] = None
    shape: Optional[dict] = None
    device: str = ""
    source: Optional[Path] = field(default=None, compare=False)
    exact: bool = field(default=True, compare=False)

    @property
    def key(self) -> str:
        return entry_key(self.backend, self.kernel, self.spec, self.dtype, self.bucket)

    def to_dict(self) -> dict:
        """The entry as stored in the file (device, source and exact live outside it)."""
        d = {"backend": self.backend, "kernel": self.kernel, "spec": self.spec, "dtype": self.dtype,
             "bucket": self.bucket, "config": self.config, "time_ms": self.time_ms,
             "candidates": self.candidates, "versions": self.versions, "timestamp": self.timestamp}
        if self.spec_dict is not None:
            d["spec_dict"] = self.spec_dict
        if self.shape is not None:
            d["shape"] = self.shape
        return copy.deepcopy(d)

    @classmethod
    def from_dict(cls, key: str, d: Any, device: str = "", source: Optional[Path] = None) -> "Entry":
        """Validate a stored entry; raises ValueError naming the first problem."""
        if not isinstance(d, dict):
            raise ValueError(f"entry must be an object, got {type(d).__name__}")
        for name, typ in _REQUIRED.items():
            if not isinstance(d.get(name), typ):
                raise ValueError(f"field {name!r} must be a {typ.__name__}, got {d.get(name)!r}")
        _check_time(d.get("time_ms"), "time_ms")
        _check_config(d["config"], "config")
        parse_bucket(d["bucket"])
        expected = entry_key(d["backend"], d["kernel"], d["spec"], d["dtype"], d["bucket"])
        if key != expected:
            raise ValueError(f"key does not match the entry's fields; expected {expected!r}")
        candidates = d.get("candidates", [])
        if not isinstance(candidates, list):
            raise ValueError("field 'candidates' must be a list")
        for n, c in enumerate(candidates):
            if not isinstance(c, dict) or not isinstance(c.get("config"), dict):
                raise ValueError(f"candidates[{n}] must be an object with a 'config' object")
            if "error" in c:
                if not isinstance(c["error"], str):
                    raise ValueError(f"candidates[{n}].error must be a string")
            else:
                _check_time(c.get("time_ms"), f"candidates[{n}].time_ms")
        for name, typ in (("versions", dict), ("timestamp", str), ("spec_dict", dict), ("shape", dict)):
            if d.get(name) is not None and not isinstance(d[name], typ):
                raise ValueError(f"field {name!r} must be a {typ.__name__}")
        _check_record(d)
        return cls(backend=d["backend"], kernel=d["kernel"], spec=d["spec"], dtype=d["dtype"],
                   bucket=d["bucket"], config=d["config"], time_ms=float(d["time_ms"]),
                   candidates=candidates, versions=d.get("versions") or {}, timestamp=d.get("timestamp") or "",
                   spec_dict=d.get("spec_dict"), shape=d.get("shape"), device=device, source=source)


Milliseconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class CandidateRecord(BaseModel):
    """One measured (or failed) config of an entry's search, as stored."""

    model_config = ConfigDict(extra="forbid")
    config: dict
    time_ms: Optional[Milliseconds] = None
    runoff_ms: Optional[Milliseconds] = Field(None, description="the finalists' re-measurement")
    error: Optional[StrictStr] = Field(None, description="why the config failed (then no time_ms)")


class EntryRecord(BaseModel):
    """One entry of a database file, as stored (``Entry.to_dict``): unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid")
    backend: StrictStr
    kernel: StrictStr
    spec: StrictStr
    dtype: StrictStr
    bucket: StrictStr
    config: dict
    time_ms: Milliseconds
    candidates: List[CandidateRecord] = []
    versions: Optional[dict] = None
    timestamp: Optional[StrictStr] = None
    spec_dict: Optional[dict] = None
    shape: Optional[dict] = None


def _check_record(d: dict) -> None:
    """The pydantic gate after the field checks of ``Entry.from_dict``: ValueError naming the field."""
    try:
        EntryRecord.model_validate(d)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        fix = (f"; an entry holds only {sorted(EntryRecord.model_fields)} (candidates: "
               f"{sorted(CandidateRecord.model_fields)})" if first["type"] == "extra_forbidden" else "")
        raise ValueError(f"field {where!r}: {first['msg']}{fix}") from None


def _check_config(config: dict, name: str) -> None:
    """A config maps names to ints, finite floats, bools, strings, null or flat lists of them (a NaN or a
    nested object would reach a code generator; each backend then checks the ranges of its own keys)."""
    def scalar(v: Any, where: str) -> None:
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{where} must be finite, got {v!r}")
        if not (v is None or isinstance(v, (bool, int, float, str))):
            raise ValueError(f"{where} must be a number, string, bool or null, got {v!r}")

    for k, v in config.items():
        if isinstance(v, list):
            for n, x in enumerate(v):
                scalar(x, f"{name}.{k}[{n}]")
        else:
            scalar(v, f"{name}.{k}")


def _check_time(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number of milliseconds >= 0, got {value!r}")


# ------------------------------------------------------------------------------- reading files
@dataclass
class _Loaded:
    """A parsed file: usable entries by key, and what was wrong with it."""

    device: Optional[str] = None
    entries: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)
    doc: Optional[dict] = None  # the raw document when it is ours (format and version match)
    fatal: bool = False  # the file as a whole is unusable (corrupt or foreign)
    warned: bool = False


_CACHE: dict = {}  # str(path) -> (stat signature, _Loaded); files are re-parsed only when they change
_CACHE_LOCK = threading.Lock()


def _parse(path: Path, text: str) -> _Loaded:
    out = _Loaded()

    def fatal(message: str) -> _Loaded:
        out.problems.append(Problem(path, message))
        out.fatal = True
        return out

    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        return fatal(f"corrupt: not valid JSON ({e})")
    except RecursionError:   # a deeply nested array (any JSON file may sit in a database folder)
        return fatal("corrupt: JSON nested too deeply to be a tuning database")
    if not isinstance(doc, dict):
        return fatal(f"corrupt: the top level must be an object, got {type(doc).__name__}")
    if doc.get("format") != FORMAT:
        return fatal(f"foreign file: format is {doc.get('format')!r}, expected {FORMAT!r}")
    if doc.get("version") != VERSION:
        return fatal(f"unsupported version {doc.get('version')!r}: this lincomp reads version {VERSION} "
                     "(upgrade lincomp, or move the file away)")
    device, entries = doc.get("device"), doc.get("entries")
    if not isinstance(device, str) or not device:
        return fatal("corrupt: 'device' must be a non-empty string")
    if not isinstance(entries, dict):
        return fatal("corrupt: 'entries' must be an object")
    out.device, out.doc = device, doc
    if path.suffix == ".json" and path.stem != device_slug(device):
        # Lookups open <slug>.json, so a misnamed file would never be found for its device.
        out.problems.append(Problem(path, f"file name does not match its device {device!r}; "
                                          f"rename it to {device_slug(device)}.json"))
    for key, raw in entries.items():
        try:
            out.entries[key] = Entry.from_dict(key, raw, device=device, source=path)
        except ValueError as e:
            out.problems.append(Problem(path, f"invalid entry, ignored: {e}", entry=key))
    return out


def _load(path: Path, warn: bool = True) -> _Loaded:
    """Parse ``path`` (cached by inode/mtime/size); never raises. Missing file -> empty."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())  # of the file we read, even if a writer replaces it meanwhile
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
            with _CACHE_LOCK:
                hit = _CACHE.get(str(path))
            if hit is not None and hit[0] == sig:
                loaded = hit[1]
            else:
                loaded = _parse(path, f.read().decode("utf-8", errors="replace"))
                with _CACHE_LOCK:
                    _CACHE[str(path)] = (sig, loaded)
    except (FileNotFoundError, NotADirectoryError):  # no file yet
        return _Loaded()
    except OSError as e:
        loaded = _Loaded(problems=[Problem(path, f"unreadable: {e}")], fatal=True)
    if warn and not loaded.warned:
        loaded.warned = True  # once per version of the file, not on every lookup
        for p in loaded.problems:
            warnings.warn(f"lincomp tuning db: {p}; ignored (see `lincomp db validate`)",
                          TuningDBWarning, stacklevel=4)
    return loaded


def _json_files(folder: Path) -> list:
    try:
        return sorted(p for p in folder.glob("*.json") if p.is_file())
    except OSError:
        return []


def validate_paths(paths: Iterable[Union[str, Path]]) -> tuple:
    """Check files and folders of database files: (problems, number of files, number of usable entries)."""
    problems, n_files, n_entries = [], 0, 0
    for p in map(Path, paths):
        files = _json_files(p) if p.is_dir() else [p] if p.exists() else []
        if not p.exists():
            problems.append(Problem(p, "does not exist"))
        for f in files:
            loaded = _load(f, warn=False)
            n_files += 1
            n_entries += len(loaded.entries)
            problems.extend(loaded.problems)
    return problems, n_files, n_entries


# ----------------------------------------------------------------------------------- the database
class TuningDB:
    """Tuned configs for every device: ``path`` (written, read first) then ``shipped`` (read only).

    ``path=None`` means ``$LINCOMP_TUNING_DB`` or ``~/.cache/lincomp/tuning_db``; ``shipped=None``
    reads no shipped configs (tests), the default is the repository's ``tuning_db/``.
    ``device`` arguments take a torch device ("cuda:0", "cpu", None = current) or a device name.
    """

    def __init__(self, path: Union[str, Path, None] = None, *, shipped: Union[str, Path, None] = SHIPPED_DB):
        self.path = Path(path).expanduser() if path is not None else user_db_path()
        self.shipped = Path(shipped) if shipped is not None else None

    def __repr__(self) -> str:
        return f"TuningDB(path={str(self.path)!r}, shipped={str(self.shipped) if self.shipped else None!r})"

    @property
    def folders(self) -> list:
        """Folders read, in priority order (the user's first)."""
        folders = [self.path]
        if self.shipped is not None and self.shipped.resolve() != self.path.resolve():
            folders.append(self.shipped)
        return folders

    def file_for(self, device: Any = None) -> Path:
        """The file new results for ``device`` are written to."""
        return self.path / f"{device_slug(resolve_device_name(device))}.json"

    def _device_entries(self, device: str) -> list:
        """[(rank, {key: Entry})] for ``device`` from each folder, user first."""
        out = []
        for rank, folder in enumerate(self.folders):
            loaded = _load(folder / f"{device_slug(device)}.json")
            if loaded.device == device:  # a slug collision with another device name is not ours
                out.append((rank, loaded.entries))
        return out

    def lookup(self, backend: str, kernel: str, spec: Any, dtype: Any, dims: Union[Mapping[str, int], str],
               *, device: Any = None, nearest: bool = True) -> Optional[Entry]:
        """The stored result for this key: exact bucket, else the nearest length bucket, else None.

        Nearest: same device/backend/kernel/spec/dtype and the same non-length dims, smallest sum of
        |log2| length differences; ties go to the user folder, then to the longer bucket.
        Returns a copy (callers may mutate ``entry.config``); never raises on a bad database file.
        """
        dev = resolve_device_name(device)
        skey, _ = spec_key(spec)
        dtype, bucket = dtype_name(dtype), _bucket_of(dims)
        key = entry_key(backend, kernel, skey, dtype, bucket)
        sources = self._device_entries(dev)
        for _, entries in sources:
            if key in entries:
                return copy.deepcopy(entries[key])
        if not nearest:
            return None
        target, best, best_score = parse_bucket(bucket), None, None
        for rank, entries in sources:
            for e in entries.values():
                if (e.backend, e.kernel, e.spec, e.dtype) != (backend, kernel, skey, dtype):
                    continue
                dims_e = parse_bucket(e.bucket)
                dist = bucket_distance(target, dims_e)
                if dist is None:
                    continue
                score = (dist, rank, -sum(v for k, v in dims_e.items() if k in LENGTH_DIMS))
                if best_score is None or score < best_score:
                    best, best_score = e, score
        return None if best is None else replace(copy.deepcopy(best), exact=False)

    def record(self, backend: str, kernel: str, spec: Any, dtype: Any, dims: Union[Mapping[str, int], str],
               config: Mapping, time_ms: float, *, candidates: Optional[list] = None, device: Any = None,
               versions: Optional[dict] = None) -> Entry:
        """Store a result (replacing the same key) in the user folder; returns the stored Entry.

        Safe against concurrent writers: exclusive lock, re-read, merge, atomic rename. A corrupt file
        is moved aside to ``<file>.corrupt-<time>-<pid>-<ns>`` (unique); a foreign one raises TuningDBError.
        """
        dev = resolve_device_name(device)
        skey, sdict = spec_key(spec)
        bucket = _bucket_of(dims)
        shape = dict(dims) if not isinstance(dims, str) else None
        entry_dict = {"backend": backend, "kernel": kernel, "spec": skey, "dtype": dtype_name(dtype),
                      "bucket": bucket, "config": _json_native(dict(config), "config"), "time_ms": time_ms,
                      "candidates": _json_native(list(candidates or []), "candidates"),
                      "versions": versions if versions is not None else library_versions(), "timestamp": _now()}
        if sdict is not None:
            entry_dict["spec_dict"] = sdict
        if shape is not None:
            entry_dict["shape"] = shape
        key = entry_key(backend, kernel, skey, entry_dict["dtype"], bucket)
        path = self.path / f"{device_slug(dev)}.json"
        entry = Entry.from_dict(key, entry_dict, device=dev, source=path)  # same checks as reading

        with _exclusive(path):
            doc = self._current_doc(path, dev)
            doc["entries"][key] = entry.to_dict()  # other entries are kept as stored, even invalid ones
            atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return entry

    @staticmethod
    def _current_doc(path: Path, device: str) -> dict:
        """The file's document re-read under the lock, or a fresh one."""
        fresh = {"format": FORMAT, "version": VERSION, "device": device, "entries": {}}
        if not path.exists():
            return fresh
        loaded = _load(path, warn=False)
        if loaded.doc is not None:
            if loaded.device != device:
                raise TuningDBError(f"{path} holds results for {loaded.device!r}, not {device!r}; "
                                    "their names share a slug: pass another TuningDB path")
            return copy.deepcopy(loaded.doc)
        message = loaded.problems[0].message if loaded.problems else "unusable"
        if message.startswith(("foreign", "unsupported")):
            raise TuningDBError(f"{path}: {message}; not overwritten")
        # pid + nanoseconds: two writers (or two in one second) never overwrite each other's backup
        aside = path.with_name(f"{path.name}.corrupt-{_now().replace(':', '')}-{os.getpid()}-{time.time_ns()}")
        os.replace(path, aside)  # keep the damaged bytes for a human, start a fresh file
        warnings.warn(f"lincomp tuning db: {path} was {message}; moved it to {aside.name} and started anew",
                      TuningDBWarning, stacklevel=4)
        return fresh

    def entries(self, device: Any = "all", backend: Optional[str] = None,
                kernel: Optional[str] = None) -> list:
        """All usable entries, user folder shadowing shipped ones; ``device="all"`` lists every device."""
        want = None if device == "all" else resolve_device_name(device)
        seen, out = set(), []
        for folder in self.folders:
            for f in _json_files(folder):
                loaded = _load(f)
                if loaded.device is None or (want is not None and loaded.device != want):
                    continue
                for key, e in loaded.entries.items():
                    if (backend and e.backend != backend) or (kernel and e.kernel != kernel):
                        continue
                    if (loaded.device, key) not in seen:
                        seen.add((loaded.device, key))
                        out.append(copy.deepcopy(e))
        return sorted(out, key=lambda e: (e.device, e.backend, e.kernel, e.spec, e.dtype, e.bucket))

    def validate(self) -> list:
        """Every problem in this database's folders (missing folders are fine)."""
        return validate_paths(f for f in self.folders if f.exists())[0]


def _json_native(value: Any, name: str) -> Any:
    # Stored configs must come back equal to what was measured (a tuple would come back a list).
    try:
        same = json.loads(json.dumps(value, allow_nan=False)) == value
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be JSON data (dicts, lists, str, int, finite float, bool, None): {e}") from None
    if not same:
        raise TypeError(f"{name} must be JSON-native (use lists, not tuples; str keys): {value!r}")
    return value


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``<path>.lock`` (a sidecar: the data file itself gets replaced).

    filelock (a torch dependency, so always installed) takes an OS lock that a crashed writer releases."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path.with_name(path.name + ".lock")), timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout:
        raise TuningDBError(f"{path}: another process has held the write lock for {LOCK_TIMEOUT_S:.0f} s; "
                            "try again, or remove a stuck writer") from None
    try:
        yield
    finally:
        lock.release()
