"""Report what the environment holds (run at the end of scripts/setup.sh).

Prints the versions of the Python packages the project uses and whether the tritonserver
and perf_analyzer binaries start. Exits 0 (unless --strict); problems are warnings.

    python -m slora_backend.env_check            # versions, binaries start
    python -m slora_backend.env_check --probe    # also serve a tiny Python-backend model
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

if __package__ in (None, ""):  # run as a plain script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from slora_backend.triton_env import triton_env  # noqa: E402

log = logging.getLogger("env_check")

PACKAGES = ("torch", "triton", "transformers", "peft", "safetensors", "numpy", "tritonclient")


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        try:
            return getattr(importlib.import_module(name), "__version__", "?")
        except Exception:
            return None


def _run(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return -1, str(e)
    return p.returncode, (p.stdout + p.stderr).strip()

_PROBE_CONFIG = """
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "text_input" data_type: TYPE_STRING dims: [1] } ]
output [ { name: "text_output" data_type: TYPE_STRING dims: [-1] } ]
"""
_PROBE_MODEL = """
import json, sys
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()[0]
            info = {"echo": text.decode(), "numpy": np.__version__, "prefix": sys.prefix}
            out = pb_utils.Tensor("text_output", np.array([json.dumps(info).encode()], np.object_))
            request.get_response_sender().send(
                pb_utils.InferenceResponse(output_tensors=[out]),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
"""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def probe_server(timeout: float = 60.0) -> str | None:
    """Serve a tiny decoupled Python-backend model with tritonserver and send it a string.

    Checks the path a real request takes: the stub starts with this environment's packages
    (numpy<2: BYTES tensors are corrupted otherwise) and a BYTES input/output round-trips.
    Returns None when it worked, else a description of the failure.
    """
    info = triton_env()
    with tempfile.TemporaryDirectory(prefix="slora_probe_") as tmp:
        mdir = Path(tmp, "probe", "1")
        mdir.mkdir(parents=True)
        (mdir.parent / "config.pbtxt").write_text(_PROBE_CONFIG)
        (mdir / "model.py").write_text(_PROBE_MODEL)
        http, grpc, metrics = _free_ports(3)
        cmd = [info["tritonserver"], f"--model-repository={tmp}",
               f"--backend-directory={info['backend_dir']}", f"--http-port={http}",
               f"--grpc-port={grpc}", f"--metrics-port={metrics}", "--log-verbose=0"]
        log_path = Path(tmp, "server.log")
        with open(log_path, "wb") as logf:
            proc = subprocess.Popen(cmd, env=info["env"], stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            base = f"http://127.0.0.1:{http}/v2/models/probe"
            deadline = time.time() + timeout
            while True:
                if proc.poll() is not None:
                    return f"tritonserver exited ({proc.returncode}): {_tail(log_path)}"
                try:
                    with urllib.request.urlopen(f"{base}/ready", timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.time() > deadline:
                    return f"model not ready after {timeout:.0f} s: {_tail(log_path)}"
                time.sleep(0.5)
            req = urllib.request.Request(f"{base}/generate", method="POST",
                                         data=json.dumps({"text_input": "héllo"}).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as r:
                    body = json.loads(r.read())
            except OSError as e:
                detail = e.read().decode() if hasattr(e, "read") else str(e)
                return f"request failed: {detail} {_tail(log_path)}"
            out = json.loads(body["text_output"] if isinstance(body["text_output"], str)
                             else body["text_output"][0])
            log.info("probe: stub numpy %s, prefix %s", out["numpy"], out["prefix"])
            if out["echo"] != "héllo":
                return f"BYTES round trip broken: sent 'héllo', got {out['echo']!r}"
            return None
        finally:
            _stop(proc)


def _tail(path: Path, n: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, SIGKILL after a grace period."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def check(probe: bool = False) -> list[str]:
    """Log the report; return the list of warnings."""
    warnings: list[str] = []
    log.info("python %s (%s)", sys.version.split()[0], sys.executable)
    for name in PACKAGES:
        v = _version(name)
        if v is None:
            warnings.append(f"package {name} is not installed")
        log.info("%-13s %s", name, v or "MISSING")

    info = triton_env()
    env = info["env"]
    ts = info["tritonserver"]
    log.info("tritonserver  %s", ts)
    if not Path(ts).is_file():
        warnings.append(f"tritonserver not found at {ts}")
    else:
        rc, out = _run([ts, "--help"], env)
        if rc != 0 and "Usage" not in out and "--model-repository" not in out:
            warnings.append(f"tritonserver --help failed (rc={rc}): {out[-300:]}")
        else:
            log.info("tritonserver  starts (--help ok)")
    log.info("backend dir   %s", info["backend_dir"])
    if not info["stub_ok"]:
        warnings.append(
            f"Python-backend stub for Python {info['python_version']} is not installed in "
            f"{info['backend_dir']}/python (run: python slora_backend/triton_env.py --install-stub)"
        )
    pa = info["perf_analyzer"]
    log.info("perf_analyzer %s", pa)
    if not Path(pa).is_file():
        warnings.append(f"perf_analyzer not found at {pa}")
    else:
        rc, out = _run([pa, "--help"], env)
        if "error while loading shared libraries" in out or ("Usage" not in out and rc != 0):
            warnings.append(f"perf_analyzer does not start (rc={rc}): {out[-300:]}")
        else:
            log.info("perf_analyzer starts (--help ok)")
    if probe and Path(ts).is_file():
        t0 = time.time()
        err = probe_server()
        if err:
            warnings.append(f"tritonserver probe model failed: {err}")
        else:
            log.info("tritonserver  serves a Python-backend model (BYTES in/out ok, %.1f s)",
                     time.time() - t0)
    log.info("LD_LIBRARY_PATH %s", env["LD_LIBRARY_PATH"])
    log.info("PYTHONPATH      %s", env["PYTHONPATH"])
    for w in warnings:
        log.warning("%s", w)
    if not warnings:
        log.info("environment OK")
    return warnings


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Report the environment; always exits 0.")
    ap.add_argument("--probe", action="store_true",
                    help="also start tritonserver with a tiny Python-backend model")
    ap.add_argument("--strict", action="store_true", help="exit 1 when there are warnings")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[env_check] %(levelname)s %(message)s")
    warnings = check(probe=args.probe)
    return 1 if (warnings and args.strict) else 0


if __name__ == "__main__":
    sys.exit(main())
