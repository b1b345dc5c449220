#!/bin/sh
# Install one Fedplane component into a fresh virtual environment: what its image's build stage
# runs, and what tests/test_install.py runs, so the test checks the images' install itself.
#
# Usage: install.sh COMPONENT SOURCE VENV
#   COMPONENT  hub or agent: fedplane-common and fedplane-<COMPONENT>, nothing of the other
#   SOURCE     a checkout (or the image's copy of one: pyproject.toml, uv.lock, every member's
#              pyproject.toml, common/ and the component's folder)
#   VENV       the environment to create
# Environment: UV (default: uv on PATH), PYTHON (default: python3).
#
# Third-party packages come from uv.lock (the versions the tests ran, hashes checked), then the
# two wheels, built from SOURCE by uv, go in without dependencies, and `uv pip check` proves the
# set complete and consistent.
set -eu
[ $# -eq 3 ] || { echo "usage: install.sh hub|agent SOURCE VENV" >&2; exit 2; }
component=$1 src=$2 venv=$3
case "$component" in hub|agent) ;; *) echo "install.sh: unknown component '$component' (hub or agent)" >&2; exit 2;; esac
uv=${UV:-uv}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"$uv" export --quiet --directory "$src" --frozen --no-dev --no-emit-workspace \
    --package "fedplane-$component" --output-file "$work/requirements.txt"
for part in common "$component"; do
    "$uv" build --quiet --wheel --out-dir "$work/wheels" "$src/$part"
done
"$uv" venv --quiet --python "${PYTHON:-python3}" "$venv"
"$uv" pip install --quiet --python "$venv/bin/python" --require-hashes -r "$work/requirements.txt"
"$uv" pip install --quiet --python "$venv/bin/python" --no-deps "$work"/wheels/*.whl
"$uv" pip check --quiet --python "$venv/bin/python"
