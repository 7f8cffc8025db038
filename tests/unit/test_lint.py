"""The source tree passes ruff's checks of names and imports: undefined names (F), unsorted
imports (I), and an import kept under `if TYPE_CHECKING:` that runs at run time (TC004) -- a
NameError only the path that uses it would find (the initial sync's pacer, 2026-11-28)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _ruff() -> str | None:
    beside = os.path.join(os.path.dirname(sys.executable), "ruff")
    return beside if os.access(beside, os.X_OK) else shutil.which("ruff")


@pytest.mark.skipif(bool(os.environ.get("DMREPL_TEST_INSTALLED")),
                    reason="the package tier tests the installed wheel; the unit tier lints the tree")
def test_the_tree_passes_ruff():
    ruff = _ruff()
    assert ruff is not None, "ruff is missing: scripts/setup --tests installs it (pyproject's test extras)"
    r = subprocess.run([ruff, "check", "--select", "F,I,TC004", "dmrepl", "tests", "bench"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
