"""scripts/soak.py keeps working: a short run (about 20 s of traffic) must pass its own checks
(nothing lost, no page leaked, no unexpected error) and exercise every kind of request."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from server_utils import REPO_ROOT

pytest.importorskip("tritonclient.grpc")


def test_short_soak_loses_nothing_and_leaks_no_page(tmp_path):
    out = tmp_path / "soak.json"
    res = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "soak.py"), "--duration", "20",
                          "--workers", "8", "--seed", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    summary = json.loads(out.read_text())
    assert summary["lost"] == 0 and summary["unexpected_errors"] == 0
    assert summary["pool_idle_end"]["pages_kv"] == 0
    assert summary["pool_end_after_unloading_adapters"] == summary["pool_start"]
    assert summary["completed"] > 0 and summary["cancelled"] > 0
    assert summary["expected_errors"]["bad_input"] > 0
