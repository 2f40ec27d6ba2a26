"""The JSON form of a spec as pydantic models: the validator of every spec dict and its exported JSON Schema.

``AttentionSpec.from_dict`` (hence ``from_json``, ``coerce`` and every CLI) checks a dict first field by field
(its messages name the field and the fix), then with :class:`SpecDict`: strict types (no bool for an int, no
float for an int), the choices of each string, the bounds of each number and ``extra="forbid"`` at every level.
The rules that tie fields together (``combine`` needs both branches, ``tile`` divides ``grid``, ...) are the
dataclasses' (``lincomp/spec.py``); each is stated in the description of the field it constrains.
``spec_json_schema()`` is the JSON Schema of exactly these models (``lincomp explain --schema`` prints it).
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from lincomp.spec import COMBINES, FEATURE_MAPS, GATES, MAX_REACH, SHAPES

Count = Annotated[StrictInt, Field(ge=0)]
Positive = Annotated[StrictInt, Field(ge=1)]


class _Strict(BaseModel):
    """Unknown keys are rejected (a spec for a newer lincomp must never run as another attention); ``name``,
    ``description`` and ``paper`` are for humans and ignored by the math."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Optional[Any] = Field(None, description="for humans; the top-level name must be a string or null")
    description: Optional[Any] = Field(None, description="for humans")
    paper: Optional[Any] = Field(None, description="for humans")


class Window1DDict(_Strict):
    """Query i sees keys i-left .. i+right (positions counted after the prefix)."""

    kind: Literal["1d"]
    left: Count = Field(description=f"keys before the query it sees (values above {MAX_REACH} act as {MAX_REACH})")
    right: Count = Field(0, description="keys after the query it sees; 0 for a causal sliding window")


class TerracedWindowDict(_Strict):
    """LoLCATs terraced blocks: j <= i and block(j) in {block(i) - 1, block(i)}."""

    kind: Literal["terraced"]
    block: Positive = Field(description="block size in tokens, e.g. 64")


class GridWindowDict(_Strict):
    """2D (rows, cols) or 3D (frames, rows, cols) neighbourhood on a row-major token grid."""

    kind: Literal["2d", "3d"] = Field(description="'2d' with 2 grid sizes, '3d' with 3")
    grid: List[Positive] = Field(min_length=2, max_length=3, description="tokens per axis, one entry per axis")
    shape: Literal[SHAPES] = Field(
        "circle", description="circle / square use radius; tile uses tile and kernel")
    radius: Optional[Count] = Field(None, description="required for circle (>= 1) and square (>= 0); not for tile")
    tile: Optional[List[Positive]] = Field(
        None, min_length=2, max_length=3, description="shape 'tile' only: tokens per tile on each axis, dividing grid")
    kernel: Optional[List[Positive]] = Field(
        None, min_length=2, max_length=3,
        description="shape 'tile' only: odd number of tiles seen on each axis, at most grid / tile")
    pool: Optional[Union[Positive, List[Positive]]] = Field(
        None, description="CLEAR's pooled keys: one factor per axis (or one for all) dividing grid; "
                          "needs causal=false and no linear branch")


Window = Annotated[Union[Window1DDict, TerracedWindowDict, GridWindowDict], Field(discriminator="kind")]


class LinearBranchDict(_Strict):
    """Causal gated (or non-causal) linear attention: S_t = diag(a_t) S_{t-1} + phi(k_t)^T v_t."""

    feature_map: Literal[FEATURE_MAPS] = "identity"
    feature_dim: Optional[Positive] = Field(None, description="hedgehog maps only: E, the width of each half")
    gate: Optional[Literal[tuple(g for g in GATES if g)]] = Field(None, description="needs causal=true")
    normalize: StrictBool = False
    chunk_size: Positive = 64


class SpecDict(_Strict):
    """One attention variant (the dict / JSON form of ``lincomp.AttentionSpec``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="lincomp attention spec")

    name: Optional[StrictStr] = Field(None, description="for humans; not part of the spec's key")
    window: Optional[Window] = None
    causal: StrictBool = False
    prefix: Count = Field(0, description="global (text) tokens before the grid")
    sinks: Count = Field(0, description="sink logits per head; needs a window, not with combine='shared'")
    linear: Optional[LinearBranchDict] = None
    combine: Optional[Literal[tuple(c for c in COMBINES if c)]] = Field(
        None, description="required exactly when both window and linear are set")


def check_spec_dict(d: dict) -> None:
    """Raise ValueError naming the field when ``d`` is not a spec dict (as ``SpecDict`` defines it)."""
    try:
        SpecDict.model_validate(d)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p not in ("1d", "terraced", "2d", "3d")) or "spec"
        raise ValueError(f"spec: {where}: {first['msg']} (got {first.get('input')!r}); see "
                         "lincomp.spec_json_schema() for the accepted form") from None


@functools.lru_cache(maxsize=None)
def _schema() -> str:
    import json
    return json.dumps(SpecDict.model_json_schema(), sort_keys=True)


def spec_json_schema() -> dict:
    """The JSON Schema (draft 2020-12) of a spec dict: ``lincomp.spec_json_schema()``."""
    import json
    return json.loads(_schema())


__all__ = ["SpecDict", "check_spec_dict", "spec_json_schema"]
