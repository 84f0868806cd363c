"""benchmarks/slora_bench.py runs on CPU (dummy tiny model, torch kernels), so a GPU session can
rely on it: --ab-gmv runs each adapter run twice, the second with the decode rows of mixed steps
on the MBGMM path (lora_decode_rows_gmv off), and records them side by side; --ab-admit runs
everything again with admit_min_batch=1. Timings are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_slora_bench_ab_gmv_runs_on_cpu(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "slora_bench.py"), "--model", "dummy:tiny", "--n", "3",
           "--rate", "6", "--duration", "3", "--max-len", "24", "--warmup", "0", "--ab-gmv", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "slora_S2_qkvo.json").read_text())
    assert list(report["runs"]) == ["base", "n3", "n3_gmm"]
    flags = {label: run["extra"]["lora_decode_rows_gmv"] for label, run in report["runs"].items()}
    assert flags == {"base": True, "n3": True, "n3_gmm": False}
    side = report["gmv_vs_gmm"]["n3"]
    assert len(side["throughput_req_s"]) == 2 and side["throughput_ratio"] > 0
    assert set(report["over_base"]) == {"base", "n3", "n3_gmm"}


def test_slora_bench_ab_admit_runs_on_cpu(tmp_path):
    """--ab-admit: every run again with admit_min_batch=1 (labels *_admit1, ratios against base_admit1)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "slora_bench.py"), "--model", "dummy:tiny", "--n", "3",
           "--rate", "6", "--duration", "2", "--max-len", "24", "--warmup", "0", "--admit-min", "4", "--ab-admit",
           "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "slora_S2_qkvo.json").read_text())
    assert list(report["runs"]) == ["base", "n3", "base_admit1", "n3_admit1"]
    flags = {label: run["extra"]["admit_min_batch"] for label, run in report["runs"].items()}
    assert flags == {"base": 4, "n3": 4, "base_admit1": 1, "n3_admit1": 1}
    assert all(run["extra"]["admission_deferred_steps"] >= 0 for run in report["runs"].values())
    assert set(report["over_base"]) == {"base", "n3"}
    assert set(report["over_base_admit1"]) == {"base_admit1", "n3_admit1"}
