"""Features for agents on shared hosts, with real processes: the env preset in a real shell,
retries of transient failures, --expect, the output relay, and the old scripts' drop-ins."""

from __future__ import annotations

import hashlib
import os
import shlex
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import (
    LAUNCHER,
    ROOT,
    launcher_env,
    need,
    pid_alive,
    read_report,
    run_in_terminal,
    run_launcher,
    wait_until,
)

PY = sys.executable
WASM = "CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS"
WOULD_BLOCK = (
    "failed to spawn helper thread: Os { code: 11, kind: WouldBlock, "
    'message: "Resource temporarily unavailable" }'
)
FAST_RETRY = {"AERO_RETRY_BACKOFF_S": "0.01"}  # real back-off is seconds: not in tests


def need_memory_limits(tmp_path: Path) -> None:
    report = tmp_path / "probe.json"
    probe = run_launcher(["--report", str(report), "-q", "--", "true"], timeout=30)
    enforced = probe.returncode == 0 and "memory" not in read_report(report)["not_enforced"]  # type: ignore[operator]
    need(enforced, f"no backend here enforces memory: {probe.stderr.strip()}")


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


# -- aero-sandbox env ---------------------------------------------------------------------------
def environment_after_eval(shell: str, extra: dict[str, str]) -> dict[str, str]:
    launcher = " ".join(shlex.quote(part) for part in LAUNCHER)
    script = f'eval "$({launcher} env)" && env -0'
    proc = subprocess.run(
        [shell, "-c", script], env=launcher_env(**extra), capture_output=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    pairs = (item.split(b"=", 1) for item in proc.stdout.split(b"\0") if item)
    return {k.decode(): v.decode() for k, v in pairs}


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_env_preset_evaluated_by_a_real_shell(shell: str) -> None:
    tricky = "--require '/opt/my hooks/x.js' --title=$HOME`id`"
    env = environment_after_eval(
        shell,
        {
            # An old habit that breaks wasm builds: the cap in the global flags.
            "RUSTFLAGS": "-C link-arg=-Wl,--threads=1",
            "NODE_OPTIONS": tricky,
            "RUSTC_WRAPPER": "sccache",
            "AERO_CARGO_BUILD_JOBS": "2",
        },
    )
    for name in (
        "CARGO_BUILD_JOBS",
        "RUSTC_WORKER_THREADS",
        "RAYON_NUM_THREADS",
        "RUST_TEST_THREADS",
        "NEXTEST_TEST_THREADS",
        "AERO_TOKIO_WORKER_THREADS",
    ):
        assert env[name] == "2", name
    assert env["CARGO_INCREMENTAL"] == "1" and env["PW_TEST_WORKERS"] == "1"
    assert env["NODE_OPTIONS"] == tricky + " --max-old-space-size=4096"
    native = [k for k in env if k.startswith("CARGO_TARGET_") and k != WASM]
    assert native and all(env[k] == "-C link-arg=-Wl,--threads=2" for k in native)
    assert env[WASM] == "-C link-arg=--threads=2"
    assert "-Wl," not in env[WASM]
    assert "-Wl," not in env.get("RUSTFLAGS", "") + env.get("CARGO_ENCODED_RUSTFLAGS", "")
    assert "RUSTC_WRAPPER" not in env


def test_env_evaluated_twice_keeps_one_cap() -> None:
    launcher = " ".join(shlex.quote(part) for part in LAUNCHER)
    script = f'eval "$({launcher} env)"; eval "$({launcher} env --jobs 3)"; echo "${WASM}"'
    proc = subprocess.run(
        ["bash", "-c", script], env=launcher_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.strip() == "-C link-arg=--threads=3"


def test_env_json_and_bad_values() -> None:
    import json

    proc = run_launcher(["env", "--json"], env=launcher_env(AERO_ISOLATE_CARGO_HOME="/tmp/ch"))
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["env"]["CARGO_HOME"] == "/tmp/ch"
    proc = run_launcher(["env"], env=launcher_env(AERO_CARGO_BUILD_JOBS="lots"))
    assert proc.returncode == 125
    assert proc.stderr.strip() == (
        "aero-sandbox: invalid AERO_CARGO_BUILD_JOBS value 'lots': expected a whole number, "
        "1 or more"
    )


def test_preset_agent_applies_to_one_command() -> None:
    code = "import os; print(os.environ['CARGO_BUILD_JOBS'], os.environ.get('RUSTC_WRAPPER'))"
    proc = run_launcher(
        ["--preset", "agent", "--", PY, "-c", code], env=launcher_env(RUSTC_WRAPPER="sccache")
    )
    assert proc.returncode == 0 and proc.stdout.split() == ["1", "None"]
    bad = run_launcher(["--preset", "fast", "--", "true"])
    assert bad.returncode == 125 and "'fast'" in bad.stderr and "agent" in bad.stderr


# -- retries ------------------------------------------------------------------------------------
def flaky(tmp_path: Path, name: str, failures: int, message: str, code: int = 101) -> Path:
    """A command that fails `failures` times printing `message`, then succeeds; counts its runs."""
    counter = tmp_path / f"{name}.runs"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    return write_script(
        bin_dir / name,
        f"""echo run >> {counter}
runs=$(wc -l < {counter})
echo "attempt $runs starting"
if [ "$runs" -le {failures} ]; then
    echo {shlex.quote(message)} >&2
    exit {code}
fi
echo "built on attempt $runs"
""",
    )


def runs(tmp_path: Path, name: str) -> int:
    return len((tmp_path / f"{name}.runs").read_text().splitlines())


def test_transient_failure_is_retried_and_succeeds(tmp_path: Path) -> None:
    command = flaky(tmp_path, "cargo", 1, WOULD_BLOCK)
    report = tmp_path / "report.json"
    proc = run_launcher(
        ["--report", str(report), "--", str(command), "build"], env=launcher_env(**FAST_RETRY)
    )
    assert proc.returncode == 0, proc.stderr
    assert runs(tmp_path, "cargo") == 2
    data = read_report(report)
    assert data["attempts"] == 2 and data["exit_code"] == 0 and data["reason"] == "exited"
    assert data["retried_for"] == ["rustc could not spawn a helper thread"]
    # Every attempt's output reached the user, in order.
    assert proc.stdout == "attempt 1 starting\nattempt 2 starting\nbuilt on attempt 2\n"
    lines = proc.stderr.splitlines()
    assert lines[0] == WOULD_BLOCK
    assert lines[1].startswith("aero-sandbox: attempt 1 of 3 failed with a transient resource")


def test_retry_through_env_assignments(tmp_path: Path) -> None:
    command = flaky(tmp_path, "npm", 2, "bash: fork: retry: Resource temporarily unavailable")
    proc = run_launcher(["--", "env", "CI=1", str(command), "test"], env=launcher_env(**FAST_RETRY))
    assert proc.returncode == 0 and runs(tmp_path, "npm") == 3


def test_compile_error_runs_once(tmp_path: Path) -> None:
    command = flaky(tmp_path, "cargo", 5, "error[E0308]: mismatched types")
    report = tmp_path / "report.json"
    proc = run_launcher(
        ["--report", str(report), "--", str(command)], env=launcher_env(**FAST_RETRY)
    )
    assert proc.returncode == 101 and runs(tmp_path, "cargo") == 1
    assert read_report(report)["attempts"] == 1
    assert "error[E0308]" in proc.stderr and "attempt" not in proc.stderr


def test_attempts_run_out(tmp_path: Path) -> None:
    command = flaky(tmp_path, "rustc", 10, WOULD_BLOCK)
    report = tmp_path / "report.json"
    proc = run_launcher(
        ["--report", str(report), "--", str(command)], env=launcher_env(**FAST_RETRY)
    )
    assert proc.returncode == 101 and runs(tmp_path, "rustc") == 3
    assert read_report(report)["attempts"] == 3
    assert proc.stderr.count(WOULD_BLOCK) == 3


def test_old_variable_disables_and_option_enables(tmp_path: Path) -> None:
    command = flaky(tmp_path, "cargo", 1, WOULD_BLOCK)
    env = launcher_env(AERO_SAFE_RUN_RUSTC_RETRIES="1", **FAST_RETRY)
    assert run_launcher(["--", str(command)], env=env).returncode == 101
    assert runs(tmp_path, "cargo") == 1
    other = flaky(tmp_path, "make", 1, WOULD_BLOCK)  # not a build tool we retry by default
    assert run_launcher(["--", str(other)], env=launcher_env(**FAST_RETRY)).returncode == 101
    assert runs(tmp_path, "make") == 1
    (tmp_path / "make.runs").unlink()
    proc = run_launcher(["--attempts", "2", "--", str(other)], env=launcher_env(**FAST_RETRY))
    assert proc.returncode == 0 and runs(tmp_path, "make") == 2


def test_no_retry_the_timeout_could_not_hold(tmp_path: Path) -> None:
    command = flaky(tmp_path, "cargo", 1, WOULD_BLOCK)
    # The first back-off is at least 0.5 x 30 s: far past the 5 s deadline.
    proc = run_launcher(
        ["--timeout", "5", "--", str(command)], env=launcher_env(AERO_RETRY_BACKOFF_S="30")
    )
    assert proc.returncode == 101 and runs(tmp_path, "cargo") == 1
    assert "no time left to retry" in proc.stderr


# -- --expect -----------------------------------------------------------------------------------
def test_expect_missing_artifact_fails_with_123(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    artifact = tmp_path / "target" / "release" / "aero"
    proc = run_launcher(
        ["--report", str(report), "--expect", str(artifact), "--", "true"], cwd=tmp_path
    )
    assert proc.returncode == 123
    assert proc.stderr.strip() == (
        "aero-sandbox: the command exited 0 but its expected output is not there: "
        f"{artifact} is missing"
    )
    data = read_report(report)
    assert data["reason"] == "missing_output" and data["exit_code"] == 123
    assert data["child_exit_code"] == 0


def test_expect_empty_file_and_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "dist").mkdir()
    (tmp_path / "pkg.wasm").write_bytes(b"")
    proc = run_launcher(["--expect", "dist", "--expect=pkg.wasm", "--", "true"], cwd=tmp_path)
    assert proc.returncode == 123
    assert "dist is an empty directory; pkg.wasm is an empty file" in proc.stderr


def test_expect_satisfied_and_not_checked_after_a_failure(tmp_path: Path) -> None:
    make = "mkdir -p dist && echo x > dist/index.js && printf '\\0asm' > pkg.wasm"
    proc = run_launcher(
        ["--expect", "dist", "--expect", "pkg.wasm", "--", "sh", "-c", make], cwd=tmp_path
    )
    assert proc.returncode == 0 and proc.stderr == ""
    proc = run_launcher(["--expect", "missing", "--", "sh", "-c", "exit 3"], cwd=tmp_path)
    assert proc.returncode == 3 and "missing" not in proc.stderr


# -- the output relay (only when more than one attempt is allowed) ------------------------------
def test_relay_binary_and_large_output_unchanged() -> None:
    data_code = (
        "import sys\n"
        "block = bytes(range(256)) * 4096\n"
        "for i in range(24):\n"
        "    sys.stderr.buffer.write(block[i:] + block[:i])\n"
    )
    proc = subprocess.run(
        LAUNCHER + ["--attempts", "2", "--", PY, "-c", data_code],
        capture_output=True,
        env=launcher_env(),
        timeout=120,
    )
    block = bytes(range(256)) * 4096
    expected = b"".join(block[i:] + block[:i] for i in range(24))  # 24 MiB
    assert proc.returncode == 0 and proc.stdout == b""
    assert len(proc.stderr) == len(expected)
    assert hashlib.sha256(proc.stderr).digest() == hashlib.sha256(expected).digest()


IDENTITY = (
    "import os, sys\n"
    "for fd in (1, 2):\n"
    "    st = os.fstat(fd)\n"
    "    print(fd, st.st_dev, st.st_ino, file=sys.stderr)\n"
)


def child_fds(stderr: str) -> dict[int, tuple[int, int]]:
    found = {}
    for line in stderr.splitlines():
        fd, dev, ino = map(int, line.split())
        found[fd] = (dev, ino)
    return found


@pytest.mark.parametrize("target", ["file", "pipe"])
def test_retried_command_writes_to_the_callers_own_stdout(tmp_path: Path, target: str) -> None:
    """Only stderr (where the transient failures are printed) goes through the relay: fd 1 of a
    command that may be retried is the caller's file or pipe itself, not a copy of it."""
    out = tmp_path / "out"
    with open(out, "wb") as sink:
        launcher = subprocess.Popen(
            LAUNCHER + ["--attempts", "3", "--", PY, "-c", IDENTITY + "print('to stdout')"],
            stdout=sink if target == "file" else subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=launcher_env(),
            text=True,
            start_new_session=True,
        )
        try:
            ours = os.fstat(sink.fileno() if launcher.stdout is None else launcher.stdout.fileno())
            written, err = launcher.communicate(timeout=60)
        finally:
            if launcher.poll() is None:
                os.killpg(launcher.pid, signal.SIGKILL)
                launcher.communicate()
    assert launcher.returncode == 0, err
    fds = child_fds(err)
    assert fds[1] == (ours.st_dev, ours.st_ino), "stdout went through the relay"
    assert (written or out.read_text()) == "to stdout\n"
    assert fds[2] != fds[1]


def test_stdout_shares_the_relay_when_it_is_stderr_too(tmp_path: Path) -> None:
    """`>file 2>&1`: one channel for both keeps their interleaving (the exception README names)."""
    out = tmp_path / "out"
    with open(out, "wb") as sink:
        proc = subprocess.run(
            LAUNCHER + ["--attempts", "3", "--", PY, "-c", IDENTITY],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=launcher_env(),
            timeout=60,
        )
        caller = os.fstat(sink.fileno())
    assert proc.returncode == 0
    fds = child_fds(out.read_text())
    assert fds[1] == fds[2] != (caller.st_dev, caller.st_ino)


def test_relay_keeps_each_stream_in_order() -> None:
    code = (
        "import sys\n"
        "for i in range(20000):\n"
        "    print(i, file=sys.stderr if i % 3 else sys.stdout, flush=i % 7 == 0)\n"
    )
    proc = run_launcher(["--attempts", "2", "--", PY, "-c", code], timeout=120)
    assert proc.returncode == 0
    assert proc.stdout.split() == [str(i) for i in range(20000) if i % 3 == 0]
    assert proc.stderr.split() == [str(i) for i in range(20000) if i % 3]


def test_relay_keeps_the_interleaving_of_2_to_1() -> None:
    code = (
        "import sys\n"
        "for i in range(3000):\n"
        "    print(i, file=sys.stderr if i % 3 else sys.stdout, flush=True)\n"
    )
    proc = subprocess.run(
        LAUNCHER + ["--attempts", "2", "--", PY, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=launcher_env(),
        timeout=60,
        text=True,
    )
    assert proc.stdout.split() == [str(i) for i in range(3000)]


def test_relay_leaves_stdin_alone() -> None:
    data = os.urandom(1 << 20)
    proc = subprocess.run(
        LAUNCHER + ["--attempts", "2", "--", "cat"],
        input=data,
        capture_output=True,
        env=launcher_env(),
        timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout == data


def test_timeout_fires_while_nobody_reads_the_output(
    tmp_path: Path, pids_to_kill: list[int]
) -> None:
    """The relay never blocks the supervisor: a reader that stopped reading cannot stop the
    timeout (the command is killed on time; the launcher then waits for the reader, like tee)."""
    pidfile = tmp_path / "pid"
    code = (
        f"import os, sys\nopen({str(pidfile)!r} + '.tmp', 'w').write(str(os.getpid()))\n"
        f"os.rename({str(pidfile)!r} + '.tmp', {str(pidfile)!r})\n"
        "while True:\n    sys.stderr.write('x' * 65536)\n"
    )
    launcher = subprocess.Popen(
        LAUNCHER + ["--attempts", "2", "--timeout", "1", "--kill-after", "0", "--", PY, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=launcher_env(),
        start_new_session=True,
    )
    try:
        assert wait_until(pidfile.exists, timeout=20)
        pid = int(pidfile.read_text())
        pids_to_kill.append(pid)
        # stderr is not read: the pipe to us is full, the command is blocked writing.
        assert wait_until(lambda: not pid_alive(pid), timeout=20), "timeout did not fire"
        out, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
    assert launcher.returncode == 124 and out == b""
    relayed, _, said = err.partition(b"aero-sandbox: ")
    assert set(relayed) == {ord("x")} and b"timed out" in said


def test_relay_with_stdout_closed() -> None:
    """A closed fd 1 stays closed for the command, whatever fd the backend opened meanwhile."""
    proc = subprocess.run(
        LAUNCHER + ["--attempts", "2", "--", PY, "-c", "import os; os.fstat(1)"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=launcher_env(),
        timeout=60,
        text=True,
        pass_fds=(),
        preexec_fn=lambda: os.close(1),
    )
    assert proc.returncode == 1 and "Bad file descriptor" in proc.stderr


@pytest.mark.parametrize("attempts", ["1", "2"])
def test_reader_gone_gives_sigpipe_as_without_a_relay(attempts: str) -> None:
    """`| head`: once our output's reader is gone the command gets SIGPIPE, relayed or not."""
    launcher = subprocess.Popen(
        LAUNCHER + ["-q", "--attempts", attempts, "--", "yes"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=launcher_env(),
        start_new_session=True,
    )
    try:
        assert launcher.stdout is not None
        assert launcher.stdout.read(10) == b"y\n" * 5
        launcher.stdout.close()  # like `head -c 10` exiting
        _, err = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.communicate()
    assert launcher.returncode == 128 + signal.SIGPIPE and err == b""





def test_relay_keeps_a_terminal_a_terminal() -> None:
    code = (
        "import os, sys; print(os.isatty(0), os.isatty(1), os.isatty(2), "
        "os.get_terminal_size(1).columns, os.get_terminal_size(1).lines); "
        "print('to stderr', file=sys.stderr)"
    )
    code_status, output = run_in_terminal(LAUNCHER + ["--attempts", "2", "--", PY, "-c", code])
    assert code_status == 0
    # The terminal's own ONLCR turns \n into \r\n once (the relay's pty adds none).
    assert output == b"True True True 100 40\r\nto stderr\r\n"


def test_retry_in_a_terminal(tmp_path: Path) -> None:
    command = flaky(tmp_path, "cargo", 1, WOULD_BLOCK)
    write_script(
        tmp_path / "run",
        f"AERO_RETRY_BACKOFF_S=0.01 exec {shlex.join(LAUNCHER)} -q -- {command}\n",
    )
    code_status, output = run_in_terminal([str(tmp_path / "run")])
    assert code_status == 0 and runs(tmp_path, "cargo") == 2
    assert output.replace(b"\r\n", b"\n").decode() == (
        f"attempt 1 starting\n{WOULD_BLOCK}\nattempt 2 starting\nbuilt on attempt 2\n"
    )


# -- drop-ins for the old scripts ---------------------------------------------------------------
SCRIPTS = ROOT / "scripts"


@pytest.fixture
def no_installed_launcher(tmp_path: Path) -> dict[str, str]:
    """An environment where aero-sandbox is not on PATH (the scripts fall back to the checkout)
    and PYTHONPATH is unset (the fallback must not need it, nor leak it to the command)."""
    bin_dir = tmp_path / "python-only"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(PY)
    env = launcher_env()
    del env["PYTHONPATH"]
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    return env


def test_safe_run_timeout_memory_and_preset(
    tmp_path: Path, no_installed_launcher: dict[str, str]
) -> None:
    need_memory_limits(tmp_path)
    env = no_installed_launcher
    show = "echo $CARGO_BUILD_JOBS ${PYTHONPATH:-none}; exit 7"
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "safe-run.sh"), "sh", "-c", show],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 7 and proc.stdout.split() == ["1", "none"]
    alloc = "b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096])"
    for mem, expected in (("64M", 137), ("unlimited", 0)):
        proc = subprocess.run(
            ["bash", str(SCRIPTS / "safe-run.sh"), PY, "-c", alloc],
            env={**env, "AERO_MEM_LIMIT": mem},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == expected, proc.stderr
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "safe-run.sh"), "sleep", "30"],
        env={**env, "AERO_TIMEOUT": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 124 and "timed out after 1s" in proc.stderr


def test_with_timeout_and_run_limited(
    tmp_path: Path, no_installed_launcher: dict[str, str]
) -> None:
    need_memory_limits(tmp_path)
    env = no_installed_launcher

    def script(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", *args], env=env, capture_output=True, text=True, timeout=60)

    assert script(str(SCRIPTS / "with-timeout.sh"), "1", "sleep", "30").returncode == 124
    assert script(str(SCRIPTS / "with-timeout.sh"), "30", "sh", "-c", "exit 4").returncode == 4
    alloc = [PY, "-c", "b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096])"]
    assert script(str(SCRIPTS / "run_limited.sh"), "--as", "64M", "--", *alloc).returncode == 137
    assert script(str(SCRIPTS / "run_limited.sh"), "--no-as", "--", *alloc).returncode == 0
    bad = script(str(SCRIPTS / "run_limited.sh"), "--rss", "1G", "--", "true")
    assert bad.returncode == 125 and "unknown option --rss" in bad.stderr
    # The old guide's combination: a timeout around an uncapped run (two nested sandboxes).
    nested = script(
        str(SCRIPTS / "with-timeout.sh"),
        "60",
        "bash",
        str(SCRIPTS / "run_limited.sh"),
        "--no-as",
        "--",
        "sh",
        "-c",
        "echo nested; exit 5",
    )
    assert nested.returncode == 5 and nested.stdout == "nested\n"


@pytest.mark.parametrize(
    ("script", "args", "env", "expected"),
    [
        ("safe-run.sh", ["cargo", "test"], {}, ["--preset", "agent", "--timeout", "600"]),
        ("safe-run.sh", ["cargo", "test"], {"AERO_TIMEOUT": "900"}, ["--preset", "agent"]),
        (
            "with-timeout.sh",
            ["600", "cargo", "test"],
            {},
            ["--timeout", "600", "--mem", "unlimited"],
        ),
        ("run_limited.sh", ["--as", "12G", "--", "cargo", "test"], {}, ["--mem", "12G"]),
        ("run_limited.sh", ["--as=8G", "cargo", "test"], {}, ["--mem", "8G"]),
        (
            "run_limited.sh",
            ["--no-as", "--", "cargo", "test"],
            {},
            ["--mem", "unlimited", "--as", "unlimited"],
        ),
    ],
)
def test_scripts_call_the_installed_launcher(
    tmp_path: Path, script: str, args: list[str], env: dict[str, str], expected: list[str]
) -> None:
    """With aero-sandbox on PATH, each script execs it with the options of the migration table."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv"
    fake = write_script(bin_dir / "aero-sandbox", f'printf "%s\\n" "$@" > {record}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    proc = subprocess.run(
        ["bash", str(SCRIPTS / script), *args],
        env={**launcher_env(), "PATH": f"{bin_dir}:/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert record.read_text().splitlines() == [*expected, "--", "cargo", "test"]


def test_scripts_are_executable() -> None:
    for name in ("safe-run.sh", "with-timeout.sh", "run_limited.sh"):
        assert os.access(SCRIPTS / name, os.X_OK), name
