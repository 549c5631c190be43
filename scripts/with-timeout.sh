#!/usr/bin/env bash
# Drop-in for the old scripts/with-timeout.sh, now through aero-sandbox: a wall-clock limit,
# SIGTERM to the whole process tree when it fires, SIGKILL 10 s later (AERO_KILL_AFTER changes
# the grace), like `timeout -k 10 SECONDS`. No memory cap, as before (use safe-run.sh for one).
#
#   bash ./scripts/with-timeout.sh 600 cargo test --locked
#
# Exit status: the command's; 124 when it timed out; 125 for a usage error.
set -euo pipefail

if [[ $# -lt 2 || $1 == -h || $1 == --help ]]; then
    echo "usage: with-timeout.sh SECONDS COMMAND [ARG...]   (SECONDS: 600, or 10m, 1h30m)" >&2
    [[ $# -ge 1 && ($1 == -h || $1 == --help) ]] && exit 0 || exit 125
fi
timeout=$1
shift
options=(--timeout "$timeout" --mem unlimited)

if command -v aero-sandbox >/dev/null 2>&1; then
    exec aero-sandbox "${options[@]}" -- "$@"
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); from sandbox.cli import main; sys.exit(main(sys.argv[2:]))' \
    "$root" "${options[@]}" -- "$@"
