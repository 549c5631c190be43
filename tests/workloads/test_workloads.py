"""Real tools nobody here wrote, on the cgroup and the rlimit backends (issue 12).

- At --mem 12G they run: Chromium (driven by playwright-core) renders a page that makes a
  4 GiB-maximum WebAssembly.Memory, esbuild-wasm bundles playwright-core, cargo builds a crate
  against Debian's vendored crates, offline.
- sql.js (SQLite in WebAssembly) and Chromium over a tight limit end as 137/oom.
- A page that spins forever under --timeout ends at the timeout and leaves no Chromium process.
- Tight limits end as 137/oom within seconds, never at the timeout.
- The old `prlimit --as=12G` cannot start Chromium at all: the contrast the README's demo makes.

Each run's figures go to $AERO_WORKLOADS_SUMMARY (one line each) for the stage's table.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import (
    launcher_env,
    need,
    need_kernel_sandbox,
    read_report,
    run_launcher,
    wait_until,
)
from tests.workloads.conftest import (
    CARGO,
    CHROMIUM,
    HERE,
    RUSTC,
    marked,
    need_tool,
    workloads_dir,
)

BACKENDS = ["cgroup", "rlimit"]
G12 = str(12 << 30)


def sandboxed(
    backend: str,
    limits: list[str],
    command: list[str],
    mark: str,
    tmp_path: Path,
    timeout: float = 240,
    **env: str,
) -> tuple[int, str, str, dict[str, object]]:
    """Run `command` under aero-sandbox; (exit code, stdout, stderr, report)."""
    if backend != "rlimit":
        need_kernel_sandbox()
    report = tmp_path / "report.json"
    modules = str(workloads_dir() / "node_modules")
    environment = launcher_env(AERO_TEST_MARK=mark, NODE_PATH=modules, **env)
    args = ["--backend", backend, *limits, "--report", str(report), "--", *command]
    proc = run_launcher(args, timeout=timeout, env=environment)
    data = read_report(report)
    _summarize(backend, limits, command, data)
    # Its own cgroups, from its report: other sandboxes on this busy host are none of ours.
    cgroups = dict(data.get("sandbox") or {}).get("cgroups") or {}
    wait_until(lambda: not any(os.path.exists(p) for p in cgroups.values()), timeout=5)
    assert not [p for p in cgroups.values() if os.path.exists(p)], "cgroups left behind"
    return proc.returncode, proc.stdout, proc.stderr, data


def _summarize(
    backend: str, limits: list[str], command: list[str], data: dict[str, object]
) -> None:
    where = os.environ.get("AERO_WORKLOADS_SUMMARY")
    if not where:
        return
    peak = data.get("peak_memory_bytes")
    shown = f"{peak / (1 << 20):.0f} MiB" if isinstance(peak, int) else "-"
    words = " ".join(Path(c).name if "/" in c else c for c in command)[:60]
    with open(where, "a") as f:
        f.write(
            f"{backend}\t{' '.join(limits)}\t{words}\t{data['exit_code']}\t{data['reason']}\t"
            f"{shown}\t{data['wall_s']:.1f}s\n"
        )


def chromium(*args: str) -> list[str]:
    need_tool(CHROMIUM, "chromium")
    return ["node", str(HERE / "chromium.js"), *args]


# -- at --mem 12G everything runs ------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_chromium_renders_a_4gib_wasm_page_at_12g(backend: str, mark: str, tmp_path: Path) -> None:
    code, out, err, data = sandboxed(
        backend, ["--mem", "12G", "--timeout", "180"], chromium("wasm", "512"), mark, tmp_path
    )
    assert code == 0, (err, data)
    words = out.split()
    assert words[0] == "wasm" and int(words[1]) >= 512 << 20 and words[3] == "ready", out
    assert data["reason"] == "exited"


@pytest.mark.parametrize("backend", BACKENDS)
def test_esbuild_wasm_bundles_at_12g(backend: str, mark: str, tmp_path: Path) -> None:
    modules = workloads_dir() / "node_modules"
    out = tmp_path / "bundle.js"
    command = [
        "node",
        str(modules / "esbuild-wasm/bin/esbuild"),
        "--bundle",
        "--platform=node",
        "--minify",
        "--log-level=warning",
        str(modules / "playwright-core/index.js"),
        f"--outfile={out}",
    ]
    code, _out, err, data = sandboxed(
        backend, ["--mem", "12G", "--timeout", "180"], command, mark, tmp_path
    )
    assert code == 0, (err, data)
    assert out.stat().st_size > 1 << 20  # playwright-core, bundled


@pytest.mark.parametrize("backend", BACKENDS)
def test_cargo_builds_offline_at_12g(
    backend: str, mark: str, tmp_path: Path, cargo_home: Path, crate: Path
) -> None:
    need_tool(RUSTC, "rustc")
    command = [CARGO, "build", "--offline", "-q", "--manifest-path", str(crate / "Cargo.toml")]
    code, _out, err, data = sandboxed(
        backend,
        ["--mem", "12G", "--timeout", "300"],
        command,
        mark,
        tmp_path,
        timeout=360,
        CARGO_HOME=str(cargo_home),
        RUSTC=RUSTC,
        PATH="/usr/bin:/bin",
    )
    assert code == 0, (err, data)
    binary = crate / "target/debug/aero-workload"
    ran = subprocess.run([str(binary)], capture_output=True, text=True, timeout=60)
    assert ran.stdout == "rows 10000 sum 333283335000\n", ran
    assert data["reason"] == "exited"


# -- a spinning page under --timeout ---------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_spinning_page_times_out_leaving_no_chromium(
    backend: str, mark: str, tmp_path: Path
) -> None:
    limits = ["--mem", "12G", "--timeout", "15", "--kill-after", "2"]
    code, out, err, data = sandboxed(backend, limits, chromium("spin"), mark, tmp_path)
    assert code == 124, (err, data)
    assert "spinning" in out, err  # the page's loop ran: the timeout, not a start-up failure
    assert data["reason"] == "timeout"
    assert marked(mark) == [], "a Chromium process outlived the sandbox"


# -- tight limits end as OOM within seconds --------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_chromium_over_a_tight_limit_is_oom_within_seconds(
    backend: str, mark: str, tmp_path: Path
) -> None:
    limits = ["--mem", "400M", "--timeout", "120"]
    code, _out, err, data = sandboxed(backend, limits, chromium("wasm", "2048"), mark, tmp_path)
    assert (code, data["reason"]) == (137, "oom"), (err, data)
    assert data["wall_s"] < 60, data["wall_s"]  # seconds, never the timeout


@pytest.mark.parametrize("backend", BACKENDS)
def test_sqljs_over_a_tight_limit_is_oom_within_seconds(
    backend: str, mark: str, tmp_path: Path
) -> None:
    command = ["node", str(HERE / "sqljs.js"), "400"]
    code, _out, err, data = sandboxed(
        backend, ["--mem", "150M", "--timeout", "120"], command, mark, tmp_path
    )
    assert (code, data["reason"]) == (137, "oom"), (err, data)
    assert data["wall_s"] < 60, data["wall_s"]


# -- the old way -------------------------------------------------------------------------------
def test_prlimit_as_12g_cannot_start_chromium(mark: str, tmp_path: Path) -> None:
    """`prlimit --as=12G` caps each process's address space: V8 and Chromium reserve far more
    than they use (the pointer cage, WebAssembly's guard regions), so Chromium fails to start.
    Run inside a roomy cgroup sandbox so that nothing it starts can outlive the test."""
    need(os.path.exists("/usr/bin/prlimit"), "prlimit (util-linux) is missing")
    command = ["/usr/bin/prlimit", f"--as={G12}", *chromium("wasm", "64")]
    code, out, err, data = sandboxed(
        "cgroup", ["--mem", "12G", "--timeout", "120"], command, mark, tmp_path
    )
    assert code not in (0, 124, 137), (out, err, data)
    assert "wasm" not in out
    print(f"prlimit --as=12G: exit {code}: {err.strip().splitlines()[:2]}", file=sys.stderr)
