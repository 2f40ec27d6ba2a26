"""The repository's shape: one-way imports, shipped files found through importlib.resources, the wheel's
package list, and docs that exist (docs/semantics.md, never a file the repository does not carry)."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_package_list_matches_the_tree():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "lincomp").rglob("__init__.py")}
    assert listed - found == {"lincomp._data.templates", "lincomp._data.tuning_db"}, "pyproject lists a lost package"
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    assert cfg["package-dir"] == {"lincomp._data.templates": "templates", "lincomp._data.tuning_db": "tuning_db"}


def test_shipped_files_are_found():
    from lincomp._files import read_template, shipped
    from lincomp.tuning.db import SHIPPED_DB
    assert Path(str(shipped("tuning_db"))) == SHIPPED_DB
    assert any(SHIPPED_DB.glob("*.json")), "tuning_db/ ships no device file"
    assert "def window_fwd" in read_template("triton", "window_fwd.py.tmpl")
    with pytest.raises(FileNotFoundError, match="missing"):
        read_template("triton", "no_such.py.tmpl")
    with pytest.raises(ValueError, match="shipped folder"):
        shipped("benchmarks")


def test_docs_point_at_the_repositorys_own_semantics():
    text = (ROOT / "docs" / "semantics.md").read_text()
    for n in range(1, 7):
        assert re.search(rf"^## {n}\. ", text, re.M), f"docs/semantics.md lacks section {n}"
    old = "SEMANTICS" + ".md"   # a file the repository does not carry
    offenders = [str(p.relative_to(ROOT)) for folder in ("lincomp", "templates", "tests", "benchmarks")
                 for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".tmpl") and old in p.read_text()]
    assert not offenders, f"these point at {old} instead of docs/semantics.md: {offenders}"


def test_import_layers_hold():
    """The import-linter contracts of pyproject.toml (make test runs lint-imports too)."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed")
    res = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
