"""The project's own requirement: the Node version its .nvmrc names.

A failure here is exit 2 (sandboxes work, the project's toolchain does not);
AERO_ALLOW_UNSUPPORTED_NODE=1 makes it a warning.
"""

from __future__ import annotations

import os
import subprocess

from sandbox.doctor.check import Check, read

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping


def find_nvmrc(start: str) -> str | None:
    path = os.path.abspath(start)
    while True:
        candidate = os.path.join(path, ".nvmrc")
        if os.path.isfile(candidate):
            return candidate
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def node_matches(wanted: str, actual: str) -> bool | None:
    """Whether Node `actual` (v20.11.1) satisfies .nvmrc's `wanted` (20, 20.11, v20.11.1); None
    when `wanted` is an alias (lts/*, node) that cannot be checked without nvm."""
    want = wanted.strip().removeprefix("v").split(".")
    have = actual.strip().removeprefix("v").split(".")
    if not want or not all(part.isdigit() for part in want):
        return None
    return have[: len(want)] == want


def check(environ: Mapping[str, str], cwd: str) -> Check:
    nvmrc = find_nvmrc(cwd)
    actual = _node_version()
    if nvmrc is None:
        found = f"Node {actual}" if actual else "no node on PATH"
        return Check("node", "info", f"no .nvmrc in {cwd} or above ({found})")
    wanted = read(nvmrc).strip().splitlines()[0].strip() if read(nvmrc).strip() else ""
    details = {"nvmrc": nvmrc, "wanted": wanted, "found": actual}
    allowed = environ.get("AERO_ALLOW_UNSUPPORTED_NODE", "").strip().lower() in ("1", "true", "yes")
    failing = "warn" if allowed else "error"
    remedy = f"nvm install && nvm use (reads {nvmrc})" + (
        "" if allowed else ", or set AERO_ALLOW_UNSUPPORTED_NODE=1 to go on with this Node"
    )
    if actual is None:
        summary = f"{nvmrc} wants Node {wanted}; no node on PATH"
        return Check("node", failing, summary, remedy, details)
    matches = node_matches(wanted, actual)
    if matches is None:
        return Check(
            "node",
            "info",
            f"{nvmrc} names {wanted!r} (an alias: not checked); Node {actual}",
            details=details,
        )
    if matches:
        return Check("node", "ok", f"Node {actual} matches {nvmrc} ({wanted})", details=details)
    allowed_note = " (allowed by AERO_ALLOW_UNSUPPORTED_NODE)" if allowed else ""
    return Check(
        "node",
        failing,
        f"Node {actual} does not match {nvmrc} ({wanted}){allowed_note}",
        remedy,
        details,
    )


def _node_version() -> str | None:
    import shutil

    node = shutil.which("node")
    if node is None:
        return None
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
