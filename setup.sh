#!/usr/bin/env bash
# Creates .venv and installs vlmexp into it.  Usage: ./setup.sh [dev]
#   dev: also the test tools (pytest, ruff, mergekit as a test oracle).
# torch: a torch already importable in .venv is kept (install your CUDA build there first on a
# GPU machine); otherwise the CPU build torch==2.13.0 is installed before anything else, so
# that no dependency pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
py=.venv/bin/python
"$py" -m pip install -q --upgrade pip
if ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q "torch==${VLMEXP_TORCH_VERSION:-2.13.0}"
fi
extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
"$py" -m pip install -q -e ".${extra}"
# A torchvision built for another torch (PyPI's beside the CPU torch 2.13.0) fails to import and
# breaks transformers' image processors; one that imports (a CUDA torch with its own torchvision)
# is what the real processor classes use.
if "$py" -m pip show -q torchvision >/dev/null 2>&1 && ! "$py" -c "import torchvision" 2>/dev/null; then
  echo "setup.sh: torchvision is installed in .venv but does not import with this torch (it breaks transformers' image processors); pip uninstall torchvision, or install the torchvision built for your torch" >&2
  exit 1
fi
echo "setup.sh: ready ($("$py" -c 'import torch; print("torch", torch.__version__)'))"
