"""Attention specs: what a user declares (docs/semantics.md defines the math of every field).

A spec is frozen, hashable, round-trips through a plain dict / JSON, and has a stable ``key()``
used by the tuning database and the kernel cache. Every invalid combination raises ``ValueError`` or
``TypeError`` with a message that names the field and the fix.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Union

FEATURE_MAPS = ("identity", "elu1", "relu", "hedgehog", "hedgehog_exp")
HEDGEHOG_MAPS = ("hedgehog", "hedgehog_exp")
GATES = (None, "scalar", "vector")
COMBINES = (None, "shared", "sum")
SHAPES = ("circle", "square", "tile")
# Longest reach a 1D / terraced window keeps (tokens). A window reaching past the sequence is the same as
# one reaching to its edge, and every kernel indexes tokens with int32: a larger value (2^31, 2^63) is
# clamped to this, which changes no visible pair of any sequence a kernel can hold.
MAX_REACH = 2 ** 30

_TOP_KEYS = ("window", "causal", "prefix", "sinks", "linear", "combine")
_LINEAR_KEYS = ("feature_map", "feature_dim", "gate", "normalize", "chunk_size")
# Keys a dict may carry for humans; ignored by the math. Any other unknown key raises: a spec written
# for a newer lincomp (or for another library) must never run as a different attention.
_OPTIONAL_KEYS = ("name", "description", "paper")


def _int(value: Any, name: str, minimum: int, fix: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}; {fix}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}; {fix}")
    return value


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, got {type(value).__name__} {value!r}")
    return value


def _choice(value: Any, name: str, choices: tuple) -> Any:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def _check_keys(d: Mapping, known: tuple, where: str) -> None:
    if not isinstance(d, Mapping):
        raise TypeError(f"{where} must be a dict, got {type(d).__name__}")
    for key in d:
        if key in known or key in _OPTIONAL_KEYS:
            continue
        if not isinstance(key, str):
            raise TypeError(f"{where}: keys must be strings, got {type(key).__name__} {key!r}")
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
        hint = f"did you mean {close[0]!r}?" if close else f"the keys of {where} are {list(known)}"
        hint += f" (plus {list(_OPTIONAL_KEYS)} for humans)"
        raise ValueError(f"{where}: unknown key {key!r}; {hint}. Unknown keys are rejected so a spec never "
                         "silently runs as a different attention")


def _parse_json(text: str, where: str) -> Any:
    """``json.loads`` with every failure (syntax, nesting too deep to parse) as a ValueError naming ``where``."""
    try:
        d = json.loads(text.lstrip("\ufeff"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} does not parse ({e}); give a JSON object") from None
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply to be a spec; give a JSON object") from None
    if not isinstance(d, dict):
        raise TypeError(f"{where} must hold a JSON object (a dict), got {type(d).__name__}")
    return d


# ----------------------------------------------------------------------------------------- windows
@dataclass(frozen=True)
class Window1D:
    """Query i sees keys i-left .. i+right (positions counted after the prefix)."""

    left: int
    right: int = 0
    kind = "1d"

    def __post_init__(self):
        _int(self.left, "window.left", 0, "give how many keys before the query it sees")
        _int(self.right, "window.right", 0, "use right=0 for a causal sliding window")
        object.__setattr__(self, "left", min(self.left, MAX_REACH))
        object.__setattr__(self, "right", min(self.right, MAX_REACH))

    def to_dict(self) -> dict:
        return {"kind": "1d", "left": self.left, "right": self.right}

    def reach(self, causal: bool) -> int:
        """How far back (in tokens) a query can see: the decode cache length."""
        return self.left

    def __repr__(self) -> str:
        return f"Window1D(left={self.left}, right={self.right})"


@dataclass(frozen=True)
class TerracedWindow:
    """LoLCATs "terraced" blocks: j <= i and block(j) in {block(i) - 1, block(i)}."""

    block: int
    kind = "terraced"

    def __post_init__(self):
        _int(self.block, "window.block", 1, "use the block size in tokens, e.g. 64")
        object.__setattr__(self, "block", min(self.block, MAX_REACH))

    def to_dict(self) -> dict:
        return {"kind": "terraced", "block": self.block}

    def reach(self, causal: bool) -> int:
        return 2 * self.block - 1

    def __repr__(self) -> str:
        return f"TerracedWindow(block={self.block})"


@dataclass(frozen=True)
class GridWindow:
    """2D (rows, cols) or 3D (frames, rows, cols) neighbourhood on a row-major token grid.

    ``circle`` / ``square`` use ``radius``; ``tile`` (sliding tiles, STA; NATTEN when every tile is 1)
    uses ``tile`` (tokens per tile on each axis) and ``kernel`` (odd number of tiles seen on each axis).

    ``pool`` (CLEAR's down-sampled keys/values; an int or one factor per axis, each dividing its axis):
    every block of ``pool`` grid tokens is pooled with the call's ``pool_weight`` (shape = the factors)
    into one extra key/value, ``k~[c] = sum_o pool_weight[o] k[prefix + t(c * f + o)]``; the
    ``P = prod(grid / pool)`` pooled keys follow the L tokens, every grid query sees all of them in the
    same softmax as its window and the prefix, prefix queries see none. Needs causal=false, no linear branch.
    """

    grid: tuple
    radius: Optional[int] = None
    shape: str = "circle"
    tile: Optional[tuple] = None
    kernel: Optional[tuple] = None
    pool: Optional[tuple] = None   # CLEAR's pooled keys/values: a factor per axis (docs/semantics.md: window.pool)

    def __post_init__(self):
        if isinstance(self.grid, (str, bytes)) or not hasattr(self.grid, "__iter__"):
            raise TypeError(f"window.grid must be a list like [64, 64], got {self.grid!r}")
        grid = tuple(self.grid)
        if len(grid) not in (2, 3):
            raise ValueError(f"window.grid must have 2 (rows, cols) or 3 (frames, rows, cols) entries, got {list(grid)}")
        for n, g in enumerate(grid):
            _int(g, f"window.grid[{n}]", 1, "grid sizes are token counts per axis")
        object.__setattr__(self, "grid", grid)
        _choice(self.shape, "window.shape", SHAPES)
        if self.pool is not None:
            object.__setattr__(self, "pool", _pool_factors(self.pool, grid))
        if self.shape == "tile":
            self._check_tiles()
            return
        for name in ("tile", "kernel"):
            if getattr(self, name) is not None:
                raise ValueError(f"window.{name} is only for shape 'tile'; remove it or set shape to 'tile'")
        if self.radius is None:
            raise ValueError(f"window.radius is required for a {self.shape} window, e.g. 8")
        # A circle of radius 0 is empty (dy^2 + dx^2 < 0 never holds): no query would see itself.
        _int(self.radius, "window.radius", 1 if self.shape == "circle" else 0,
             "a circle needs radius >= 1 (strict inequality), a square radius >= 0")

    def _check_tiles(self) -> None:
        nd = len(self.grid)
        if self.radius is not None:
            raise ValueError("window.radius is not used by shape 'tile' (the window is `kernel` tiles per axis); "
                             "remove radius")
        for name in ("tile", "kernel"):
            v = getattr(self, name)
            if v is None:
                raise ValueError(f"window.{name} is required for shape 'tile', e.g. "
                                 "{'kind': '3d', 'grid': [8, 16, 16], 'shape': 'tile', 'tile': [2, 4, 4], "
                                 "'kernel': [3, 3, 3]}")
            if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__") or len(tuple(v)) != nd:
                raise TypeError(f"window.{name} must be a list of {nd} ints (one per grid axis), got {v!r}")
            object.__setattr__(self, name, tuple(v))
        for a, (g, t, k) in enumerate(zip(self.grid, self.tile, self.kernel)):
            _int(t, f"window.tile[{a}]", 1, "tokens per tile along that axis")
            if g % t:
                raise ValueError(f"window.tile[{a}]={t} does not divide window.grid[{a}]={g}; use a divisor of {g}")
            _int(k, f"window.kernel[{a}]", 1, "the number of tiles a query sees along that axis (odd)")
            if k % 2 == 0:
                raise ValueError(f"window.kernel[{a}]={k} must be odd (the query's tile sits in the middle); "
                                 f"use {k - 1} or {k + 1}")
            if k > g // t:
                raise ValueError(f"window.kernel[{a}]={k} is wider than the {g // t} tiles on axis {a} "
                                 f"(grid {g} / tile {t}); use at most {g // t}")

    @property
    def kind(self) -> str:
        return f"{len(self.grid)}d"

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def grid_radius(self) -> int:
        """The radius clamped to the grid: the smallest radius with the same visible pairs when ``radius``
        reaches past the grid's edge (every consumer computes with this: no overflow, no memory blow-up)."""
        if self.shape == "square":
            return min(self.radius, max(self.grid) - 1)
        # circle: sum d^2 < r^2; the largest sum on the grid is sum (g - 1)^2
        return min(self.radius, math.isqrt(sum((g - 1) ** 2 for g in self.grid)) + 1)

    def to_dict(self) -> dict:
        d = {"kind": self.kind, "grid": list(self.grid), "shape": self.shape}
        if self.shape == "tile":
            d.update(tile=list(self.tile), kernel=list(self.kernel))
        else:
            d["radius"] = self.radius
        if self.pool is not None:   # absent when unset: unpooled specs keep their keys
            d["pool"] = list(self.pool)
        return d

    def axis_reach(self) -> tuple:
        """Per axis, the largest |y_a(i) - y_a(j)| of a visible pair (grid coordinate units)."""
        if self.shape == "tile":   # at a border the window shifts inside: kernel * tile - 1 on one side
            return tuple(min(k * t - 1, g - 1) for g, t, k in zip(self.grid, self.tile, self.kernel))
        r = self.grid_radius if self.shape == "square" else self.grid_radius - 1
        return tuple(min(r, g - 1) for g in self.grid)

    @property
    def pooled_tokens(self) -> int:
        """P, the number of pooled keys after the L tokens (0 without ``pool``)."""
        if self.pool is None:
            return 0
        return math.prod(g // f for g, f in zip(self.grid, self.pool))

    def reach(self, causal: bool) -> int:
        # Largest flat backward distance i - j of a visible pair in row-major order.
        strides = [math.prod(self.grid[a + 1:]) for a in range(len(self.grid))]
        return sum(r * s for r, s in zip(self.axis_reach(), strides))

    def __repr__(self) -> str:
        pool = "" if self.pool is None else f", pool={self.pool}"
        if self.shape == "tile":
            return f"GridWindow(grid={self.grid}, shape='tile', tile={self.tile}, kernel={self.kernel}{pool})"
        return f"GridWindow(grid={self.grid}, radius={self.radius}, shape={self.shape!r}{pool})"


def _pool_factors(pool: Any, grid: tuple) -> tuple:
    """``window.pool`` as one factor per grid axis, each dividing its axis."""
    if isinstance(pool, bool) or not isinstance(pool, (int, list, tuple)):
        raise TypeError(f"window.pool must be an int or a list of ints (one per grid axis), got {pool!r}")
    factors = (pool,) * len(grid) if isinstance(pool, int) else tuple(pool)
    if len(factors) != len(grid):
        raise ValueError(f"window.pool has {len(factors)} entries but window.grid {list(grid)} has {len(grid)}; "
                         "give one factor per axis or a single int")
    for a, (f, g) in enumerate(zip(factors, grid)):
        _int(f, f"window.pool[{a}]", 1, "a pooling factor is tokens per pooled cell along the axis, e.g. 4")
        if g % f:
            raise ValueError(f"window.pool[{a}] = {f} does not divide window.grid[{a}] = {g}; "
                             f"use a factor that divides the grid (e.g. one of {[d for d in range(1, g + 1) if g % d == 0][:8]})")
    return factors


Window = Union[Window1D, TerracedWindow, GridWindow]


def window_from_dict(d: Optional[Mapping]) -> Optional[Window]:
    if d is None:
        return None
    if isinstance(d, (Window1D, TerracedWindow, GridWindow)):
        return d
    kind = d.get("kind") if isinstance(d, Mapping) else None
    if isinstance(d, Mapping) and "pool" in d and kind not in ("2d", "3d"):
        raise ValueError(f"window.pool needs a 2d or 3d grid window (the pooled keys are grid blocks), but "
                         f"window.kind is {kind!r}; remove pool or use a grid window")
    if kind == "1d":
        _check_keys(d, ("kind", "left", "right"), "window")
        if "left" not in d:
            raise ValueError("window.left is required for a 1d window, e.g. {'kind': '1d', 'left': 127, 'right': 0}")
        return Window1D(d["left"], d.get("right", 0))
    if kind == "terraced":
        _check_keys(d, ("kind", "block"), "window")
        if "block" not in d:
            raise ValueError("window.block is required for a terraced window, e.g. {'kind': 'terraced', 'block': 64}")
        return TerracedWindow(d["block"])
    if kind in ("2d", "3d"):
        _check_keys(d, ("kind", "grid", "radius", "shape", "tile", "kernel", "pool"), "window")
        shape = d.get("shape", "circle")
        for req in ("grid",) + (("tile", "kernel") if shape == "tile" else ("radius",)):
            if req not in d:
                raise ValueError(f"window.{req} is required for a {kind} {shape} window, e.g. "
                                 + ("{'kind': '3d', 'grid': [8, 16, 16], 'shape': 'tile', 'tile': [2, 4, 4], "
                                    "'kernel': [3, 3, 3]}" if shape == "tile" else
                                    "{'kind': '2d', 'grid': [64, 64], 'radius': 8, 'shape': 'circle'}"))
        seq = lambda x: tuple(x) if isinstance(x, (list, tuple)) else x   # noqa: E731
        w = GridWindow(seq(d["grid"]), d.get("radius"), shape, seq(d.get("tile")), seq(d.get("kernel")),
                       d.get("pool"))
        if w.kind != kind:
            raise ValueError(f"window.kind is {kind!r} but window.grid has {len(w.grid)} entries; "
                             f"use kind {w.kind!r} or give {kind[0]} grid sizes")
        return w
    if not isinstance(d, Mapping):
        raise TypeError(f"window must be null or a dict, got {type(d).__name__}")
    raise ValueError(f"window.kind must be one of ['1d', 'terraced', '2d', '3d'], got {kind!r}")


# ---------------------------------------------------------------------------------- linear branch
@dataclass(frozen=True)
class LinearBranch:
    """Causal gated (or non-causal) linear attention: S_t = diag(a_t) S_{t-1} + phi(k_t)^T v_t."""

    feature_map: str = "identity"
    feature_dim: Optional[int] = None  # E for hedgehog maps (F = 2E); None: F = D, or E from the weights
    gate: Optional[str] = None
    normalize: bool = False
    chunk_size: int = 64

    def __post_init__(self):
        _choice(self.feature_map, "linear.feature_map", FEATURE_MAPS)
        if self.feature_dim is not None:
            if self.feature_map not in HEDGEHOG_MAPS:
                raise ValueError(f"linear.feature_dim is only for hedgehog maps; {self.feature_map!r} keeps "
                                 "F = D: set feature_dim to null")
            _int(self.feature_dim, "linear.feature_dim", 1, "E, the width of each half of the hedgehog map")
        _choice(self.gate, "linear.gate", GATES)
        _bool(self.normalize, "linear.normalize")
        _int(self.chunk_size, "linear.chunk_size", 1, "a chunk of 64 tokens is the usual choice")

    @property
    def has_weights(self) -> bool:
        return self.feature_map in HEDGEHOG_MAPS

    def to_dict(self) -> dict:
        return {"feature_map": self.feature_map, "feature_dim": self.feature_dim, "gate": self.gate,
                "normalize": self.normalize, "chunk_size": self.chunk_size}

    @classmethod
    def from_dict(cls, d: Optional[Mapping]) -> Optional["LinearBranch"]:
        if d is None or isinstance(d, LinearBranch):
            return d
        _check_keys(d, _LINEAR_KEYS, "linear")
        return cls(**{k: d[k] for k in _LINEAR_KEYS if k in d})


# ------------------------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class AttentionSpec:
    """One attention variant. Fields and their math: docs/semantics.md. Build from dicts or the presets."""

    window: Optional[Window] = None
    causal: bool = False
    prefix: int = 0
    sinks: int = 0
    linear: Optional[LinearBranch] = None
    combine: Optional[str] = None
    name: Optional[str] = field(default=None, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "window", window_from_dict(self.window))
        object.__setattr__(self, "linear", LinearBranch.from_dict(self.linear))
        _bool(self.causal, "causal")
        _int(self.prefix, "prefix", 0, "the number of global (text) tokens before the grid")
        _int(self.sinks, "sinks", 0, "the number of sink logits per head (Lizard uses 4)")
        _choice(self.combine, "combine", COMBINES)
        lin, win = self.linear, self.window
        if lin is not None and win is not None and self.combine is None:
            raise ValueError("combine: a spec with a window and a linear branch must say how they combine: "
                             "'shared' (LoLCATs, one normaliser) or 'sum' (Lizard)")
        if self.combine is not None and (lin is None or win is None):
            missing = "linear" if lin is None else "window"
            raise ValueError(f"combine={self.combine!r} needs both a window and a linear branch, but {missing} is "
                             "null; set combine to null or add the missing branch")
        if self.sinks and lin is not None and win is None:
            raise ValueError("sinks enter a softmax denominator, and this spec has only a linear branch; "
                             "set sinks to 0 or add a window with combine='sum'")
        if self.sinks and self.combine == "shared":
            raise ValueError("sinks are not part of combine='shared' (docs/semantics.md section 3); "
                             "set sinks to 0 or use combine='sum'")
        if self.pool is not None and self.causal:
            raise ValueError("window.pool needs causal=false (every grid query sees all pooled keys, also those "
                             "pooling later tokens); set causal to false or remove pool")
        if self.pool is not None and lin is not None:
            raise ValueError("window.pool cannot be combined with a linear branch (the pooled keys join the window's "
                             "softmax only); set linear to null or remove pool")
        if lin is not None and lin.gate is not None and not self.causal:
            raise ValueError(f"linear.gate={lin.gate!r} needs causal=true (a decay from j to i only exists for j <= i); "
                             "set causal to true or gate to null")

    # -- dict / JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {"window": None if self.window is None else self.window.to_dict(), "causal": self.causal,
             "prefix": self.prefix, "sinks": self.sinks,
             "linear": None if self.linear is None else self.linear.to_dict(), "combine": self.combine}
        if self.name is not None:
            d["name"] = self.name
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "AttentionSpec":
        if isinstance(d, AttentionSpec):
            return d
        _check_keys(d, _TOP_KEYS, "spec")
        name = d.get("name")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"spec name must be a string or null, got {type(name).__name__}")
        kwargs = {k: d[k] for k in _TOP_KEYS if k in d}
        spec = cls(name=name, **kwargs)
        # The checks above name the field and the fix; the schema's pydantic models are the final gate, so the
        # exported JSON Schema (spec_json_schema) accepts every dict this does.
        from lincomp.spec_schema import check_spec_dict
        as_dicts = {k: (v.to_dict() if isinstance(v, (Window1D, TerracedWindow, GridWindow, LinearBranch)) else v)
                    for k, v in d.items()}
        check_spec_dict(as_dicts)
        return spec

    def to_json(self, path: Optional[Union[str, Path]] = None, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent, sort_keys=True)
        if path is not None:
            from lincomp._atomic import atomic_write_text
            atomic_write_text(Path(path), text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: Union[str, Path]) -> "AttentionSpec":
        """A spec from JSON text (starting with ``{``) or the path of a JSON file (UTF-8, a BOM is fine)."""
        text = str(text_or_path)
        if not isinstance(text_or_path, Path) and text.lstrip("\ufeff \t\r\n").startswith("{"):
            return cls.from_dict(_parse_json(text, "spec JSON"))
        p = Path(text_or_path)
        where = f"spec file {str(p)!r}"
        if not text.strip():
            raise ValueError("spec path is empty; give a JSON object or the path of a .json file")
        if not p.exists():
            raise ValueError(f"{where} does not exist (and the text is not a JSON object); give a JSON object "
                             "or the path of an existing .json file")
        if not p.is_file():
            raise ValueError(f"{where} is not a regular file (a directory?); give the path of a .json file")
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise ValueError(f"{where} cannot be read ({e.strerror or e})") from None
        try:
            text = raw.decode("utf-8-sig")   # a UTF-8 byte-order mark (some Windows editors add one) is fine
        except UnicodeDecodeError as e:
            raise ValueError(f"{where} is not UTF-8 text ({e.reason} at byte {e.start}); "
                             "save the spec as a UTF-8 JSON file") from None
        return cls.from_dict(_parse_json(text, where))

    @classmethod
    def coerce(cls, spec: Union["AttentionSpec", Mapping, str, Path]) -> "AttentionSpec":
        """An AttentionSpec from a spec, a dict, a JSON string or a JSON file path."""
        if isinstance(spec, AttentionSpec):
            return spec
        if isinstance(spec, Mapping):
            return cls.from_dict(spec)
        if isinstance(spec, (str, Path)):
            return cls.from_json(spec)
        raise TypeError(f"spec must be an AttentionSpec, a dict or a JSON path, got {type(spec).__name__}")

    def canonical_json(self) -> str:
        d = self.to_dict()
        d.pop("name", None)
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    def key(self) -> str:
        """Stable id of the math (names excluded): readable summary + 12 hex of sha256."""
        digest = hashlib.sha256(self.canonical_json().encode()).hexdigest()[:12]
        return f"{self.summary()}-{digest}"

    def summary(self) -> str:
        parts = []
        w = self.window
        if w is None:
            parts.append("dense" if self.linear is None else "")
        elif isinstance(w, Window1D):
            parts.append(f"w1d{w.left}.{w.right}")
        elif isinstance(w, TerracedWindow):
            parts.append(f"terr{w.block}")
        elif w.shape == "tile":
            parts.append(f"{w.kind}{'x'.join(map(str, w.grid))}t{'.'.join(map(str, w.tile))}"
                         f"k{'.'.join(map(str, w.kernel))}")
        else:
            parts.append(f"{w.kind}{'x'.join(map(str, w.grid))}{w.shape[0]}{w.radius}")
        if isinstance(w, GridWindow) and w.pool is not None:
            parts.append(f"pool{'x'.join(map(str, w.pool))}")
        if self.causal:
            parts.append("c")
        if self.prefix:
            parts.append(f"p{self.prefix}")
        if self.sinks:
            parts.append(f"s{self.sinks}")
        if self.linear is not None:
            lin = self.linear
            parts.append(f"lin{lin.feature_map}{lin.feature_dim or ''}{'-' + lin.gate if lin.gate else ''}"
                         f"{'-n' if lin.normalize else ''}")
        if self.combine:
            parts.append(self.combine)
        return "_".join(p for p in parts if p)

    # -- derived facts ---------------------------------------------------------------------------
    @property
    def has_softmax(self) -> bool:
        """True when a softmax (window or dense) branch exists."""
        return self.linear is None or self.window is not None

    @property
    def pool(self) -> Optional[tuple]:
        """The window's pooling factors (one per grid axis), or None: the shape of ``pool_weight``."""
        return getattr(self.window, "pool", None)

    def expected_length(self) -> Optional[int]:
        """The sequence length a grid window fixes (prefix + prod(grid)), else None."""
        if isinstance(self.window, GridWindow):
            return self.prefix + self.window.tokens
        return None

    def with_grid(self, grid) -> "AttentionSpec":
        """The same spec on another grid (e.g. another image size)."""
        if not isinstance(self.window, GridWindow):
            raise ValueError("with_grid needs a 2d/3d window")
        from dataclasses import replace
        return replace(self, window=replace(self.window, grid=tuple(grid)))

    def without_pool(self) -> "AttentionSpec":
        """The spec without ``window.pool``: the window alone, before the pooled keys join (itself if unpooled)."""
        if self.pool is None:
            return self
        from dataclasses import replace
        return replace(self, window=replace(self.window, pool=None))

    # -- FlexAttention (the IR's rule; lincomp.ir.flex, imported on first use) ------------------------
    def mask_mod(self):
        """FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool`` of this spec (token indices, prefix first).

        Only for a softmax over a mask: a linear branch, sinks or pooled keys raise ValueError.
        """
        from lincomp.ir.flex import mask_mod
        return mask_mod(self)

    def block_mask(self, L: Optional[int] = None, *, device="cpu", B: Optional[int] = None,
                   H: Optional[int] = None, BLOCK_SIZE: int = 128):
        """FlexAttention ``BlockMask`` at length ``L`` (grid specs: default prefix + prod(grid)), for
        ``flex_attention(q, k, v, block_mask=spec.block_mask(L))`` with q/k/v [B, H, L, D]."""
        from lincomp.ir.flex import block_mask
        return block_mask(self, L, device=device, B=B, H=H, BLOCK_SIZE=BLOCK_SIZE)

    def __repr__(self) -> str:
        fields = [f"window={self.window!r}"] if self.window is not None else []
        if self.causal:
            fields.append("causal=True")
        if self.prefix:
            fields.append(f"prefix={self.prefix}")
        if self.sinks:
            fields.append(f"sinks={self.sinks}")
        if self.linear is not None:
            fields.append(f"linear={self.linear!r}")
        if self.combine:
            fields.append(f"combine={self.combine!r}")
        if self.name:
            fields.append(f"name={self.name!r}")
        return f"AttentionSpec({', '.join(fields)})"
