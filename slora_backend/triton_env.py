"""Where tritonserver, its Python backend and perf_analyzer live, and the environment they need.

The one place that computes it; `scripts/triton_env.sh` (bash) runs this file as a script.
Standard library only, so it also runs as `python slora_backend/triton_env.py` without
importing the rest of the package.

Layout (see docs/platform.md): the `nvidia-pytriton` wheel installs
`<site>/pytriton/tritonserver/{bin/tritonserver,backends/python/,python_backend_stubs/3.X/}`
and `<site>/nvidia_pytriton.libs/`; the `tritonclient[all]` wheel installs
`<venv>/bin/perf_analyzer`, which links `libcudart.so.12` (`<site>/nvidia/cuda_runtime/lib`).

Overrides (environment variables):
  SLORA_PYTRITON_SITE  directory holding `pytriton/` and `nvidia_pytriton.libs/`
                       (for a wheel installed with `pip install --target DIR`)
  SLORA_PERF_ANALYZER  path of the perf_analyzer binary

Usage as a script:
  python slora_backend/triton_env.py            # KEY=value lines
  python slora_backend/triton_env.py --shell    # `export KEY=...` lines for eval
  python slora_backend/triton_env.py --json
  python slora_backend/triton_env.py --install-stub   # copy the stub for this Python
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import sys
import sysconfig
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

__all__ = ["REPO_ROOT", "install_stub", "stub_ok", "triton_env"]


def _pytriton_site() -> Path:
    override = os.environ.get("SLORA_PYTRITON_SITE")
    if override:
        return Path(override).resolve()
    spec = importlib.util.find_spec("pytriton")  # locates without importing the package
    if spec is not None and spec.submodule_search_locations:
        return Path(list(spec.submodule_search_locations)[0]).resolve().parent
    return Path(sysconfig.get_paths()["purelib"]).resolve()


def _join(parts: list[str], existing: str | None) -> str:
    out: list[str] = []
    for p in [*parts, *(existing.split(os.pathsep) if existing else [])]:
        if p and p not in out:
            out.append(p)
    return os.pathsep.join(out)


def triton_env(base_env: dict[str, str] | None = None) -> dict:
    """Paths and environment for running tritonserver / perf_analyzer from this interpreter.

    Returns a dict with:
      tritonserver   path of the tritonserver binary
      backend_dir    value for `--backend-directory`
      perf_analyzer  path of the perf_analyzer binary
      stub           the Python-backend stub the server uses, `stub_src` the one matching
                     this Python (`stub_ok` says whether they are the same file content)
      python, python_version, site_packages, pytriton_site, libpython_dir, repo_root,
      model_repository
      ld_library_path, pythonpath   lists of directories added in front
      path_dir       this interpreter's bin directory, put first on PATH
      env            copy of `base_env` (default os.environ) with PATH, LD_LIBRARY_PATH and
                     PYTHONPATH extended (and VIRTUAL_ENV set in a venv): pass it to
                     subprocess for tritonserver or perf_analyzer. PATH matters most: the
                     stub's embedded Python ignores PYTHONPATH and takes its packages from the
                     `python3` found first on PATH.
    All paths are strings; nothing is checked for existence except `stub_ok`.
    """
    base = dict(os.environ if base_env is None else base_env)
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    pt_site = _pytriton_site()
    ts_dir = pt_site / "pytriton" / "tritonserver"
    pyver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    perf = os.environ.get("SLORA_PERF_ANALYZER") or str(Path(sys.prefix) / "bin" / "perf_analyzer")
    if not Path(perf).exists():
        perf = shutil.which("perf_analyzer") or perf

    ld = [str(pt_site / "nvidia_pytriton.libs"), libdir]
    cudart = site / "nvidia" / "cuda_runtime" / "lib"
    if cudart.is_dir():
        ld.append(str(cudart))
    pypath = [str(REPO_ROOT), str(site)]
    if pt_site != site:
        pypath.append(str(pt_site))

    # The Python-backend stub embeds Python in *isolated* mode: it ignores PYTHONPATH and
    # PYTHONHOME and finds its prefix through `python3` on PATH. With this interpreter's bin
    # directory first on PATH, a venv's pyvenv.cfg is found and the stub imports the venv's
    # packages (numpy<2 included: with the global numpy 2.x, BYTES tensors arrive corrupted).
    bindir = str(Path(sys.executable).parent)
    env = dict(base)
    env["PATH"] = _join([bindir], base.get("PATH", os.defpath))
    if sys.prefix != sys.base_prefix:  # in a venv
        env["VIRTUAL_ENV"] = sys.prefix
    env["LD_LIBRARY_PATH"] = _join(ld, base.get("LD_LIBRARY_PATH"))
    env["PYTHONPATH"] = _join(pypath, base.get("PYTHONPATH"))

    info = {
        "repo_root": str(REPO_ROOT),
        "model_repository": str(REPO_ROOT / "model_repository"),
        "python": sys.executable,
        "python_version": pyver,
        "site_packages": str(site),
        "pytriton_site": str(pt_site),
        "libpython_dir": libdir,
        "tritonserver": str(ts_dir / "bin" / "tritonserver"),
        "backend_dir": str(ts_dir / "backends"),
        "stub": str(ts_dir / "backends" / "python" / "triton_python_backend_stub"),
        "stub_src": str(ts_dir / "python_backend_stubs" / pyver / "triton_python_backend_stub"),
        "perf_analyzer": perf,
        "ld_library_path": ld,
        "path_dir": bindir,
        "pythonpath": pypath,
        "env": env,
    }
    info["stub_ok"] = stub_ok(info)
    return info


def stub_ok(info: dict) -> bool:
    """True when the backend's stub exists and is the one built for this Python."""
    stub, src = Path(info["stub"]), Path(info["stub_src"])
    if not (stub.is_file() and src.is_file()):
        return False
    return stub.stat().st_size == src.stat().st_size and stub.read_bytes() == src.read_bytes()


def install_stub(info: dict | None = None) -> bool:
    """Copy the stub matching this Python into the backend directory; True if it changed."""
    info = info or triton_env()
    if stub_ok(info):
        return False
    src = Path(info["stub_src"])
    if not src.is_file():
        pyver = info["python_version"]
        raise FileNotFoundError(f"no Python-backend stub for Python {pyver}: {src}")
    dst = Path(info["stub"])
    shutil.copyfile(src, dst)
    dst.chmod(0o755)
    return True


_SHELL_VARS = {
    "TRITONSERVER": "tritonserver",
    "TRITON_BACKEND_DIR": "backend_dir",
    "PERF_ANALYZER": "perf_analyzer",
    "SLORA_PYTHON": "python",
    "SLORA_MODEL_REPOSITORY": "model_repository",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shell", action="store_true", help="print `export` lines for bash eval")
    ap.add_argument("--json", action="store_true", help="print everything as JSON (minus env)")
    ap.add_argument("--install-stub", action="store_true", help="copy the stub for this Python")
    args = ap.parse_args(argv)
    info = triton_env()
    if args.install_stub:
        changed = install_stub(info)
        info = triton_env()
        print(f"stub {'installed' if changed else 'already current'}: {info['stub']}",
              file=sys.stderr)
    if args.json:
        print(json.dumps({k: v for k, v in info.items() if k != "env"}, indent=2))
        return 0
    values = {name: info[key] for name, key in _SHELL_VARS.items()}
    values["PATH"] = info["env"]["PATH"]
    values["LD_LIBRARY_PATH"] = info["env"]["LD_LIBRARY_PATH"]
    values["PYTHONPATH"] = info["env"]["PYTHONPATH"]
    for name, value in values.items():
        if args.shell:
            print(f"export {name}={shlex.quote(value)}")
        else:
            print(f"{name}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
