"""Run the real tritonserver on free loopback ports for tests (and scripts).

`TritonServer` copies nothing heavy: it builds a model repository in a scratch directory
whose `slora/config.pbtxt` is the checked-in one with some parameters replaced, and whose
`slora/1/model.py` is a symlink to the checked-in model (model.py finds the repository root
through the symlink). The server runs in its own process group, logs to a file, and is
stopped with SIGTERM, then SIGKILL after a grace period (a tritonserver with a dead stub or
a vanished streaming client has been seen ignoring SIGTERM).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from slora_backend.triton_env import install_stub, triton_env  # noqa: E402

MODEL_NAME = "slora"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxies
SOURCE_MODEL = REPO_ROOT / "model_repository" / MODEL_NAME


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_model_repository(dst: str | os.PathLike, parameters: dict[str, str] | None = None,
                           config_text: str | None = None) -> Path:
    """A model repository at dst holding `slora` with the given config.pbtxt parameters."""
    dst = Path(dst)
    model_dir = dst / MODEL_NAME
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    text = config_text if config_text is not None else (SOURCE_MODEL / "config.pbtxt").read_text()
    (model_dir / "config.pbtxt").write_text(set_parameters(text, parameters or {}))
    link = model_dir / "1" / "model.py"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(SOURCE_MODEL / "1" / "model.py")
    return dst


def set_parameters(config_text: str, parameters: dict[str, str]) -> str:
    """Replace (or add) `parameters: { key: K, value: { string_value: V } }` entries."""
    lines = []
    for line in config_text.splitlines():
        m = re.match(r'\s*parameters\s*:\s*{\s*key\s*:\s*"([^"]+)"', line)
        if m and m.group(1) in parameters:
            continue
        lines.append(line)
    for key, value in parameters.items():
        lines.append(f'parameters: {{ key: "{key}", value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for tritonserver: library paths, and this interpreter's bin first on PATH.

    The Python-backend stub's embedded interpreter ignores PYTHONPATH; it finds its
    site-packages from the `python3` on PATH, so the venv's bin directory must come first
    (otherwise it may load another numpy, and numpy >= 2 corrupts BYTES tensors in the stub).
    """
    env = dict(triton_env()["env"])
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
    env.pop("VIRTUAL_ENV", None)
    env["SLORA_REPO_ROOT"] = str(REPO_ROOT)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra or {})
    return env


class TritonServer:
    """A tritonserver process on free loopback ports; use as a context manager."""

    def __init__(self, model_repository: str | os.PathLike, log_path: str | os.PathLike, *,
                 env: dict[str, str] | None = None, extra_args: list[str] | None = None,
                 start_timeout: float = 180.0):
        self.model_repository = Path(model_repository)
        self.log_path = Path(log_path)
        self.env = server_env(env)
        self.extra_args = list(extra_args or [])
        self.http_port = self.grpc_port = self.metrics_port = 0
        self.proc: subprocess.Popen | None = None
        self.start_timeout = start_timeout

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, timeout: float = 180.0) -> TritonServer:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("this TritonServer is already running")
        info = triton_env()
        if not info["stub_ok"]:
            install_stub(info)
        for attempt in range(3):  # a free port can be taken between probing and binding
            self.http_port, self.grpc_port, self.metrics_port = (free_port() for _ in range(3))
            cmd = [
                info["tritonserver"],
                f"--model-repository={self.model_repository}",
                f"--backend-directory={info['backend_dir']}",
                "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
                "--exit-timeout-secs=5",
                *self.extra_args,
            ]
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as log:
                log.write(f"\n=== {' '.join(cmd)}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                             env=self.env, start_new_session=True)
            try:
                self.wait_ready(timeout)
                return self
            except RuntimeError:
                self.stop()
                if attempt == 2 or "already in use" not in self.log_tail(4000):
                    raise
        return self

    def wait_ready(self, timeout: float) -> None:
        wait_ready(f"http://{self.http_url}", self.proc, timeout, self.log_tail)

    def stop(self, grace: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        stop_process_group(proc, grace)

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def metrics(self) -> str:
        with _OPENER.open(self.metrics_url, timeout=5) as r:
            return r.read().decode()

    def __enter__(self) -> TritonServer:
        return self.start(self.start_timeout)

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_ready(base_url: str, proc: subprocess.Popen, timeout: float, log_tail=lambda: "") -> None:
    """Poll `<base_url>/v2/models/slora/ready` until 200; fail early if the process exits."""
    deadline = time.monotonic() + timeout
    url = f"{base_url}/v2/models/{MODEL_NAME}/ready"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tritonserver exited with {proc.returncode}:\n{log_tail()}")
        try:
            with _OPENER.open(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"tritonserver not ready after {timeout:.0f}s:\n{log_tail()}")


def stop_process_group(proc: subprocess.Popen | None, grace: float = 15.0) -> None:
    """SIGTERM the process group `proc` leads, SIGKILL it after `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    # The stub runs in the same group; make sure nothing of it is left behind.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"([A-Za-z_:][\w:]*)(?:{(.*)})?\s+(\S+)", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


# -- faults, recovery and soak (tests/test_faults.py, tests/test_recovery.py, scripts/soak.py) --


class ServeScript:
    """scripts/serve.sh (tritonserver under scripts/watchdog.py) on free loopback ports.

    Same attributes as TritonServer (http_url, grpc_url, metrics_url, proc, log_tail); `proc`
    is the watchdog, whose process group holds tritonserver and its stub.
    """

    def __init__(self, log_path: str | os.PathLike, *, model: str | os.PathLike,
                 adapters: str | os.PathLike, args: list[str] | None = None,
                 server_args: list[str] | None = None, env: dict[str, str] | None = None,
                 start_timeout: float = 180.0):
        self.log_path = Path(log_path)
        self.model, self.adapters = str(model), str(adapters)
        self.args, self.server_args = list(args or []), list(server_args or [])
        self.env = dict(os.environ, **(env or {}))
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.http_port = self.grpc_port = self.metrics_port = 0

    http_url = TritonServer.http_url
    grpc_url = TritonServer.grpc_url
    metrics_url = TritonServer.metrics_url
    log_tail = TritonServer.log_tail
    metrics = TritonServer.metrics

    def start(self) -> ServeScript:
        self.http_port, self.grpc_port, self.metrics_port = (free_port() for _ in range(3))
        cmd = [str(REPO_ROOT / "scripts" / "serve.sh"), "--model", self.model,
               "--adapters", self.adapters, "--http-port", str(self.http_port),
               "--grpc-port", str(self.grpc_port), "--metrics-port", str(self.metrics_port),
               *self.args, "--", "--exit-timeout-secs=5", *self.server_args]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)
        try:
            wait_ready(f"http://{self.http_url}", self.proc, self.start_timeout, self.log_tail)
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self, grace: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        stop_process_group(proc, grace)

    def __enter__(self) -> ServeScript:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@functools.cache
def _watchdog():
    """scripts/watchdog.py as a module (a script, not a package: loaded by path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("slora_watchdog", REPO_ROOT / "scripts" / "watchdog.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (tritonserver -> Python-backend stubs), walked as the watchdog does."""
    return [pid, *_watchdog().descendants(pid)]


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return os.path.basename(f.read().split(b"\0")[0].decode(errors="replace"))
    except OSError:
        return ""


def stub_pids(pid: int) -> list[int]:
    """The Python-backend stub processes under pid."""
    return [p for p in process_tree(pid) if process_name(p) == "triton_python_backend_stub"]


def server_pids(pid: int) -> list[int]:
    """tritonserver and stub processes under pid (pid itself included when it is one)."""
    return [p for p in process_tree(pid)
            if process_name(p) in ("tritonserver", "triton_python_backend_stub")]


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of the given processes (VmRSS), summed; vanished ones count 0."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError):
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
    return total


def http_json(url: str, path: str, body: dict | None = None, timeout: float = 10.0
              ) -> tuple[int, dict | list | str]:
    """(status, parsed JSON body or text) of GET (body None) / POST to http://url/path;
    status 0 when the server cannot be reached."""
    import json

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{url}{path}", data=data,
                                 method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(req, timeout=timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def model_ready(url: str) -> bool:
    return http_json(url, f"/v2/models/{MODEL_NAME}/ready", timeout=5)[0] == 200


def engine_stats(url: str, timeout: float = 30.0) -> dict:
    """The engine's counters through the model's `stats` command (raises if it errs)."""
    import json

    status, body = http_json(url, f"/v2/models/{MODEL_NAME}/generate", {"command": "stats"},
                             timeout)
    if status != 200 or not isinstance(body, dict):
        raise RuntimeError(f"stats command failed: HTTP {status} {body}")
    return json.loads(body["text_output"])
