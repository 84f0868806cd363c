"""The real tritonserver serving a GPU model: streamed tokens equal HF+PEFT, metrics move.

    python3 benchmarks/gpu_server_check.py prepare           # the image's python (numpy 2)
    venv/bin/python benchmarks/gpu_server_check.py serve     # python with numpy < 2 (the stub's)

Builds the random GQA checkpoint and adapters of gpu_parity.py, serves them in fp32 on the
GPU (exact comparison), streams concurrent requests for the base model and several adapters
over HTTP generate_stream, and compares every token with HF Transformers + PEFT greedy (fp32,
GPU). Also streams a text prompt and reads the metrics endpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from server_utils import TritonServer, metric_value, write_model_repository  # noqa: E402
from tiny_model import build_adapter  # noqa: E402

from benchmarks.gpu_parity import ADAPTERS, build_model, hf_logits  # noqa: E402
from benchmarks.server_bench import stream_one  # noqa: E402
from client.workload import RequestTiming  # noqa: E402

log = logging.getLogger("gpu_server_check")


def hf_greedy(model, adapter, prompt, n):
    import torch

    ids = list(prompt)
    for _ in range(n):  # teacher-forced full recompute: slow but simple and exact
        ids.append(int(hf_logits(model, adapter, ids, len(ids) - 1, torch.float32)[-1].argmax()))
    return ids[len(prompt):]


def prepare(work: Path, names, prompts, n_new) -> None:
    """Checkpoint, adapters and HF+PEFT reference tokens (needs the image's own numpy)."""
    model = build_model(work / "model")
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        build_adapter(model, work / "adapters" / name, seed=100 + i, **kw)
    refs = [hf_greedy(model, None if n is None else work / "adapters" / n, p, n_new)
            for n, p in zip(names, prompts, strict=True)]
    (work / "refs.json").write_text(json.dumps(refs))


def serve_and_check(work: Path, out: Path, names, prompts, n_new) -> dict:
    """Serve through tritonserver (the stub needs numpy < 2) and compare with the references."""
    refs = json.loads((work / "refs.json").read_text())
    repo = write_model_repository(work / "repo", {"model_dir": str(work / "model"),
                                                  "adapter_dir": str(work / "adapters"), "dtype": "float32"})
    report = {"checks": {}}
    with TritonServer(repo, out / "gpu_server_check_server.log", start_timeout=600) as server:
        outs: list[list[int] | None] = [None] * len(names)

        def run(i):
            body = {"input_ids": prompts[i], "max_tokens": n_new, "ignore_eos": True}
            if names[i]:
                body["adapter_id"] = names[i]
            outs[i] = collect_tokens(server.http_port, body)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(names))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        ok = True
        for i, name in enumerate(names):
            same = outs[i] == refs[i]
            ok &= same
            log.info("%-16s server=%s hf=%s %s", name, outs[i], refs[i], "OK" if same else "MISMATCH")
        report["checks"]["tokens_equal_hf_peft_fp32"] = ok
        text = RequestTiming(arrival=0.0)
        stream_one(server.http_port, {"text_input": "Serving many adapters", "max_tokens": 8}, text, 0, 120)
        report["checks"]["text_stream_ok"] = text.error is None and text.output_tokens > 0
        metrics = server.metrics()
        report["checks"]["adapter_counter_moved"] = metric_value(metrics, "slora_requests_total",
                                                                 adapter="r64-attn") >= 1
        report["checks"]["gpu_metrics_present"] = "nv_gpu_utilization" in metrics
        report["engine_log"] = [ln for ln in server.log_tail(20000).splitlines() if "engine ready" in ln][-1:]
    report["passed"] = all(report["checks"].values())
    return report


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["prepare", "serve"])
    ap.add_argument("--work", default="/tmp/gpu_server_check")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    names = [None, "r1-qv", "r12-all-rslora", "r64-attn", None, "r8-mlp"]
    prompts = [[5 + i, 17, 42 + 3 * i, 99, 3, 7 + i] for i in range(len(names))]
    if args.stage == "prepare":
        prepare(work, names, prompts, 12)
        return 0
    report = serve_and_check(work, out, names, prompts, 12)
    (out / "gpu_server_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=1))
    return 0 if report["passed"] else 1


def collect_tokens(port: int, body: dict) -> list[int]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v2/models/slora/generate_stream", json.dumps(body), {"Content-Type": "application/json"})
    tokens: list[int] = []
    for raw in conn.getresponse():
        line = raw.strip()
        if line.startswith(b"data:"):
            event = json.loads(line[5:])
            ids = event.get("token_ids", [])
            tokens.extend(ids if isinstance(ids, list) else [ids])
            if "error" in event:
                log.error("request %s failed: %s", body, event["error"])
                break
            if event.get("finish_reason"):
                break
    conn.close()
    return tokens


if __name__ == "__main__":
    sys.exit(main())
