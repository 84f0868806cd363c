"""benchmarks/kernel_bench.py --mixed runs end to end on CPU (Triton's interpreter, tiny sizes),
so a GPU session can rely on it: the mixed step's q,k,v LoRA point, every row on MBGMM against
the decode rows on MBGMV, both timed and their outputs compared. Timings are not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_bench_mixed_runs_on_cpu(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "kernel_bench.py"), "--mixed", "--decode-rows", "1,5",
           "--prompts", "2", "--prompt-len", "8", "--reps", "1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "kernel_mixed.json").read_text())
    assert [r["decode_rows"] for r in report["rows"]] == [1, 5]
    for r in report["rows"]:
        assert r["prompt_tokens"] == 16 and r["distinct_adapters"] == 2 + r["decode_rows"]
        assert r["decode_path"] == "MBGMV" and r["decode_rank_bucket"] in (8, 16, 32, 64)
        assert r["combined_s"] > 0 and r["split_s"] > 0 and r["split_decode_part_s"] > 0
        assert r["rel_err_split_vs_combined"] < 1e-5 and r["rel_err_split_vs_torch"] < 1e-5
