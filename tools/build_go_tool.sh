#!/usr/bin/env bash
# Build a Go command from the Go module proxy once and cache it outside the repo, with progress.
#
# The observability and deployment tests run real Jaeger v2 and helm binaries, which PyPI does not
# ship. Each is built in a throwaway module (`go get -tool PKG@VERSION`, so the command's own go.mod
# pins its dependencies) and kept under ~/.cache/fedplane/NAME-VERSION/NAME.
#
# Usage: tools/build_go_tool.sh NAME PACKAGE VERSION
#   prints the binary's path on stdout; progress (packages compiled so far) goes to stderr.
#   tools/build_go_tool.sh jaeger github.com/jaegertracing/jaeger/cmd/jaeger v1.76.0   (~8 min on 2 cores)
#   tools/build_go_tool.sh helm helm.sh/helm/v3/cmd/helm v3.22.0                         (~6 min on 2 cores)
# Environment: FEDPLANE_CACHE, the cache root (default: $HOME/.cache/fedplane).
set -euo pipefail
TOOLS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

[[ $# -eq 3 ]] || { echo "usage: tools/build_go_tool.sh NAME PACKAGE VERSION" >&2; exit 2; }
NAME=$1 PKG=$2 VERSION=$3
CACHE_ROOT="${FEDPLANE_CACHE:-${HOME}/.cache/fedplane}"
OUT_DIR="${CACHE_ROOT}/${NAME}-${VERSION}"
BIN="${OUT_DIR}/${NAME}"

if [[ -x "${BIN}" ]]; then
    echo "${BIN}"
    exit 0
fi
command -v go >/dev/null || { echo "build_go_tool: 'go' not found in PATH (needed to build ${NAME})" >&2; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/fedplane-${NAME}.XXXXXX")"
trap 'rm -rf "${WORK}"' EXIT
cd "${WORK}"
start=$(date +%s)
echo "build_go_tool: building ${NAME} ${VERSION} from ${PKG} into ${OUT_DIR} (once; several minutes on 2 cores)" >&2

go mod init "fedplane.local/${NAME}-build" >/dev/null 2>&1
echo "build_go_tool: ${NAME}: resolving modules" >&2
# Only errors: the list of modules it downloads is hundreds of lines long.
if ! go get -tool "${PKG}@${VERSION}" 2>&1 | { grep -v "^go: \\(downloading\\|added\\|upgraded\\|finding\\)" || true; } >&2; then
    echo "build_go_tool: cannot fetch ${PKG}@${VERSION}" >&2
    exit 1
fi
mkdir -p "${OUT_DIR}"
# shellcheck source=tools/go_progress.sh
source "${TOOLS_DIR}/go_progress.sh"
go_build_with_progress "build_go_tool: ${NAME}" "${BIN}.tmp.$$" "${PKG}" -trimpath -ldflags="-s -w" \
    || { echo "build_go_tool: building ${NAME} failed" >&2; exit 1; }
mv -f "${BIN}.tmp.$$" "${BIN}"  # atomic: concurrent builds never see half a binary
echo "build_go_tool: built ${BIN} in $(( $(date +%s) - start ))s" >&2
echo "${BIN}"
