#!/usr/bin/env bash
# Creates .venv and installs vlmexp into it.  Usage: ./setup.sh [dev | lock]
#   dev:  also the test tools (pytest, ruff, mergekit as a test oracle, the notebook, browser
#         and dashboard test tools).
#   lock: rewrite requirements.lock from a fresh resolution (a temporary venv, latest versions
#         that pyproject.toml allows), then commit it with the figures measured under it.
# Every other install takes the exact versions in requirements.lock (pip constraints), so a fresh
# clone runs what the README's figures were measured with.
# torch: a torch already importable in .venv is kept (install your CUDA build there first on a
# GPU machine); otherwise the CPU build torch==2.13.0 is installed before anything else, so
# that no dependency pulls a multi-GB CUDA build. The lock leaves torch out for that reason.
set -euo pipefail
cd "$(dirname "$0")"
torch_version="${VLMEXP_TORCH_VERSION:-2.13.0}"
say() { echo "setup.sh: $*"; }

install_torch() {  # $1: the venv's python
  if ! "$1" -c "import torch" 2>/dev/null; then
    say "torch $torch_version (CPU build)"
    "$1" -m pip install -q "torch==$torch_version"
  else
    say "torch: keeping $("$1" -c 'import torch; print(torch.__version__)')"
  fi
}

if [ "${1:-}" = "lock" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  say "resolving the latest allowed versions in a temporary venv"
  python3 -m venv "$tmp/venv"
  "$tmp/venv/bin/python" -m pip install -q --upgrade pip
  install_torch "$tmp/venv/bin/python"
  "$tmp/venv/bin/python" -m pip install -q -e ".[dev]"
  # torch (and anything of CUDA's) stays out: setup.sh installs the torch it should keep
  { echo "# Exact versions of a fresh ./setup.sh dev (pip constraints); refresh: ./setup.sh lock"
    "$tmp/venv/bin/python" -m pip freeze --exclude-editable \
      | grep -v -i -E '^(torch|torchvision|triton|nvidia-[a-z0-9_-]+|pip|setuptools)==' ; } \
    > requirements.lock
  say "requirements.lock: $(grep -c '==' requirements.lock) pinned packages"
  exit 0
fi

extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
say "creating .venv"
python3 -m venv .venv
py=.venv/bin/python
"$py" -m pip install -q --upgrade pip
install_torch "$py"
say "vlmexp${extra} and its dependencies (versions from requirements.lock)"
"$py" -m pip install -q -c requirements.lock -e ".${extra}"
# A torchvision built for another torch (PyPI's beside the CPU torch 2.13.0) fails to import and
# breaks transformers' image processors; one that imports (a CUDA torch with its own torchvision)
# is what the real processor classes use.
if "$py" -m pip show -q torchvision >/dev/null 2>&1 && ! "$py" -c "import torchvision" 2>/dev/null; then
  echo "setup.sh: torchvision is installed in .venv but does not import with this torch (it breaks transformers' image processors); pip uninstall torchvision, or install the torchvision built for your torch" >&2
  exit 1
fi
say "ready ($("$py" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch", torch.__version__)'))"
