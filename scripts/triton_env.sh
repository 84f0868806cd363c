#!/usr/bin/env bash
# Environment for the real tritonserver (nvidia-pytriton wheel) and perf_analyzer.
#
#   source scripts/triton_env.sh     # exports TRITONSERVER, TRITON_BACKEND_DIR, PERF_ANALYZER,
#                                    # SLORA_PYTHON, SLORA_MODEL_REPOSITORY, LD_LIBRARY_PATH,
#                                    # PYTHONPATH into the current shell
#   scripts/triton_env.sh            # prints the same as `export ...` lines
#
# The computation lives in slora_backend/triton_env.py (one place, also used from Python);
# this file only picks the interpreter: $SLORA_PYTHON, else <repo>/.venv/bin/python, else python3.
_slora_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${SLORA_PYTHON:-}" ]; then
  _slora_py="$SLORA_PYTHON"
elif [ -x "$_slora_root/.venv/bin/python" ]; then
  _slora_py="$_slora_root/.venv/bin/python"
else
  _slora_py="$(command -v python3)"
fi
_slora_exports="$("$_slora_py" "$_slora_root/slora_backend/triton_env.py" --shell)" || {
  echo "triton_env.sh: $_slora_py slora_backend/triton_env.py failed" >&2
  unset _slora_root _slora_py _slora_exports
  return 1 2>/dev/null || exit 1
}
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  printf '%s\n' "$_slora_exports"
else
  eval "$_slora_exports"
fi
unset _slora_root _slora_py _slora_exports
