#!/usr/bin/env bash
# Fedplane's two entry points for a fresh machine; each sets up everything it needs.
#   ./dev.sh up     a local federation (real etcd and NATS, hub, simulated clusters) running the examples
#   ./dev.sh test   lint, type checks and the whole test suite (builds the cached kube-apiserver if missing)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${FEDPLANE_VENV:-.venv}

ensure_env() {
  if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
  fi
  local stamp="$VENV/.fedplane-installed"
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e '.[dev]'
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
    "$VENV/bin/mypy" fedplane tools
    exec "$VENV/bin/pytest" -q "$@"
    ;;
  *)
    echo "usage: ./dev.sh up [fedplane up options] | ./dev.sh test [pytest options]" >&2
    exit 2
    ;;
esac
