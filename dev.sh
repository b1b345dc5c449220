#!/usr/bin/env bash
# Fedplane's two entry points for a fresh machine; each sets up everything it needs.
#   ./dev.sh up     a local federation (real etcd and NATS, hub, simulated clusters) running the examples
#   ./dev.sh test   lint, type checks and the whole test suite (builds the cached kube-apiserver if missing)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${FEDPLANE_VENV:-.venv}

ensure_env() {
  # uv installs every part of the workspace (pyproject.toml, uv.lock) editable into $VENV; it
  # comes from PyPI into that same environment, and uses this machine's python3 (never a download).
  if [ ! -x "$VENV/bin/uv" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q uv
  fi
  local stamp="$VENV/.fedplane-installed"
  if [ ! -f "$stamp" ] || [ -n "$(find . -maxdepth 2 \( -name pyproject.toml -o -name uv.lock \) -newer "$stamp" -print -quit)" ]; then
    UV_PROJECT_ENVIRONMENT="$VENV" UV_PYTHON_DOWNLOADS=never "$VENV/bin/uv" sync -q --python "$VENV/bin/python"
    touch "$stamp"
  fi
}

cmd=${1:-help}
shift || true
case "$cmd" in
  up)
    ensure_env
    exec "$VENV/bin/fedplane" up "$@"
    ;;
  test)
    ensure_env
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    "$VENV/bin/mypy" common/src hub/src agent/src client/src local/src tools tests
    exec "$VENV/bin/pytest" -q "$@"
    ;;
  *)
    echo "usage: ./dev.sh up [fedplane up options] | ./dev.sh test [pytest options]" >&2
    exit 2
    ;;
esac
