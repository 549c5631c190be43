#!/bin/bash
# Runs inside the qemu stage's VM as root, started by aero-vm-stage.service with:
#   /mnt/host     (ro) this script, provision.sh, stage.env, wheelhouse/, container-base.tar
#                 and .name (the base image of tests/container, saved by scripts/container-stage)
#   /mnt/src      (ro) the project tree (copied to /home/aero/project, where the tests run)
#   /mnt/results  (rw) output.log (this script's output, streamed by the host), timings,
#                 test-root.log / test-aero.log, root.rc / aero.rc, journal.log
# Installs the project offline, then runs the tests as root and as the lingering user aero.
set -euo pipefail
HOST=/mnt/host SRC=/mnt/src RES=/mnt/results
WORK=/home/aero/project       # tests are copied here, owned by aero
PY=/opt/aero-sandbox/bin/python
source "$HOST/stage.env"      # AERO_VM_PYTEST_ARGS (may be empty), AERO_VM_RUN_TIMEOUT
export PYTHONUNBUFFERED=1     # so the host sees test output as it happens

# Power off as soon as this script ends, whatever happened: processes the tests leave behind in
# this unit's cgroup would otherwise hold the unit's stop (and ExecStopPost's poweroff) back.
finish() {
    local f p pids left=()
    shopt -s globstar nullglob   # builtins only: a forked reader would list itself
    for f in /sys/fs/cgroup/system.slice/aero-vm-stage.service/**/cgroup.procs; do
        mapfile -t pids <"$f"
        for p in "${pids[@]}"; do if [ "$p" != $$ ] && [ -e "/proc/$p" ]; then left+=("$p"); fi; done
    done
    if [ "${#left[@]}" -gt 0 ]; then
        echo "== processes left behind in aero-vm-stage.service:"
        ps -o pid,user,args -p "$(IFS=,; echo "${left[*]}")" || true
    fi
    # The whole boot's journal: units, OOM kills, anything that killed or stopped something.
    journalctl -b -q --no-pager -o short-monotonic >"$RES/journal.log" 2>&1 || true
    sync
    systemctl poweroff --force --force
}
trap finish EXIT
# systemd sends TERM to all of this unit's processes when something stops or kills the unit.
trap 'echo "== guest-stage.sh: SIGTERM: something stopped or killed aero-vm-stage.service"; exit 143' TERM

uptime_s() { cut -d' ' -f1 /proc/uptime; }
phase_start=0
begin() { phase_start=$(uptime_s); echo "== [vm $(uptime_s)s] $*"; }
# Records "name seconds" for the host to print.
end() { echo "$1 $(awk -v a="$phase_start" -v b="$(uptime_s)" 'BEGIN { printf "%.1f", b - a }')" >>"$RES/timings"; }

echo "boot_to_stage $(uptime_s)" >>"$RES/timings"
begin "waiting for systemd (is-system-running --wait)"
state=$(timeout 180 systemctl is-system-running --wait || true)
end system_running
echo "system state: $state"
[ "$state" = running ] || systemctl --no-pager --failed || true
echo "kernel $(uname -r); $(systemctl --version | head -1); $(/usr/bin/python3 -V); node $(node --version)"
echo "/sys/fs/cgroup: $(stat -fc %T /sys/fs/cgroup); controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"

begin "provision: venv + offline pip install"
bash "$HOST/provision.sh" --wheelhouse "$HOST/wheelhouse"
end pip_install
"$PY" -c 'from importlib.metadata import version as v
print(" ".join(f"{p}=={v(p)}" for p in ("aero-sandbox", "pystemd", "pytest")))'

# The tests run the checkout itself (tests/conftest.py: ROOT = tests/.., PYTHONPATH=ROOT, and
# scripts/), with the venv for pytest and the dependencies. Copied whole, less VCS data and
# caches, and owned by aero: both runs can write there and read each other's files. The C module
# scripts/install built on the host (sandbox/core/_syscalls*.so) comes along: the same Python ABI
# (cpython-311) loads it, so the checkout's tests start commands the native way, while the
# installed venv (no compiler in the image) has none and takes the _ctypes way.
rm -rf "$WORK" && mkdir -p "$WORK"
tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude='./.*_cache' --exclude=__pycache__ \
    --exclude='*.egg-info' --exclude=./build --exclude=./dist -cf - . | tar -C "$WORK" -xf -
chown -R aero:aero "$WORK"

if [ -n "${AERO_VM_PYTEST_ARGS:-}" ]; then
    eval "args=($AERO_VM_PYTEST_ARGS)"   # shell words, so -k 'a and b' works
else
    # The launcher core again (tests/host/test_core.py: auto picks systemd here), containers
    # (pid/cgroup namespaces, and real Podman containers, on pure v2, as root), list/gc and
    # doctor with systemd, and the systemd/pure-v2 tests. Unit tests are pure and run on the
    # host; the fallback and agent tests are about the development host's own situation (root,
    # hybrid cgroups, no systemd).
    args=(-q -rs)
    for t in tests/host/test_core.py tests/host/test_containers.py tests/host/test_list_gc.py \
             tests/host/test_doctor.py tests/host/test_hostile.py \
             tests/host/test_budgets.py tests/container tests/vm; do
        if [ -e "$WORK/$t" ]; then args+=("$t"); fi
    done
fi
# The venv first on PATH (as if activated): scripts the tests run call `python3`, `aero-sandbox`.
test_env=(AERO_VM=1 AERO_REQUIRE_CAPABILITIES=1 VIRTUAL_ENV=/opt/aero-sandbox PATH="/opt/aero-sandbox/bin:$PATH")
pytest_cmd=(timeout -k 10 "$AERO_VM_RUN_TIMEOUT" "$PY" -m pytest -p no:cacheprovider "${args[@]}")

# Only when the container tests run (about 3 minutes under TCG): a subset given in
# AERO_VM_PYTEST_ARGS without them does not wait for it.
if [ -f "$HOST/container-base.tar" ] && { [ -z "${AERO_VM_PYTEST_ARGS:-}" ] || [[ "$AERO_VM_PYTEST_ARGS" == *container* ]]; }; then
    begin "loading the container tests' base image"
    podman load -q -i "$HOST/container-base.tar" >/dev/null
    test_env+=(AERO_CONTAINER_BASE="$(cat "$HOST/container-base.name")")
    end container_base
fi

# run NAME CMD...: output to test-NAME.log and the stream, exit code to NAME.rc.
# A file + tail --pid, not a pipe to tee: a process the tests leave holding stdout cannot stall us.
run() {
    local name=$1 rc=0 pid; shift
    begin "tests as $name: $(printf '%q ' "${pytest_cmd[@]:4}")"
    : >"$RES/test-$name.log"   # exists before tail looks for it
    (cd "$WORK" && exec "$@") >"$RES/test-$name.log" 2>&1 </dev/null &
    pid=$!
    tail -n +1 -f --pid="$pid" "$RES/test-$name.log" &
    wait "$pid" || rc=$?
    wait
    echo "$rc" >"$RES/$name.rc"
    end "test_$name"
    echo "== tests as $name exited $rc"
}

echo "boot_to_tests $(uptime_s)" >>"$RES/timings"
run root env "${test_env[@]}" "${pytest_cmd[@]}"

begin "starting user@1000.service (lingering user aero)"
timeout 90 systemctl start user@1000.service
for _ in $(seq 60); do [ -S /run/user/1000/bus ] && break; sleep 0.5; done
[ -S /run/user/1000/bus ] || echo "warning: /run/user/1000/bus did not appear"
end user_manager
echo "user@1000 delegates: $(cat /sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service/cgroup.controllers)"

run aero runuser -u aero -- env XDG_RUNTIME_DIR=/run/user/1000 \
    DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/1000/bus "${test_env[@]}" "${pytest_cmd[@]}"
