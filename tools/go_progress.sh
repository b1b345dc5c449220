# Sourced by the build scripts: `go build` that says how far it has got, for builds that take minutes.
# go_build_with_progress NAME OUTPUT PACKAGE [go build flags...]
#   Counts the packages `go build -v` names as it compiles them against `go list -deps`, and
#   prints "NAME: n/total packages compiled" to stderr every 20 seconds; compiler errors pass through.
go_build_with_progress() {
    local name=$1 out=$2 pkg=$3
    shift 3
    local total
    total=$(go list -deps "${pkg}" | wc -l)
    echo "${name}: compiling ${total} packages" >&2
    set +e
    go build -v "$@" -o "${out}" "${pkg}" 2>&1 | awk -v name="${name}" -v total="${total}" '
        /^#|: / { print > "/dev/stderr"; next }
        { n++; now = systime(); if (now - last >= 20) { printf "%s: %d/%d packages compiled\n", name, n, total > "/dev/stderr"; fflush("/dev/stderr"); last = now } }'
    local status=${PIPESTATUS[0]}
    set -e
    return "${status}"
}
