#!/bin/bash
# Installs aero-sandbox into a venv at /opt/aero-sandbox and creates the lingering test user
# "aero" (uid 1000). One script for both VMs, so they are set up the same way:
#   provision.sh --wheelhouse DIR   offline, from prebuilt wheels (the qemu stage's guest-stage.sh)
#   provision.sh --source DIR       from a source tree, with apt + PyPI (the Vagrantfile)
#   provision.sh --user-only        only the user (run in a chroot while building the qemu image)
# Run as root. Safe to run again: the venv is recreated, the user is kept.
set -euo pipefail
PREFIX=${AERO_PREFIX:-/opt/aero-sandbox}
TEST_USER=aero
TEST_UID=1000
REQ='aero-sandbox[systemd,test]'

create_user() {
    getent passwd "$TEST_USER" >/dev/null ||
        useradd --create-home --uid "$TEST_UID" --user-group --shell /bin/bash "$TEST_USER"
    # Lingering: user@1000.service (the user's systemd and bus) runs without a login session.
    # loginctl also starts it now; in a chroot (image build) the file is what logind reads at boot.
    if [ -d /run/systemd/system ] && loginctl enable-linger "$TEST_USER"; then :; else
        mkdir -p /var/lib/systemd/linger && touch "/var/lib/systemd/linger/$TEST_USER"
    fi
}

# Venvs are made from Debian's own python3, the interpreter the wheels were built for.
# No native entry here: the qemu image has no C compiler and a wheel has no C source, so
# bin/aero-sandbox stays the Python entry (README: a caller's ignored SIGPIPE is then reset).
install_from_wheelhouse() {
    # A venv without its own pip, filled by the system's pip (python3-pip): under TCG, ensurepip
    # alone takes 30 s and byte-compiling every file 8 s more. Python compiles what is imported.
    /usr/bin/python3 -m venv --without-pip --clear "$PREFIX"
    /usr/bin/python3 -m pip --python "$PREFIX/bin/python" install --quiet --no-compile \
        --disable-pip-version-check --root-user-action=ignore --no-index --find-links "$1" "$REQ"
    write_bundle
}

# Our modules compiled into one file beside the entry, which reads it at start-up
# (sandbox/bundle.py). From /: the installed package, not a source tree in the working directory.
write_bundle() {
    (cd / && "$PREFIX/bin/python" -I -m sandbox.bundle "$PREFIX/bin/aero-sandbox.bundle" >/dev/null)
}

install_from_source() {
    # pystemd has no wheel on PyPI: it is compiled against libsystemd. nodejs: WebAssembly tests.
    export DEBIAN_FRONTEND=noninteractive
    apt-get -qq update
    apt-get -qq install -y --no-install-recommends ca-certificates python3-venv python3-dev gcc \
        pkg-config libsystemd-dev nodejs >/dev/null
    # Build from a copy: an in-tree build would write build/ and *.egg-info into the shared folder.
    local tmp; tmp=$(mktemp -d)
    tar -C "$1" --exclude=./.venv --exclude=./build --exclude=./dist -cf - . | tar -C "$tmp" -xf -
    /usr/bin/python3 -m venv --clear "$PREFIX"
    "$PREFIX/bin/pip" install --quiet "$tmp[systemd,test]"
    # The venv's paths written into the entry, which then never imports `site` (bin/aero-sandbox).
    bash "$tmp/scripts/entry-paths" "$PREFIX/bin"
    # The native entry that keeps a caller's ignored SIGPIPE (bin/aero-sandbox.c); gcc is here.
    bash "$tmp/scripts/native-entry" "$PREFIX/bin"
    # The launcher's system calls as a C module (sandbox/core/syscalls.c), into the installed copy.
    bash "$tmp/scripts/native-module" "$PREFIX/bin/python" "$(cd / && "$PREFIX/bin/python" -I -c \
        'import os, sandbox.core; print(os.path.dirname(sandbox.core.__file__))')"
    rm -rf "$tmp"
    write_bundle
}

case "${1:-}" in
    --wheelhouse) create_user; install_from_wheelhouse "$2" ;;
    --source)     create_user; install_from_source "$2" ;;
    --user-only)  create_user ;;
    *) echo "usage: $0 --wheelhouse DIR | --source DIR | --user-only" >&2; exit 2 ;;
esac
