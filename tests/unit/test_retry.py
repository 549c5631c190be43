"""Which commands are retried, which failures qualify, how long the launcher waits."""

from __future__ import annotations

import pytest

from sandbox.core.commandline import program
from sandbox.core.errors import UsageError
from sandbox.core.result import Reason
from sandbox.run import retry

WOULD_BLOCK = (
    b"thread 'rustc' panicked at compiler/rustc_interface/src/util.rs:\n"
    b"called `Result::unwrap()` on an `Err` value: Os { code: 11, kind: WouldBlock, "
    b'message: "Resource temporarily unavailable" }\n'
)
HELPER_THREAD = (
    b'failed to spawn helper thread: Os { code: 11, kind: WouldBlock, message: "Resource '
    b'temporarily unavailable" }\n'
)
COMPILE_ERROR = (
    b"error[E0308]: mismatched types\n --> src/main.rs:2:18\n"
    b'error: could not compile `demo` (bin "demo") due to 1 previous error\n'
)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["cargo", "build"], "cargo"),
        (["/root/.cargo/bin/cargo", "test"], "cargo"),
        (["env", "RUSTFLAGS=-Dwarnings", "cargo", "test"], "cargo"),
        (["/usr/bin/env", "-i", "A=1", "B=2", "npm", "test"], "npm"),
        (["env", "-u", "HOME", "-C", "/tmp", "pnpm", "install"], "pnpm"),
        (["env", "--", "yarn"], "yarn"),
        (["env"], ""),
        (["python3", "-m", "pytest"], "python3"),
    ],
)
def test_program_looks_through_env_and_paths(argv: list[str], expected: str) -> None:
    assert program(argv) == expected


@pytest.mark.parametrize(
    "argv",
    [
        ["cargo", "test"],
        ["rustc", "x.rs"],
        ["cargo-nextest", "run"],
        ["npm", "test"],
        ["npx", "vitest"],
        ["pnpm", "build"],
        ["yarn", "test"],
        ["wasm-pack", "build"],
        ["env", "CARGO_BUILD_JOBS=1", "/usr/local/bin/cargo", "build"],
    ],
)
def test_build_and_test_tools_get_three_attempts(argv: list[str]) -> None:
    assert retry.attempts(argv, None, {}) == 3


@pytest.mark.parametrize("argv", [["make"], ["python3", "-c", "pass"], ["sh", "-c", "cargo b"]])
def test_other_commands_run_once(argv: list[str]) -> None:
    assert retry.attempts(argv, None, {}) == 1


def test_old_environment_variable_sets_the_build_tools_attempts() -> None:
    env = {"AERO_SAFE_RUN_RUSTC_RETRIES": "5"}
    assert retry.attempts(["cargo", "test"], None, env) == 5
    assert retry.attempts(["cargo", "test"], None, {"AERO_SAFE_RUN_RUSTC_RETRIES": "1"}) == 1
    # 0 meant "no retries" to users of the old script: one attempt, not an error.
    assert retry.attempts(["cargo", "test"], None, {"AERO_SAFE_RUN_RUSTC_RETRIES": "0"}) == 1
    # It never turns retries (and the output relay) on for other commands...
    assert retry.attempts(["make"], None, env) == 1
    # ...and the command line wins for any command.
    assert retry.attempts(["make"], "4", env) == 4
    assert retry.attempts(["cargo", "test"], "1", env) == 1


@pytest.mark.parametrize("text", ["", "x", "-1", "2.5", "101"])
def test_bad_attempts_name_the_value(text: str) -> None:
    with pytest.raises(UsageError) as err:
        retry.attempts(["cargo"], text, {})
    assert repr(text) in err.value.line() and "--attempts" in err.value.line()
    with pytest.raises(UsageError, match="AERO_SAFE_RUN_RUSTC_RETRIES"):
        retry.attempts(["cargo"], None, {"AERO_SAFE_RUN_RUSTC_RETRIES": text or "nope"})


@pytest.mark.parametrize(
    ("output", "name"),
    [
        (HELPER_THREAD, "rustc could not spawn a helper thread"),
        (WOULD_BLOCK, "rustc panicked on EAGAIN"),
        (b"failed to spawn work thread: Resource temporarily unavailable", "work thread"),
        (b"Unable to install ctrlc handler: System(WouldBlock)", "ctrl-c handler"),
        (b"Error: Resource temporarily unavailable (os error 11)\n", "EAGAIN (os error 11)"),
        (b"bash: fork: retry: Resource temporarily unavailable\n", "fork failed with EAGAIN"),
        (b"sh: 1: Cannot fork\nbash: fork: Resource temporarily unavailable\n", "fork failed"),
        (
            b"error: could not exec the linker `cc`\n  |\n  = note: Resource temporarily "
            b"unavailable\n",
            "could not exec the linker",
        ),
        (b"node[12]: ../src/node_platform.cc:68: Assertion `(0) == (uv_thread_create(", "node"),
    ],
)
def test_transient_patterns(output: bytes, name: str) -> None:
    found = retry.transient([b"unrelated\n", b"noise " + output + b" more"])
    assert found is not None and name in found


@pytest.mark.parametrize(
    "output",
    [
        COMPILE_ERROR,
        b"test result: FAILED. 10 passed; 1 failed\n",
        # Without EAGAIN, a linker that cannot be run is missing, and stays missing.
        b"error: could not exec the linker `cc`\n  = note: No such file or directory (os error 2)",
        # A program's own WouldBlock (a non-blocking socket in a test) is not rustc's.
        b"thread 'tests::read' panicked at 'Os { code: 11, kind: WouldBlock }'",
        b"",
    ],
)
def test_real_failures_are_not_transient(output: bytes) -> None:
    assert retry.transient([output]) is None


def test_patterns_must_meet_in_one_stream() -> None:
    assert (
        retry.transient([b"could not exec the linker `cc`", b"Resource temporarily unavailable"])
        is None
    )


def test_only_failures_of_the_command_itself_are_retried() -> None:
    tails = [HELPER_THREAD]
    assert retry.should_retry(Reason.EXITED, 101, None, tails) is not None
    assert retry.should_retry(Reason.SIGNALED, 134, 6, tails) is not None  # SIGABRT
    assert retry.should_retry(Reason.EXITED, 0, None, tails) is None
    assert retry.should_retry(Reason.EXITED, 101, None, [COMPILE_ERROR]) is None
    for reason in (Reason.TIMEOUT, Reason.OOM, Reason.PIDS, Reason.ERROR, Reason.NOT_FOUND):
        assert retry.should_retry(reason, 124, None, tails) is None
    # Stopped by a person or a supervisor: never again, whatever it printed.
    assert retry.should_retry(Reason.SIGNALED, 130, 2, tails) is None
    assert retry.should_retry(Reason.SIGNALED, 143, 15, tails) is None
    assert retry.should_retry(Reason.EXITED, 130, None, tails) is None  # a shell's 128+SIGINT


def test_backoff_grows_with_jitter_and_a_ceiling() -> None:
    low = [retry.backoff(n, 4.0, jitter=0.0) for n in (1, 2, 3, 4)]
    high = [retry.backoff(n, 4.0, jitter=0.999) for n in (1, 2, 3, 4)]
    assert low == [2.0, 4.0, 8.0, 16.0]
    assert all(2.99 * lo < h < 3 * lo for h, lo in zip(high, low, strict=True))  # 0.5x .. 1.5x
    assert retry.backoff(20, 4.0, jitter=0.5) == retry.MAX_BACKOFF_S
    for _ in range(50):
        assert 2.0 <= retry.backoff(1, 4.0) < 6.0


def test_backoff_base_from_the_environment() -> None:
    assert retry.backoff_base({}) == retry.DEFAULT_BACKOFF_S
    assert retry.backoff_base({"AERO_RETRY_BACKOFF_S": "0.01"}) == 0.01
    for bad in ("x", "-1", "1000"):
        with pytest.raises(UsageError, match="AERO_RETRY_BACKOFF_S"):
            retry.backoff_base({"AERO_RETRY_BACKOFF_S": bad})
