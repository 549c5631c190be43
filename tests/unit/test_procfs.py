"""The one /proc reader (sandbox/core/procfs.py), on this process, and the size format."""

from __future__ import annotations

import os
import threading

import pytest

from sandbox.core import procfs
from sandbox.core.limits import format_size


def test_stat_of_this_process() -> None:
    info = procfs.stat(os.getpid())
    assert info is not None
    assert info.ppid == os.getppid() and info.state in "RS"
    assert info.threads >= threading.active_count() and info.rss_pages > 0
    assert procfs.stat(os.getpid()).start == info.start  # type: ignore[union-attr]


def test_user_tasks_counts_this_process_by_real_uid() -> None:
    assert procfs.user_tasks(os.getuid()) >= threading.active_count()


@pytest.mark.parametrize(
    ("value", "long", "short"),
    [
        (None, "unlimited", "unlimited"),
        (512, "512 B", "512B"),
        (1536, "1.5 KiB", "1.5K"),
        (12 << 30, "12.0 GiB", "12.0G"),
    ],
)
def test_size_formats(value: int | None, long: str, short: str) -> None:
    assert format_size(value) == long and format_size(value, compact=True) == short
