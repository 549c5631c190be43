"""aero-sandbox as the entrypoint of real containers: docs/examples/Dockerfile and pod.yaml.

Run by scripts/container-stage (Podman, runc). The image's ENTRYPOINT is `aero-sandbox --`, so
the launcher is the container's PID 1 and `podman run IMAGE CMD...` runs CMD in a sandbox.
Tests that read the JSON report run the launcher itself as entrypoint, with --report into a
mounted directory.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
from pathlib import Path

from tests.container.conftest import POD, logs_show, ok, podman, run
from tests.programs import ALLOCATE, FORWARD, GROWING_CHILDREN, ORPHANS

NOTICE = "no cgroup here, limits come from rlimits and a watchdog"


def with_report(tmp_path: Path, *launcher_args: str) -> tuple[tuple[str, ...], list[str]]:
    """podman flags and arguments that run the launcher with --report /out/r.json."""
    flags = ("-v", f"{tmp_path}:/out", "--entrypoint", "aero-sandbox")
    return flags, ["--report", "/out/r.json", *launcher_args, "--"]


def test_the_entrypoint_is_pid_1_and_the_containers_status_is_the_commands(image: str) -> None:
    proc = run(image, "sh", "-c", "tr '\\0' ' ' </proc/1/cmdline; echo; echo to-err >&2; exit 3")
    assert proc.returncode == 3, proc.stderr
    assert "aero-sandbox -- sh -c" in proc.stdout  # PID 1 is the launcher, not a shell or init
    assert "to-err" in proc.stderr
    # The image's limits came from its ENV (AERO_MEM_LIMIT=6G): said nowhere, as nothing is smaller.
    assert "effective limit" not in proc.stderr


def test_pid_1_reaps_orphans(image: str) -> None:
    proc = run(image, "python3", "-c", ORPHANS)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout.split() == ["parent", "1", "zombies", "0"], proc.stdout


def test_under_an_init_the_launcher_reaps_as_a_subreaper(image: str) -> None:
    """`podman run --init`: catatonit is PID 1, the launcher its child; orphans still come to
    the launcher (PR_SET_CHILD_SUBREAPER) and are reaped."""
    proc = run(image, "python3", "-c", ORPHANS, flags=("--init",))
    assert proc.returncode == 7, proc.stderr
    words = proc.stdout.split()
    assert words[0] == "parent" and words[1] != "1" and words[2:] == ["zombies", "0"], words


def test_podman_stop_sends_sigterm_to_the_command(image: str, name: str) -> None:
    ok("run", "-d", "--name", name, "--network", "none", image, "python3", "-c", FORWARD)
    assert logs_show(name, "ready"), podman("logs", name).stderr
    ok("stop", "-t", "30", name, timeout=60)  # SIGTERM to PID 1, SIGKILL only after 30 s
    code = ok("inspect", "--format", "{{.State.ExitCode}}", name).strip()
    assert code == str(40 + signal.SIGTERM), podman("logs", name).stderr
    assert f"got {int(signal.SIGTERM)}" in podman("logs", name).stdout


def test_unprivileged_container_falls_back_and_names_the_run_flags(
    image: str, tmp_path: Path
) -> None:
    """Read-only /sys/fs/cgroup (the default): the rlimit fallback, the container's own memory
    limit found, said once, and the flags that would give kernel limits named."""
    flags, args = with_report(tmp_path, "--mem", "1G")
    proc = run(image, *args, "true", flags=(*flags, "--memory", "256m"))
    assert proc.returncode == 0, proc.stderr
    assert NOTICE in proc.stderr and "Read-only file system" in proc.stderr
    assert "--privileged" in proc.stderr
    assert proc.stderr.count("the effective limit is 256.0 MiB") == 1, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["backend"] == "rlimit"
    assert report["launcher_pid"] == 1
    assert report["effective_memory_bytes"] == 256 << 20


def test_the_fallback_stops_a_tree_over_mem_before_the_containers_oom_killer(
    image: str, tmp_path: Path
) -> None:
    """Three children growing to 900 MB in all, in a container capped at 1 GiB: the watchdog
    kills the tree at --mem 400M and reports it, before the container's limit is reached."""
    flags, args = with_report(tmp_path, "--mem", "400M")
    command = ("python3", "-c", GROWING_CHILDREN, "/tmp")
    proc = run(image, *args, *command, flags=(*flags, "--memory", "1g"))
    assert proc.returncode == 137, proc.stderr
    assert "killed for memory: the command reached its 400.0 MiB limit" in proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["backend"] == "rlimit" and report["reason"] == "oom"


def test_the_podman_remedy_named_gives_kernel_limits_on_cgroup_v2(image: str) -> None:
    """`--security-opt unmask=/sys/fs/cgroup`, named by the fallback's line, makes the cgroupfs
    writable on cgroup v2 (the VM stage): the cgroup backend then nests in the container's own
    cgroup. Podman keeps it read-only on v1 (the development host): still the fallback there."""
    flags = ("--security-opt", "unmask=/sys/fs/cgroup", "--memory", "512m")
    proc = run(image, "cat", "/proc/self/cgroup", flags=flags)
    assert proc.returncode == 0, proc.stderr
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):  # pure v2
        assert NOTICE not in proc.stderr, proc.stderr
        assert re.fullmatch(r"/aero-sandbox-1-[0-9a-f]+", sandbox_path(proc.stdout)), proc.stdout
    else:
        assert NOTICE in proc.stderr and "Read-only file system" in proc.stderr


def privileged_flags(cgroupns: str) -> tuple[str, ...]:
    return ("--privileged", f"--cgroupns={cgroupns}", "--memory", "512m")


def sandbox_path(cgroup_text: str) -> str:
    """The memory cgroup (v1) or the unified one (v2) of a /proc/self/cgroup text."""
    lines = dict(
        (fields[1] or "unified", fields[2])
        for fields in (line.split(":", 2) for line in cgroup_text.splitlines())
    )
    return lines.get("memory", lines.get("unified", ""))


def test_privileged_container_nests_the_sandbox_in_its_own_cgroup(image: str) -> None:
    for cgroupns in ("host", "private"):
        proc = run(
            image, "cat", "/proc/self/cgroup",
            flags=(*privileged_flags(cgroupns), "-e", "AERO_MEM_LIMIT=100M"),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert NOTICE not in proc.stderr
        path = sandbox_path(proc.stdout)
        assert re.fullmatch(r".*/aero-sandbox-1-[0-9a-f]+", path), proc.stdout
        if cgroupns == "private":  # the container's cgroup is the namespace's root
            assert path.count("/") == 1, path
        else:  # the host's path: below the container's own cgroup
            assert "libpod" in path, path


def test_privileged_container_oom_kill_is_the_kernels(image: str, tmp_path: Path) -> None:
    flags, args = with_report(tmp_path, "--mem", "100M")
    code = ALLOCATE.format(size=300 << 20)
    proc = run(image, *args, "python3", "-c", code, flags=(*flags, *privileged_flags("private")))
    assert proc.returncode == 137, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["backend"] == "cgroup"
    # v1 tells us of an OOM as it starts; we kill the whole sandbox then (memory.oom.group's
    # behaviour), often before the kernel picks a victim, so oom_kills may be 0 here.
    assert report["reason"] == "oom"
    assert report["effective_memory_bytes"] == 100 << 20


def pod_manifest(name: str, image: str, command: list[str]) -> str:
    """docs/examples/pod.yaml with this test's pod name, image and command."""
    text = POD.read_text()
    for old, new in (
        ("name: agent-tests\n", f"name: {name}\n"),
        ("image: registry.example.com/agent-tests:1", f"image: {image}"),
        ('args: ["npm", "test"]', f"args: {json.dumps(command)}"),
    ):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def test_the_kubernetes_pod_example_with_podman_kube_play(
    image: str, name: str, tmp_path: Path
) -> None:
    """The pod's env reaches the launcher, its memory limit the container, and stopping the pod
    sends SIGTERM to the command (the launcher is PID 1 of the container)."""
    show = "import os; print('mem', os.environ['AERO_MEM_LIMIT'], flush=True)\n"
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(pod_manifest(name, image, ["python3", "-c", show + FORWARD]))
    ok("kube", "play", "--network", "none", str(manifest), timeout=120)
    container = f"{name}-tests"
    assert logs_show(container, "ready"), podman("logs", container).stderr
    assert "mem 6G" in podman("logs", container).stdout
    memory = ok("inspect", "--format", "{{.HostConfig.Memory}}", container).strip()
    assert memory == str(8 << 30)
    ok("pod", "stop", "-t", "30", name, timeout=60)
    code = ok("inspect", "--format", "{{.State.ExitCode}}", container).strip()
    assert code == str(40 + signal.SIGTERM), podman("logs", container).stderr


def test_a_kube_pod_whose_agent_runs_two_members_in_one_budget(
    image: str, name: str, tmp_path: Path
) -> None:
    """docs/budgets.md's pod: aero-sandbox inside a privileged pod makes the agent's budget below
    the pod's cgroup; two concurrent members share it, and a third that overflows it is the
    kernel's victim (budget_oom) while the two live on."""
    hold = "b = bytearray(150 << 20); b[::4096] = b'x' * len(b[::4096]); import time; time.sleep(8)"
    victim = (
        "open('/proc/self/oom_score_adj', 'w').write('1000'); "
        "b = bytearray(200 << 20); b[::4096] = b'x' * len(b[::4096])"
    )
    count = (
        "import json, sys; row = [r for r in json.load(sys.stdin) if r['name'] == 'agent'][0]; "
        "print('members', row['running'], 'usage_mib', row['memory_bytes'] >> 20)"
    )
    script = (
        # The harness's environment for the commands it runs (not for the entrypoint launcher).
        "export AERO_BUDGET=agent AERO_BUDGET_MEM=400M; "
        f"aero-sandbox -q -- python3 -c {shlex.quote(hold)} & "
        f"aero-sandbox -q -- python3 -c {shlex.quote(hold)} & "
        "sleep 4; "
        f"aero-sandbox budget list --json | python3 -c {shlex.quote(count)}; "
        f"aero-sandbox -- python3 -c {shlex.quote(victim)}; echo victim=$?; "
        "wait; echo members-ended=$?"
    )
    text = pod_manifest(name, image, ["sh", "-c", script])
    privileged = "securityContext: {privileged: true}"
    text = text.replace("# " + privileged, privileged)
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(text)
    ok("kube", "play", "--network", "none", str(manifest), timeout=120)
    container = f"{name}-tests"
    assert logs_show(container, "members-ended", timeout=120), podman("logs", container).stderr
    logs = podman("logs", container)
    words = logs.stdout.split()
    assert words[words.index("members") + 1] == "2", logs.stdout
    assert int(words[words.index("usage_mib") + 1]) >= 300, logs.stdout
    assert "victim=137" in logs.stdout and "members-ended=0" in logs.stdout, logs.stdout
    assert "budget agent ran out (cap 400.0 MiB" in logs.stderr, logs.stderr
