#!/usr/bin/env python3
"""Keep the `slora` model serving: probe it, reload it through Triton's repository API, and
restart tritonserver when nothing else can end what a dead model left behind.

    watchdog.py --http 127.0.0.1:8000 [options] -- /path/to/tritonserver ARGS...   (supervise)
    watchdog.py --http 127.0.0.1:8000 [options]                                    (attach)

scripts/serve.sh runs the first form. tritonserver must run with
`--model-control-mode=explicit --load-model=slora` (the repository API needs it).

Why this exists (tritonserver 2.51, Python backend; docs/platform.md):
* Nothing restarts a Python-backend stub that died (SIGKILL, OOM, a segfault in a kernel), and
  `/v2/models/slora/ready` keeps answering 200 while every request fails with "Stub process
  ... is not healthy". Only unloading makes readiness false; unload + load brings it back.
* The streams that were in flight on the dead stub hang: no response, no error. They also keep
  the unload from ever completing (the model stays UNLOADING), and cancelling them from the
  client does not release them. Restarting tritonserver is the only thing that closes them,
  so their clients get errors instead of waiting for their own timeouts.

Probe: `command=stats` through `POST /v2/models/<model>/generate` every --interval seconds,
--probe-timeout each. An error that says the model cannot serve (dead stub, stopped engine,
model unloaded or unavailable) starts recovery at once; timeouts and other failures only after
--failures in a row (a busy CPU can be slow, and healthy streams must not be cut for that).

Recovery: unload (readiness turns false at once) -> wait up to --unload-grace for the unload
to finish -> load (with backoff). If the unload cannot finish (requests of the dead instance
hold it) and this process started tritonserver: restart tritonserver (SIGTERM, SIGKILL after
3 s), which ends those requests with connection errors and loads the model afresh. Adapters
are read from the adapter directory by name on first use, so they come back with the model.

Standard library only; logs one line per event on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

log = logging.getLogger("watchdog")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxies
# Error texts after which the model cannot serve until it is reloaded.
FATAL_MARKERS = ("not healthy", "engine has stopped", "unknown model", "not ready",
                 "no available versions", "unavailable")


class Http:
    """The few Triton HTTP endpoints the watchdog needs."""

    def __init__(self, base: str, model: str):
        self.base = base if "://" in base else f"http://{base}"
        self.model = model

    def call(self, method: str, path: str, body: dict | None = None,
             timeout: float = 10.0) -> tuple[int, str]:
        """(HTTP status, body text); status 0 and the reason when the server cannot be reached."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with _OPENER.open(req, timeout=timeout) as r:
                return r.status, r.read().decode(errors="replace")
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")
        except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
            return 0, str(getattr(e, "reason", e))

    def ready(self) -> bool:
        return self.call("GET", f"/v2/models/{self.model}/ready", timeout=5)[0] == 200

    def state(self) -> str:
        """The model's state in the repository index: READY, UNLOADING, UNAVAILABLE, LOADING..."""
        status, text = self.call("POST", "/v2/repository/index", {}, timeout=5)
        if status != 200:
            return "UNREACHABLE"
        with contextlib.suppress(ValueError, TypeError):
            for entry in json.loads(text):
                if entry.get("name") == self.model:
                    return entry.get("state") or "UNKNOWN"
        return "UNKNOWN"

    def probe(self, timeout: float) -> tuple[bool, str, bool]:
        """(healthy, why, fatal): one cheap inference (command=stats)."""
        status, text = self.call("POST", f"/v2/models/{self.model}/generate",
                                 {"command": "stats"}, timeout=timeout)
        if status == 200:
            try:
                stats = json.loads(json.loads(text)["text_output"])
                if stats.get("alive"):
                    return True, "", False
                return False, "engine not alive", True
            except (ValueError, KeyError, TypeError) as e:
                return False, f"unreadable probe answer: {e}", False
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            text = json.loads(text).get("error", text)
        why = f"HTTP {status}: {text}" if status else f"no answer: {text}"
        return False, why, status != 0 and any(m in text.lower() for m in FATAL_MARKERS)

    def unload(self) -> tuple[int, str]:
        return self.call("POST", f"/v2/repository/models/{self.model}/unload", {}, timeout=30)

    def load(self, timeout: float) -> tuple[int, str]:
        return self.call("POST", f"/v2/repository/models/{self.model}/load", {}, timeout=timeout)


class Server:
    """The tritonserver process this watchdog started (same process group: stopping serve.sh's
    group stops everything)."""

    def __init__(self, cmd: list[str]):
        self.cmd = cmd
        self.proc: subprocess.Popen | None = None
        self.regions: set[str] = set()  # its /dev/shm regions, remembered while it is alive

    def start(self) -> None:
        log.info("starting %s", " ".join(self.cmd[:1] + ["..."]))
        self.proc = subprocess.Popen(self.cmd)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def remember_regions(self) -> None:
        """Note its shared-memory regions now: once it is dead, /proc no longer tells."""
        if self.alive():
            self.regions |= _shm_regions([self.proc.pid, *descendants(self.proc.pid)])

    def stop(self, grace: float) -> int | None:
        """SIGTERM, SIGKILL after `grace` s (a tritonserver with a dead stub may ignore
        SIGTERM); its stub processes are killed too (they would otherwise linger), and the
        Python backend's shared-memory regions a killed server leaves in /dev/shm are removed."""
        proc = self.proc
        if proc is None:
            return None
        stubs = descendants(proc.pid)
        regions = self.regions | _shm_regions([proc.pid, *stubs])
        self.regions = set()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver ignored SIGTERM for %.0f s: SIGKILL", grace)
                proc.kill()
                proc.wait()
        for pid in stubs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for path in regions:  # only those these processes had mapped: never another server's
            with contextlib.suppress(OSError):
                os.unlink(path)
        return proc.returncode


def _shm_regions(pids: list[int]) -> set[str]:
    """The Python backend's /dev/shm regions mapped by these processes."""
    out = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    path = line.split(maxsplit=5)[-1].strip()
                    if path.startswith("/dev/shm/triton_python_backend_shm_region_"):
                        out.add(path)
    return out


def descendants(pid: int) -> list[int]:
    """Child processes of pid, recursively (the Python-backend stubs of a tritonserver)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry}/stat") as f:
                    # pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        out += kids
        todo += kids
    return out


class Watchdog:
    def __init__(self, http: Http, server: Server | None, args: argparse.Namespace):
        self.http = http
        self.server = server
        self.args = args
        self.stopping = False
        self.recoveries = 0

    # -- top level ---------------------------------------------------------------------------
    def run(self) -> int:
        if self.server is not None:
            self.server.start()
            ready = self.wait_ready(self.args.start_timeout, first=True)
            self.server.remember_regions()
            if not ready:
                code = self.server.stop(3.0)
                if self.stopping:
                    return 0
                log.error("tritonserver did not get %s ready; giving up", self.http.model)
                return code if code else 1
        else:
            self.wait_ready(self.args.start_timeout, first=True)
        log.info("watching %s at %s every %.1f s", self.http.model, self.http.base,
                 self.args.interval)
        failures = 0
        while not self.stopping:
            time.sleep(self.args.interval)
            if self.stopping:
                break
            if self.server is not None and not self.server.alive():
                log.error("tritonserver exited with %s", self.server.proc.returncode)
                self.restart("tritonserver exited")
                failures = 0
                continue
            ok, why, fatal = self.http.probe(self.args.probe_timeout)
            if ok:
                failures = 0
                continue
            failures += 1
            if not fatal and failures < self.args.failures:
                log.warning("probe failed (%d/%d): %s", failures, self.args.failures, why)
                continue
            self.recover(why)
            failures = 0
        if self.server is not None:
            return self.server.stop(30.0) or 0
        return 0

    def wait_ready(self, timeout: float, first: bool = False) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stopping:
            if self.server is not None and not self.server.alive():
                if first:
                    log.error("tritonserver exited with %s before %s was ready",
                              self.server.proc.returncode, self.http.model)
                return False
            if self.http.ready():
                return True
            time.sleep(0.25)
        return False

    # -- recovery ----------------------------------------------------------------------------
    def recover(self, why: str) -> None:
        t0 = time.monotonic()
        self.recoveries += 1
        log.error("%s cannot serve (%s): recovering (#%d)", self.http.model, why, self.recoveries)
        state = self.http.state()
        if state == "READY":
            status, text = self.http.unload()
            log.info("unload: HTTP %s %s", status, text.strip())
        deadline = time.monotonic() + self.args.unload_grace
        while state in ("READY", "UNLOADING") and time.monotonic() < deadline and not self.stopping:
            time.sleep(0.2)
            state = self.http.state()
        if state == "UNLOADING":
            log.warning("unload still waits after %.0f s: requests of the dead instance hold it",
                        self.args.unload_grace)
            if self.server is not None:
                self.restart("stuck unload", grace=1.0)  # it would ignore SIGTERM anyway
                log.info("recovered in %.1f s (tritonserver restarted)", time.monotonic() - t0)
                return
            log.warning("not our tritonserver: loading next to it; those requests stay open "
                        "until their clients give up")
        if self.load_with_backoff():
            log.info("recovered in %.1f s (model reloaded)", time.monotonic() - t0)
        elif self.server is not None and not self.stopping:
            self.restart("model does not load")
            log.info("recovered in %.1f s (tritonserver restarted)", time.monotonic() - t0)

    def load_with_backoff(self) -> bool:
        delay = 1.0
        for attempt in range(1, self.args.load_attempts + 1):
            if self.stopping:
                return False
            t0 = time.monotonic()
            status, text = self.http.load(self.args.start_timeout)
            if status == 200 and self.wait_ready(30.0):
                if self.server is not None:
                    self.server.remember_regions()
                log.info("loaded %s in %.1f s", self.http.model, time.monotonic() - t0)
                return True
            log.warning("load attempt %d failed: HTTP %s %s; next in %.0f s", attempt, status,
                        text.strip()[:300], delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
        return False

    def restart(self, why: str, grace: float = 3.0) -> None:
        """Restart tritonserver until the model is ready (backoff between failed starts)."""
        delay = 1.0
        while not self.stopping:
            log.warning("restarting tritonserver (%s)", why)
            self.server.stop(grace)
            t0 = time.monotonic()
            self.server.start()
            if self.wait_ready(self.args.start_timeout):
                self.server.remember_regions()
                log.info("tritonserver back, %s ready in %.1f s", self.http.model,
                         time.monotonic() - t0)
                return
            if self.stopping:
                return
            why = "the previous start did not get ready"
            exited = not self.server.alive()
            log.error("tritonserver %s before %s was ready; next try in %.0f s",
                      f"exited with {self.server.proc.returncode}" if exited else "timed out",
                      self.http.model, delay)
            time.sleep(delay)
            delay = min(delay * 2, 60.0)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    cmd: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, cmd = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--http", required=True, help="tritonserver HTTP address, e.g. 127.0.0.1:8000")
    p.add_argument("--model", default="slora")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between probes")
    p.add_argument("--probe-timeout", type=float, default=20.0)
    p.add_argument("--failures", type=int, default=3,
                   help="probes in a row that time out before recovery starts")
    p.add_argument("--unload-grace", type=float, default=5.0,
                   help="seconds an unload may take before tritonserver is restarted")
    p.add_argument("--start-timeout", type=float, default=900.0,
                   help="seconds tritonserver (or a load) may take to get the model ready")
    p.add_argument("--load-attempts", type=int, default=5)
    return p.parse_args(argv), cmd


def main(argv: list[str] | None = None) -> int:
    args, cmd = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s watchdog %(levelname)s: %(message)s")
    dog = Watchdog(Http(args.http, args.model), Server(cmd) if cmd else None, args)

    def stop(signum, _frame):
        log.info("signal %d: stopping", signum)
        dog.stopping = True
        if dog.server is not None and dog.server.alive():
            with contextlib.suppress(ProcessLookupError):
                dog.server.proc.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    return dog.run()


if __name__ == "__main__":
    sys.exit(main())
