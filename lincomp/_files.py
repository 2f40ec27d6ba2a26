"""Where the files lincomp ships beside its code live: ``templates/`` and ``tuning_db/``.

In a source checkout they are the repository's top-level folders; an installed wheel carries them as
package data under ``lincomp/_data/`` (pyproject.toml maps the folders there). Both are read through
``importlib.resources``, so a zip or wheel install works as well as a checkout.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

SHIPPED = ("templates", "tuning_db")


@functools.lru_cache(maxsize=None)
def shipped(name: str):
    """The shipped folder ``name`` ("templates" or "tuning_db") as an importlib.resources Traversable.

    Installed package data wins; a checkout falls back to the repository's top-level folder (returned
    even when missing: readers say what is absent).
    """
    if name not in SHIPPED:
        raise ValueError(f"shipped folder must be one of {list(SHIPPED)}, got {name!r}")
    data = resources.files("lincomp").joinpath("_data", name)
    if data.is_dir():
        return data
    return Path(__file__).resolve().parents[1] / name


def shipped_path(name: str) -> Path:
    """:func:`shipped` as a file-system path (wheels install unzipped; code that globs needs a Path)."""
    return Path(str(shipped(name)))


def read_template(target: str, name: str) -> str:
    """The text of ``templates/<target>/<name>`` (e.g. ``read_template("triton", "window_fwd.py.tmpl")``)."""
    path = shipped("templates").joinpath(target, name)
    if not path.is_file():
        raise FileNotFoundError(f"lincomp: template {target}/{name} is missing from {shipped('templates')}; "
                                "reinstall lincomp or run from a full checkout")
    return path.read_text()


__all__ = ["shipped", "shipped_path", "read_template", "SHIPPED"]
