#!/bin/bash
# Runs inside the qemu stage's VM as root, started by aero-vm-stage.service with:
#   /mnt/host     (ro) this script, provision.sh, stage.env, wheelhouse/
#   /mnt/src      (ro) the project tree
#   /mnt/results  (rw) output.log (this script's output, streamed by the host), timings,
#                 test-root.log / test-aero.log, root.rc / aero.rc
# Installs the project offline, then runs the tests as root and as the lingering user aero.
set -euo pipefail
HOST=/mnt/host SRC=/mnt/src RES=/mnt/results
WORK=/home/aero/project       # tests are copied here, owned by aero
PY=/opt/aero-sandbox/bin/python
source "$HOST/stage.env"      # AERO_VM_PYTEST_ARGS (may be empty), AERO_VM_RUN_TIMEOUT
export PYTHONUNBUFFERED=1     # so the host sees test output as it happens

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
"$PY" -m pip list --format=freeze | grep -iE '^(aero|pystemd|pytest)' || true

# Only the tests and pytest configuration are copied: `import` must find the installed wheel,
# not the source tree. The full tree stays readable at /mnt/src (AERO_SRC_DIR).
rm -rf "$WORK" && mkdir -p "$WORK"
cp -r "$SRC/tests" "$WORK/"
for f in pyproject.toml pytest.ini setup.cfg tox.ini conftest.py; do
    if [ -e "$SRC/$f" ]; then cp "$SRC/$f" "$WORK/"; fi
done
chown -R aero:aero "$WORK"

if [ -n "${AERO_VM_PYTEST_ARGS:-}" ]; then
    eval "args=($AERO_VM_PYTEST_ARGS)"   # shell words, so -k 'a and b' works
else
    args=(-q -rs)
    for d in tests/unit tests/host tests/vm; do if [ -d "$WORK/$d" ]; then args+=("$d"); fi; done
fi
test_env=(AERO_VM=1 AERO_REQUIRE_CAPABILITIES=1 AERO_SRC_DIR="$SRC" PYTHONDONTWRITEBYTECODE=1)
pytest_cmd=(timeout -k 10 "$AERO_VM_RUN_TIMEOUT" "$PY" -m pytest -p no:cacheprovider "${args[@]}")

# run NAME CMD...: output to the stream and to test-NAME.log, exit code to NAME.rc
run() {
    local name=$1 rc=0; shift
    begin "tests as $name: ${pytest_cmd[*]:4}"
    (cd "$WORK" && "$@") 2>&1 | tee "$RES/test-$name.log" || rc=${PIPESTATUS[0]}
    echo "$rc" >"$RES/$name.rc"
    end "test_$name"
    echo "== tests as $name exited $rc"
}

run root env "${test_env[@]}" "${pytest_cmd[@]}"

begin "starting user@1000.service (lingering user aero)"
timeout 90 systemctl start user@1000.service
for _ in $(seq 60); do [ -S /run/user/1000/bus ] && break; sleep 0.5; done
[ -S /run/user/1000/bus ] || echo "warning: /run/user/1000/bus did not appear"
end user_manager
echo "user@1000 delegates: $(cat /sys/fs/cgroup/user.slice/user-1000.slice/user@1000.service/cgroup.controllers)"

run aero runuser -u aero -- env XDG_RUNTIME_DIR=/run/user/1000 \
    DBUS_SESSION_BUS_ADDRESS=unix:path=/run/user/1000/bus "${test_env[@]}" "${pytest_cmd[@]}"
