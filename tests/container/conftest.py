"""The container stage's fixtures: the image of docs/examples/Dockerfile, built with Podman.

scripts/container-stage prepares what these need (podman, runc, a local base image named by
AERO_CONTAINER_BASE, CONTAINERS_CONF with this host's ulimits) and runs this directory.
Every container a test starts has a name of its own and is removed by it (`podman rm -f`), a
pod with its cgroup.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT, need, wait_until

BASE = os.environ.get("AERO_CONTAINER_BASE", "")
DOCKERFILE = ROOT / "docs/examples/Dockerfile"
POD = ROOT / "docs/examples/pod.yaml"


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run podman, bounded; the caller checks the exit code (a container's own is often it)."""
    return subprocess.run(
        ["podman", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def ok(*args: str, timeout: float = 120) -> str:
    proc = podman(*args, timeout=timeout)
    assert proc.returncode == 0, f"podman {' '.join(args)}: {proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="session")
def image() -> Iterator[str]:
    """The example Dockerfile built from this checkout, removed after the session."""
    if os.geteuid() != 0:  # a property of this test run (the VM's user run), not of the host
        pytest.skip("root only: rootful podman")
    need(shutil.which("podman") is not None, "podman is not installed: run scripts/container-stage")
    need(BASE != "", "AERO_CONTAINER_BASE is not set: run scripts/container-stage")
    tag = f"localhost/aero-sandbox-example:test-{os.getpid()}"
    ok("build", "--network", "none", "--build-arg", f"BASE={BASE}",
       "-f", str(DOCKERFILE), "-t", tag, str(ROOT), timeout=300)  # fmt: skip
    try:
        yield tag
    finally:
        podman("rmi", "-f", tag)


@pytest.fixture
def name(request: pytest.FixtureRequest) -> Iterator[str]:
    """A container (or pod) name for this test; whatever carries it is removed afterwards."""
    value = f"aero-test-{os.getpid()}-{request.node.name}".replace("[", "-").strip("]")
    value = "".join(c if c.isalnum() or c in "-_." else "-" for c in value)[:60]
    try:
        yield value
    finally:
        remove_pod(value)
        podman("rm", "-f", "-t", "0", value)


def remove_pod(name: str) -> None:
    """`podman pod rm`, then the pod's cgroup: with the cgroupfs manager (no systemd), Podman 4.3
    leaves libpod_parent/<pod id> behind in the unified and name=systemd hierarchies."""
    pod_id = podman("pod", "inspect", "--format", "{{.Id}}", name).stdout.strip()
    podman("pod", "rm", "-f", "-t", "0", name)
    if not pod_id:
        return
    for path in glob.glob(f"/sys/fs/cgroup/*/libpod_parent/{pod_id}") + glob.glob(
        f"/sys/fs/cgroup/libpod_parent/{pod_id}"
    ):
        for directory, _subdirs, _files in os.walk(path, topdown=False):
            try:
                os.rmdir(directory)  # refused while a process is left in it: a real leak
            except FileNotFoundError:
                pass


def run(image: str, *args: str, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    """`podman run --rm` of the example image: ENTRYPOINT aero-sandbox --, then `args`."""
    return podman("run", "--rm", "--network", "none", *flags, image, *args)


def logs_show(container: str, text: str, timeout: float = 30) -> bool:
    return wait_until(lambda: text in podman("logs", container).stdout, timeout, interval=0.2)
