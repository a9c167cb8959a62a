#!/bin/sh
# The image's install steps (run by the Dockerfile, as root, inside the build):
#
#   docker/build.sh requirements PYPROJECT OUT   write barkgpt's runtime requirements (its
#                                                `dependencies` and `serve` extra) to OUT
#   docker/build.sh deps VENV REQUIREMENTS       make VENV; install PyTorch and REQUIREMENTS into it
#   docker/build.sh wheel VENV SRC DIST          build the barkgpt wheel from SRC into DIST
#
# With wheels in /wheelhouse (a wheelhouse made by docker/wheelhouse.sh) pip installs only from
# them (--no-index: no network); else PyTorch ($TORCH) comes from $TORCH_INDEX (PyTorch's CPU
# wheels) and the rest from PyPI.
set -eu
offline=""
if ls /wheelhouse/*.whl >/dev/null 2>&1; then offline="--no-index --find-links /wheelhouse"; fi
case "${1:-}" in
requirements)
  # tomllib: Python 3.11+ (python:3.11-slim, Debian bookworm)
  python3 - "$2" >"$3" <<'PY'
import sys
import tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
print("\n".join(project["dependencies"] + project["optional-dependencies"]["serve"]))
PY
  ;;
deps)
  venv=$2
  python3 -m venv "$venv"
  if [ -n "$offline" ]; then
    # shellcheck disable=SC2086
    "$venv/bin/pip" install $offline "$TORCH" -r "$3"
  else
    "$venv/bin/pip" install --index-url "$TORCH_INDEX" "$TORCH"
    "$venv/bin/pip" install -r "$3"
  fi
  # PyTorch's own C++ test programs (~130 MB) serve no user; torch_shm_manager stays (DataLoader workers).
  for torch_dir in "$venv"/lib/python3*/site-packages/torch; do
    rm -rf "$torch_dir/test"
    find "$torch_dir/bin" -maxdepth 1 -type f ! -name torch_shm_manager -delete
  done
  ;;
wheel)
  # shellcheck disable=SC2086
  "$2/bin/pip" wheel --no-deps $offline --wheel-dir "$4" "$3"
  ;;
*)
  echo "usage: docker/build.sh requirements PYPROJECT OUT | deps VENV REQUIREMENTS | wheel VENV SRC DIST" >&2
  exit 2
  ;;
esac
