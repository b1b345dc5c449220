#!/usr/bin/env bash
# Build kube-apiserver from the Go modules of a pinned Kubernetes release and cache it outside the repo.
#
# The Kubernetes tests (tests/kube) run a real kube-apiserver against a real etcd, the way envtest does,
# without shipping a binary in the repository. `go install k8s.io/kubernetes/cmd/kube-apiserver@vX`
# refuses because k8s.io/kubernetes has replace directives (its staging modules), so we build from a
# throwaway module that requires k8s.io/kubernetes and pins every staging module to the matching v0.Y.Z.
#
# Usage: tools/build_kube_apiserver.sh      prints the binary path on stdout (progress goes to stderr).
# Environment:
#   FEDPLANE_CACHE             cache root (default: $HOME/.cache/fedplane)
#   FEDPLANE_KUBE_VERSION      Kubernetes release (default: the pinned one below)
# The Go module and build caches stay where Go puts them by default, so rebuilds reuse them.
set -euo pipefail
TOOLS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

KUBE_VERSION="${FEDPLANE_KUBE_VERSION:-v1.35.4}"
CACHE_ROOT="${FEDPLANE_CACHE:-${HOME}/.cache/fedplane}"
OUT_DIR="${CACHE_ROOT}/kube-apiserver-${KUBE_VERSION}"
BIN="${OUT_DIR}/kube-apiserver"

if [[ -x "${BIN}" ]]; then
    echo "${BIN}"
    exit 0
fi

command -v go >/dev/null || { echo "build_kube_apiserver: 'go' not found in PATH" >&2; exit 1; }

# v1.Y.Z of k8s.io/kubernetes corresponds to v0.Y.Z of its staging modules (k8s.io/api, ...).
STAGING_VERSION="v0.${KUBE_VERSION#v1.}"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/fedplane-kube-apiserver.XXXXXX")"
trap 'rm -rf "${WORK}"' EXIT
cd "${WORK}"

start=$(date +%s)
echo "build_kube_apiserver: building kube-apiserver ${KUBE_VERSION} (this takes a while the first time)" >&2

# The upstream go.mod lists the staging modules as `k8s.io/x => ./staging/src/k8s.io/x`.
upstream_mod="$(go mod download -json "k8s.io/kubernetes@${KUBE_VERSION}" \
    | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
[[ -f "${upstream_mod}" ]] || { echo "build_kube_apiserver: cannot download k8s.io/kubernetes@${KUBE_VERSION}" >&2; exit 1; }
go_line="$(grep -m1 -E '^go [0-9]' "${upstream_mod}")"
godebug_line="$(grep -m1 -E '^godebug ' "${upstream_mod}" || true)"
staging_modules="$(sed -n 's#^[[:space:]]*\(k8s\.io/[A-Za-z0-9._-]*\) => \./staging/.*#\1#p' "${upstream_mod}")"
[[ -n "${staging_modules}" ]] || { echo "build_kube_apiserver: no staging replaces found in ${upstream_mod}" >&2; exit 1; }

{
    echo "module fedplane.local/kube-apiserver-build"
    echo
    echo "${go_line}"
    [[ -n "${godebug_line}" ]] && echo "${godebug_line}"
    echo
    echo "require k8s.io/kubernetes ${KUBE_VERSION}"
    echo
    echo "replace ("
    for m in ${staging_modules}; do
        echo "	${m} => ${m} ${STAGING_VERSION}"
    done
    echo ")"
} > go.mod

# Resolve the command's package graph (fills go.sum), then build a stripped, reproducible binary.
echo "build_kube_apiserver: resolving modules" >&2
if ! go get "k8s.io/kubernetes/cmd/kube-apiserver@${KUBE_VERSION}" 2>&1 | { grep -v "^go: \\(downloading\\|added\\|upgraded\\|finding\\)" || true; } >&2; then
    echo "build_kube_apiserver: cannot fetch k8s.io/kubernetes@${KUBE_VERSION}" >&2
    exit 1
fi
mkdir -p "${OUT_DIR}"
# Stamp the release into /version (a module build otherwise reports v0.0.0-master).
minor="${KUBE_VERSION#v1.}"; minor="${minor%%.*}"
vpkg=k8s.io/component-base/version
ldflags="-s -w -X ${vpkg}.gitVersion=${KUBE_VERSION} -X ${vpkg}.gitMajor=1 -X ${vpkg}.gitMinor=${minor}"
ldflags+=" -X ${vpkg}.gitTreeState=clean -X ${vpkg}.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
# shellcheck source=tools/go_progress.sh
source "${TOOLS_DIR}/go_progress.sh"
go_build_with_progress build_kube_apiserver "${BIN}.tmp.$$" k8s.io/kubernetes/cmd/kube-apiserver \
    -trimpath -ldflags="${ldflags}"
mv -f "${BIN}.tmp.$$" "${BIN}"  # atomic: concurrent builds never see half a binary

echo "build_kube_apiserver: built ${BIN} in $(( $(date +%s) - start ))s" >&2
"${BIN}" --version >&2 || true
echo "${BIN}"
