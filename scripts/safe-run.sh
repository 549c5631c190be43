#!/usr/bin/env bash
# Drop-in for the old scripts/safe-run.sh, now through aero-sandbox: the command runs with a
# timeout, a memory cap on the whole process tree (a cgroup, not RLIMIT_AS), the agent
# environment preset (`aero-sandbox env`) and retries of transient resource failures.
#
#   bash ./scripts/safe-run.sh cargo build --locked
#   AERO_TIMEOUT=1200 AERO_MEM_LIMIT=16G bash ./scripts/safe-run.sh cargo build --release --locked
#
# The old variables keep their meaning and are read by aero-sandbox itself: AERO_TIMEOUT (here
# 600 s when unset), AERO_MEM_LIMIT (12G when unset; `unlimited` lifts it),
# AERO_SAFE_RUN_RUSTC_RETRIES (attempts for cargo/rustc/npm/...; 1 disables), AERO_CARGO_BUILD_JOBS,
# AERO_RUST_CODEGEN_UNITS, AERO_DISABLE_RUSTC_WRAPPER, AERO_ISOLATE_CARGO_HOME.
set -euo pipefail

DEFAULT_TIMEOUT=600

if [[ $# -eq 0 || $1 == -h || $1 == --help ]]; then
    echo "usage: safe-run.sh COMMAND [ARG...]   (AERO_TIMEOUT, AERO_MEM_LIMIT, ... see the script)" >&2
    [[ $# -eq 0 ]] && exit 125 || exit 0
fi

options=(--preset agent)
if [[ -z ${AERO_TIMEOUT:-} ]]; then
    options+=(--timeout "$DEFAULT_TIMEOUT")
fi

if command -v aero-sandbox >/dev/null 2>&1; then
    exec aero-sandbox "${options[@]}" -- "$@"
fi
# Not installed: run it from the checkout this script belongs to, without putting the checkout
# on the command's PYTHONPATH.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); from sandbox.cli import main; sys.exit(main(sys.argv[2:]))' \
    "$root" "${options[@]}" -- "$@"
