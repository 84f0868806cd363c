#!/usr/bin/env bash
# The test command: lint, then the whole suite (kernels under TRITON_INTERPRET=1 on CPU,
# engine parity against HF Transformers + PEFT, the real tritonserver end to end).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@" tests
