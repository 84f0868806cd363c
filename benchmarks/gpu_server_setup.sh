#!/usr/bin/env bash
# On the GPU machine (no registry): tritonserver 2.51 and a numpy < 2 Python for its stub, from
# files carried in a git-ignored folder (the device tool's `carry`):
#   CARRY/tritonserver.tar.xz   the nvidia-pytriton 0.7.0 wheel's tritonserver/ and nvidia_pytriton.libs/
#   CARRY/numpy-1.26.4-cp312-*.whl
# Then: SLORA_PYTRITON_SITE=/tmp/ts /tmp/venv/bin/python benchmarks/server_bench.py ...
# The venv chains to the image's packages (torch, triton, transformers) through a .pth file.
set -euo pipefail
carry="${1:-.gpu_carry}"
if [ ! -x /tmp/ts/pytriton/tritonserver/bin/tritonserver ]; then
  mkdir -p /tmp/ts/pytriton
  tar -xJf "$carry/tritonserver.tar.xz" -C /tmp/ts/pytriton
  mv /tmp/ts/pytriton/nvidia_pytriton.libs /tmp/ts/
fi
if [ ! -x /tmp/venv/bin/python ]; then
  site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  python3 -m venv /tmp/venv
  echo "$site" > "$(/tmp/venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/image.pth"
  /tmp/venv/bin/pip install -q --no-index --no-deps "$carry"/numpy-1.26.4-*.whl
fi
