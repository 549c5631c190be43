#!/usr/bin/env bash
# Drop-in for the old scripts/run_limited.sh, now through aero-sandbox. `--as SIZE` used to cap
# each process's virtual address space (RLIMIT_AS), which broke Node/V8 and WebAssembly (they
# reserve far more address space than they use) and did not bound a tree of processes. It now
# caps the resident memory of the whole tree (`aero-sandbox --mem SIZE`); where no cgroup is
# available the rlimit backend still sets RLIMIT_AS, raised for Node/WebAssembly.
#
#   bash ./scripts/run_limited.sh --as 12G -- cargo build --release --locked
#   bash ./scripts/run_limited.sh --no-as -- npm -w web run test:unit
#
# Without --as: AERO_MEM_LIMIT, else 12G. Exit status: the command's; 137 killed for memory;
# 125 for a usage error.
set -euo pipefail

usage="usage: run_limited.sh [--as SIZE | --no-as] [--] COMMAND [ARG...]   (SIZE: 12G, 512M, unlimited)"
options=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --as)
            [[ $# -ge 2 ]] || { echo "run_limited.sh: --as needs a SIZE; $usage" >&2; exit 125; }
            options+=(--mem "$2")
            shift 2
            ;;
        --as=*)
            options+=(--mem "${1#--as=}")
            shift
            ;;
        --no-as)
            options+=(--mem unlimited --as unlimited)
            shift
            ;;
        -h | --help)
            echo "$usage" >&2
            exit 0
            ;;
        --)
            shift
            break
            ;;
        -*)
            echo "run_limited.sh: unknown option $1; $usage" >&2
            exit 125
            ;;
        *)
            break
            ;;
    esac
done
if [[ $# -eq 0 ]]; then
    echo "run_limited.sh: no command given; $usage" >&2
    exit 125
fi

if command -v aero-sandbox >/dev/null 2>&1; then
    exec aero-sandbox "${options[@]}" -- "$@"
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); from sandbox.cli import main; sys.exit(main(sys.argv[2:]))' \
    "$root" "${options[@]}" -- "$@"
