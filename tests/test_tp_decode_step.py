"""benchmarks/tp_decode_step.py runs end to end on CPU, so a GPU session can rely on it.

Its `graphs` run with a real 2-process engine (gloo, the static buffers of the decode-graph
path): every mode and sync variant is timed on the graph path (no silent eager fallback), and
the profile counts the step's collectives: the broadcast, two base all-reduces per layer, and
the same number of LoRA collectives in every layer. Timings themselves are not asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tp_decode_step_graphs_run_on_cpu(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "tp_decode_step.py"), "--model", "dummy:tiny", "--tp", "2",
           "--batch", "2", "--ctx", "16", "--prefill-batch", "", "--iters", "2", "--warmup", "1", "--runs", "graphs",
           "--out", str(tmp_path), "--work", str(tmp_path / "work"), "--budget", "300"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "tp_decode_step.json").read_text())
    assert report["status"] == {"graphs": "ok"}
    run = report["runs"]["graphs"]
    assert run["tp"] == 2 and run["graphs"] == "static buffers, uncaptured"
    rows = {(r["mode"], r["sync"]): r for r in report["rows"]}
    assert set(rows) == {("lora", "none"), ("lora", "presync"), ("base", "none"), ("base", "presync")}
    for r in rows.values():
        assert r["path"] == "graph" and r["batch"] == 2 and r["ctx"] == 16
        assert 0 < r["gpu_forward_s"] < r["wall_s"] and r["share_s"] > 0 and r["floor_s"] > 0
    assert rows[("lora", "none")]["distinct_adapters"] == 2 and rows[("base", "none")]["adapter_bytes"] == 0
    collectives = {(p["mode"], p["sync"]): p["kinds"]["collective"]["count"] for p in report["profiles"]}
    layers = run["layers"]
    assert collectives[("base", "none")] == 1 + 2 * layers
    lora_extra = collectives[("lora", "none")] - collectives[("base", "none")]
    assert lora_extra > 0 and lora_extra % layers == 0
