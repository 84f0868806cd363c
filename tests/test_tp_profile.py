"""benchmarks/tp_profile.py runs end to end on CPU (gloo, 2 processes, then 1 in its own
process), so a GPU session can rely on it: every TP size gives prefill-only steps for the base
model and for adapters, with the enqueue/forward split and the profiles filled in. The
profile must see the LoRA collectives that only adapter steps have. Timings are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tp_profile_runs_on_cpu(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "tp_profile.py"), "--model", "dummy:tiny", "--tp", "2,1",
           "--tokens", "12", "--requests", "3", "--bursts", "1", "--ranks", "8,4", "--top", "40",
           "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "tp_profile.json").read_text())
    assert [r["tp"] for r in report["runs"]] == [2, 1]
    for run in report["runs"]:
        for kind in ("base", "lora"):
            r = run[kind]
            assert r["counters"]["prefill_steps"] >= 1 and r["counters"]["decode_steps"] == 0
            assert r["tokens_per_step"] > 0 and 0 < r["enqueue_ms"] <= r["forward_ms"] * 1.01
            assert r["top_host"] and r["python_top"]
    ops = {kind: {row["op"] for row in report["runs"][0][kind]["top_host"]} for kind in ("base", "lora")}
    assert any("allgather" in op for op in ops["lora"]) and not any("allgather" in op for op in ops["base"])


def test_tp_profile_with_decode_rows_profiles_mixed_steps_and_the_split(tmp_path):
    """--decode-rows: requests decode throughout, so the bursts run as mixed steps, and the
    third kind puts those decode rows on the MBGMV kernels (the decode-row split) under TP."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "tp_profile.py"), "--model", "dummy:tiny", "--tp", "2",
           "--tokens", "12", "--requests", "3", "--bursts", "1", "--ranks", "8,4", "--top", "40",
           "--decode-rows", "3", "--decode-tokens", "400", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = json.loads((tmp_path / "tp_profile.json").read_text())["runs"][0]
    assert run["tp"] == 2 and run["decode_rows"] == 3
    for kind in ("base", "lora", "lora_split"):
        r = run[kind]
        assert r["counters"]["prefill_steps"] >= 1 and r["forwards"] >= 1
        assert r["counters"]["mixed_steps"] >= 1  # the decoding requests rode in the bursts' steps
    assert run["decode_part_steps"] >= 1  # only lora_split's steps split
