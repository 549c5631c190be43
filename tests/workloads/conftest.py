"""The workloads stage (scripts/workloads-stage): real tools under every backend.

The stage installs the tools and names the cache directory holding the npm packages in
AERO_WORKLOADS; without it (a plain `pytest tests/`) these tests skip with that reason.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import need, pid_alive, wait_until

HERE = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"
CARGO = "/usr/bin/cargo"
RUSTC = "/usr/bin/rustc"
DEBIAN_CRATES = "/usr/share/cargo/registry"


def workloads_dir() -> Path:
    where = os.environ.get("AERO_WORKLOADS", "")
    need(bool(where), "AERO_WORKLOADS is not set: run the workloads stage, scripts/workloads-stage")
    path = Path(where)
    need(
        (path / "node_modules").is_dir(), f"{path}/node_modules is missing: the npm install failed"
    )
    return path


def need_tool(path: str, package: str) -> None:
    need(os.access(path, os.X_OK), f"{path} is missing: the stage could not install {package}")


def marked(mark: str) -> list[int]:
    """Pids whose environment carries the test's mark: the workload's whole tree, whatever it
    renamed or re-parented itself to (Chromium's zygotes, renderers, GPU process)."""
    found = []
    needle = f"AERO_TEST_MARK={mark}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


@pytest.fixture
def mark() -> Iterator[str]:
    """A mark for the workload's environment; at the end no process may carry it."""
    value = uuid.uuid4().hex
    yield value
    wait_until(lambda: not [p for p in marked(value) if pid_alive(p)], timeout=5)
    left = [p for p in marked(value) if pid_alive(p)]
    for pid in left:  # clean up before failing, by pid
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    assert not left, f"processes of the workload left behind: {left}"


@pytest.fixture
def cargo_home(tmp_path: Path) -> Path:
    """A CARGO_HOME whose crates.io is Debian's vendored crates: builds offline."""
    need_tool(CARGO, "cargo")
    need(os.path.isdir(DEBIAN_CRATES), f"{DEBIAN_CRATES} is missing: install librust-*-dev")
    home = tmp_path / "cargo-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[source.crates-io]\nreplace-with = "debian"\n'
        f'[source.debian]\ndirectory = "{DEBIAN_CRATES}"\n'
        "[net]\noffline = true\n"
    )
    return home


@pytest.fixture
def crate(tmp_path: Path) -> Path:
    target = tmp_path / "crate"
    shutil.copytree(HERE / "crate", target)
    return target
