#!/usr/bin/env bash
# CI wheel check: build the wheel, install it into a fresh environment (no source tree on the path), and
# from a directory outside the checkout compile and run a spec on TVM whose config comes from a tuning
# entry shipped inside the wheel, checked against the reference. Usage: .ci/wheel_check.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="${1:-${PY:-.venv/bin/python}}"
PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/lincomp-wheel.XXXXXX")"
trap 'rm -rf "$WORK" "$ROOT/build" "$ROOT/lincomp.egg-info"' EXIT
start=$SECONDS

# 1. the wheel (setuptools from the environment: no network; a stale build/ could carry deleted modules)
rm -rf build lincomp.egg-info
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$WORK/dist" . >/dev/null
WHEEL="$(ls "$WORK"/dist/lincomp-*.whl)"

# 2. a fresh venv that sees the pinned dependencies (torch, tvm, ...) of $PY's environment through a .pth
#    line, but not its lincomp: the .pth files of that directory (an editable install) are not processed
"$PY" -m venv --without-pip "$WORK/venv"
SITE="$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' > "$SITE/lincomp-deps.pth"
"$PY" -m pip -q --disable-pip-version-check --python "$WORK/venv/bin/python" install --no-deps "$WHEEL" >/dev/null

# 3. outside the checkout, with an empty user tuning database: only the shipped entries can be found
mkdir -p "$WORK/run"
cd "$WORK/run"
LINCOMP_TUNING_DB="$WORK/user_db" LINCOMP_CACHE_DIR="${LINCOMP_CACHE_DIR:-$WORK/cache}" \
PYTHONNOUSERSITE=1 PYTHONPATH= "$WORK/venv/bin/python" - "$ROOT" <<'PYEOF'
import json, sys
from pathlib import Path

import torch

import lincomp
from lincomp._files import shipped
from lincomp.reference import reference
from lincomp.spec import AttentionSpec
from lincomp.testing import random_inputs, rel_err
from lincomp.tuning import device_name, device_slug

root = Path(sys.argv[1]).resolve()
here = Path(lincomp.__file__).resolve()
assert root not in here.parents, f"lincomp was imported from the checkout ({here}), not the wheel"
db_dir = Path(str(shipped("tuning_db")))
templates = Path(str(shipped("templates")))
assert here.parent in db_dir.parents and here.parent in templates.parents, (db_dir, templates)
assert any(templates.glob("triton/*.tmpl")), "no Triton templates in the wheel"

dev = device_name("cpu")
file = db_dir / f"{device_slug(dev)}.json"
if not file.is_file():
    sys.exit(f"wheel check: no shipped tuning file for this CPU ({dev!r}: {file.name}); tune one and ship it")
# forward entries: the check runs an inference call (backward entries are read by training calls)
entries = [e for e in json.loads(file.read_text())["entries"].values()
           if e["backend"] == "tvm" and e["kernel"].endswith("_fwd")]
# the cheapest shipped entry: a pure linear spec if there is one, then the shortest length
entries.sort(key=lambda e: (e["spec_dict"]["window"] is not None, e["shape"]["L"]))
entry = entries[0]
spec = AttentionSpec.from_dict(entry["spec_dict"])
shape = entry["shape"]
x = random_inputs(spec, B=1, H=shape["H"], L=shape["L"], D=shape["D"], seed=0)
kern = lincomp.compile(spec, target="tvm")
with torch.no_grad():
    o = kern(**x)
choice = kern.config[entry["kernel"]]
assert choice["source"] == "db", f"config did not come from the shipped entry: {choice}"
assert Path(choice["origin"]).resolve() == file.resolve(), choice["origin"]
assert choice["params"] == {**choice["params"], **entry["config"]}, (choice["params"], entry["config"])
err = rel_err(o, reference(spec, **{k: v.double() for k, v in x.items()}))
assert err <= 1e-4, f"rel err {err:.2e} against the reference"
print(f"wheel check: {spec.summary()} L={shape['L']} on TVM from {file.name} "
      f"({entry['kernel']} {choice['params']}), rel err {err:.1e}")
PYEOF
echo "wheel check passed in $((SECONDS - start)) s ($(basename "$WHEEL"))"
