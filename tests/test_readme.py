"""The README's four user steps run as written, in a fresh process (issue: the docs must not rot)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_blocks(section: str) -> list:
    """The ```python blocks of one '## ' section of README.md."""
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {section}")
    end = text.find("\n## ", start + 3)
    body = text[start:end if end != -1 else None]
    return re.findall(r"```python\n(.*?)```", body, re.S)


def test_readme_has_the_four_steps():
    blocks = readme_blocks("The four user steps")
    assert len(blocks) == 1
    for step in ("# 1.", "# 2.", "# 3.", "# 4."):
        assert step in blocks[0], step


@pytest.mark.timeout(1200)
def test_readme_four_steps_run_as_written(tmp_path):
    script = tmp_path / "steps.py"
    script.write_text(readme_blocks("The four user steps")[0])
    env = dict(os.environ, LINCOMP_TUNING_DB=str(tmp_path / "db"), HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=1100)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "ok torch.Size([2, 128, 256])" in run.stdout
    assert list((tmp_path / "db").glob("*.json")), "step 2 stored no tuning results"
