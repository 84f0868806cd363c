"""Report what the environment holds (run at the end of scripts/setup.sh).

Prints the versions of the Python packages the project uses and whether the tritonserver
and perf_analyzer binaries start. Always exits 0; problems are reported as warnings.

    python -m slora_backend.env_check
"""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys
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


def check() -> list[str]:
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
    log.info("LD_LIBRARY_PATH %s", env["LD_LIBRARY_PATH"])
    log.info("PYTHONPATH      %s", env["PYTHONPATH"])
    for w in warnings:
        log.warning("%s", w)
    if not warnings:
        log.info("environment OK")
    return warnings


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="[env_check] %(levelname)s %(message)s")
    check()
    return 0


if __name__ == "__main__":
    sys.exit(main())
