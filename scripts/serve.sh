#!/usr/bin/env bash
# Serve the slora model repository with the real tritonserver, in the foreground.
#
#   scripts/serve.sh [--model DIR] [--adapters DIR] [--http-port N] [--grpc-port N]
#                    [--metrics-port N] [--tp N] [--no-watchdog] [-- extra tritonserver arguments]
#
# Defaults: the embedded SmolLM2-135M-Instruct (models/, prepared by scripts/setup.sh), the
# adapters in demo_adapters/, ports 8000 (HTTP), 8001 (gRPC), 8002 (metrics).
# Other engine settings live in model_repository/slora/config.pbtxt (parameters); --tp N
# overrides its tensor_parallel_size (the model split over GPUs 0..N-1 of this host).
# tritonserver runs with explicit model control under scripts/watchdog.py, which probes the
# model every second and reloads it (or restarts tritonserver) when it cannot serve;
# --no-watchdog runs tritonserver alone.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

MODEL="$ROOT/models/SmolLM2-135M-Instruct"
ADAPTERS="$ROOT/demo_adapters"
HTTP_PORT=8000
GRPC_PORT=8001
METRICS_PORT=8002
WATCHDOG=1
TP=""
EXTRA=()

usage() { sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
need() { [ $# -ge 2 ] || { echo "serve.sh: $1 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  case "$1" in
    --model) need "$@"; MODEL="$2"; shift 2 ;;
    --adapters) need "$@"; ADAPTERS="$2"; shift 2 ;;
    --http-port) need "$@"; HTTP_PORT="$2"; shift 2 ;;
    --grpc-port) need "$@"; GRPC_PORT="$2"; shift 2 ;;
    --metrics-port) need "$@"; METRICS_PORT="$2"; shift 2 ;;
    --tp) need "$@"; TP="$2"; shift 2 ;;
    --no-watchdog) WATCHDOG=0; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "serve.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

abspath() { (cd "$1" && pwd); }
if [ ! -f "$MODEL/config.json" ]; then
  echo "serve.sh: no model at $MODEL (run scripts/setup.sh to prepare the embedded default)" >&2
  exit 1
fi
MODEL="$(abspath "$MODEL")"
if [ -d "$ADAPTERS" ]; then
  ADAPTERS="$(abspath "$ADAPTERS")"
else
  echo "serve.sh: adapter directory $ADAPTERS not found; serving the base model only" >&2
  ADAPTERS=none
fi

# shellcheck source=scripts/triton_env.sh
source "$ROOT/scripts/triton_env.sh"
if [ ! -x "$TRITONSERVER" ]; then
  echo "serve.sh: tritonserver not found at $TRITONSERVER (run scripts/setup.sh)" >&2
  exit 1
fi
# The Python-backend stub ignores PYTHONPATH and takes its site-packages from the python3
# on PATH: the environment's interpreter must come first (numpy < 2, torch, transformers).
PATH="$(dirname "$SLORA_PYTHON"):$PATH"
export PATH
export SLORA_REPO_ROOT="$ROOT" SLORA_MODEL_DIR="$MODEL" SLORA_ADAPTER_DIR="$ADAPTERS"
export TOKENIZERS_PARALLELISM=false
if [ -n "$TP" ]; then
  [[ "$TP" =~ ^[1-9][0-9]*$ ]] || { echo "serve.sh: --tp needs a positive integer, got $TP" >&2; exit 2; }
  export SLORA_TENSOR_PARALLEL_SIZE="$TP"  # read by model_repository/slora/1/model.py
fi

echo "serve.sh: model $MODEL, adapters $ADAPTERS;" \
  "HTTP :$HTTP_PORT, gRPC :$GRPC_PORT, metrics :$METRICS_PORT" >&2
# Explicit model control: the repository API (unload/load) is how a broken model comes back.
SERVER=("$TRITONSERVER"
  --model-repository="$ROOT/model_repository"
  --backend-directory="$TRITON_BACKEND_DIR"
  --model-control-mode=explicit --load-model=slora
  --http-port="$HTTP_PORT" --grpc-port="$GRPC_PORT" --metrics-port="$METRICS_PORT"
  ${EXTRA[@]+"${EXTRA[@]}"})
if [ "$WATCHDOG" = 1 ]; then
  exec "$SLORA_PYTHON" "$ROOT/scripts/watchdog.py" --http "127.0.0.1:$HTTP_PORT" --model slora \
    -- "${SERVER[@]}"
fi
exec "${SERVER[@]}"
