#!/usr/bin/env bash
# Make a wheelhouse for an offline image build: every wheel the image installs (the CPU build of
# PyTorch, barkgpt's dependencies and its `serve` extra, setuptools to build barkgpt itself), made
# on this machine with `pip wheel`, so `docker build` needs no network (the Dockerfile then
# installs with `pip install --no-index --find-links`).
#
#   docker/wheelhouse.sh DIR     # DIR inside the build context (the repo), e.g. docker/wheelhouse
#
# Env: PYTHON (default python3; its version and platform must match the image's Python, 3.11 on
# x86_64 for python:3.11-slim and Debian bookworm), TORCH (default torch==2.13.0+cpu), TORCH_INDEX
# (an extra index for TORCH, e.g. https://download.pytorch.org/whl/cpu; default none: pip's own
# configuration, its find-links and cache). Wheels already in DIR are reused, so a rerun is quick.
set -euo pipefail
dir=${1:?usage: docker/wheelhouse.sh DIR}
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=${TORCH:-torch==2.13.0+cpu}
mkdir -p "$dir"
extra=()
if [ -n "${TORCH_INDEX:-}" ]; then extra=(--extra-index-url "$TORCH_INDEX"); fi
"$PYTHON" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$dir" --find-links "$dir" "${extra[@]}" \
  "$TORCH" ".[serve]" "setuptools>=68"
rm -f "$dir"/barkgpt-*.whl  # the image builds barkgpt from the source it copies
echo "wheelhouse $dir: $(ls "$dir"/*.whl | wc -l) wheels, $(du -sh "$dir" | cut -f1)"
