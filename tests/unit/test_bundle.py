"""sandbox/bundle.py: modules served from one compiled file only while their source is the one
compiled; anything else is imported the usual way. Each case runs in a fresh Python (-S, as the
entry runs), so that no finder or module stays behind in the test process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sandbox import bundle
from tests.conftest import ROOT

MODULE = '''from __future__ import annotations

"""not the docstring: the future import comes first"""


def size(value: Unknown) -> int:
    return 3
'''
SHOW = """
import sys
sys.path[:0] = [{home!r}, {root!r}]
from sandbox.bundle import use
print(use({file!r}))
import demo.sizes
print(type(demo.sizes.__spec__.loader).__name__, demo.sizes.__file__ == {source!r})
print(demo.sizes.size(0), demo.sizes.size.__annotations__["value"], "__future__" in sys.modules)
"""


def demo_package(home: Path) -> Path:
    (home / "demo").mkdir()
    (home / "demo" / "__init__.py").write_text("")
    source = home / "demo" / "sizes.py"
    source.write_text(MODULE)
    return source


def show(home: Path, file: Path, source: Path) -> list[str]:
    return show_script(
        SHOW.format(home=str(home), root=str(ROOT), file=str(file), source=str(source))
    )


def show_script(script: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-S", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_a_module_comes_from_the_bundle_without_importing_future(tmp_path: Path) -> None:
    source = demo_package(tmp_path)
    file = tmp_path / "demo.bundle"
    assert bundle.write(str(file), str(tmp_path), ("demo",), extensions=()) == 2
    # Served by the bundle's finder, __file__ the source; annotations stay strings (the future
    # import became a compiler flag), and __future__ itself was never imported.
    assert show(tmp_path, file, source) == ["True", "_Finder True", "3 Unknown False"]


def test_a_module_edited_since_is_imported_from_its_source(tmp_path: Path) -> None:
    source = demo_package(tmp_path)
    file = tmp_path / "demo.bundle"
    bundle.write(str(file), str(tmp_path), ("demo",), extensions=())
    source.write_text(MODULE.replace("return 3", "return 4"))
    found = os.stat(source)
    os.utime(source, ns=(found.st_atime_ns, found.st_mtime_ns + 1_000_000_000))
    assert show(tmp_path, file, source) == ["True", "SourceFileLoader True", "4 Unknown True"]


def test_a_file_of_another_python_or_a_broken_one_is_not_used(tmp_path: Path) -> None:
    source = demo_package(tmp_path)
    file = tmp_path / "demo.bundle"
    bundle.write(str(file), str(tmp_path), ("demo",), extensions=())
    data = file.read_bytes()
    for broken in (
        data.replace(sys.implementation.cache_tag.encode(), b"cpython-399", 1),  # another Python's
        data[: len(data) // 2],  # cut short
        b"",
    ):
        file.write_bytes(broken)
        assert show(tmp_path, file, source) == ["False", "SourceFileLoader True", "3 Unknown True"]
    file.unlink()
    assert show(tmp_path, file, source)[0] == "False"


def test_the_bundle_of_the_checkout_serves_every_module(tmp_path: Path) -> None:
    """What scripts/install writes: every module of sandbox and fallback, importable from it."""
    file = tmp_path / "aero-sandbox.bundle"
    count = bundle.write(str(file))
    script = f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
from sandbox.bundle import use
assert use({str(file)!r})
import select
# Found through the file's note of where it is: its directory was never listed.
print(os.path.dirname(select.__file__) in sys.path_importer_cache)
import sandbox.cli, sandbox.launch, sandbox.backends.cgroup, fallback.backend
loaders = [type(getattr(m, "__loader__", None)).__name__ for m in list(sys.modules.values())]
print(loaders.count("_Finder"))
"""
    proc = subprocess.run(
        [sys.executable, "-S", "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    listed, served = proc.stdout.split()
    assert 30 <= int(served) <= count and listed == "False", proc.stdout


def test_a_launcher_started_without_stdin_keeps_fd_0_closed(tmp_path: Path) -> None:
    """The file would be opened as fd 0: read whole and closed, so the launcher still finds
    stdin closed (and holds it with /dev/null, sandbox/cli.py)."""
    source = demo_package(tmp_path)
    file = tmp_path / "demo.bundle"
    bundle.write(str(file), str(tmp_path), ("demo",), extensions=())
    script = SHOW.format(home=str(tmp_path), root=str(ROOT), file=str(file), source=str(source))
    script += "import os\ntry:\n    os.fstat(0)\nexcept OSError:\n    print('closed')\n"
    proc = subprocess.run(
        [sys.executable, "-S", "-c", script],
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.close(0),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["True", "_Finder True", "3 Unknown False", "closed"]


def test_another_copy_first_on_the_path_is_used_whole(tmp_path: Path) -> None:
    """PYTHONPATH naming another checkout: its package was imported from there before the
    bundle, so the bundle (of the installed copy) is not used and no module of it mixes in."""
    installed, other = tmp_path / "installed", tmp_path / "other"
    installed.mkdir()
    other.mkdir()
    demo_package(installed)
    source = demo_package(other)
    file = tmp_path / "demo.bundle"
    bundle.write(str(file), str(installed), ("demo",), extensions=())
    script = SHOW.format(home=str(other), root=str(ROOT), file=str(file), source=str(source))
    script = script.replace("from sandbox.bundle", "import demo\nfrom sandbox.bundle")
    assert show_script(script) == ["False", "SourceFileLoader True", "3 Unknown True"]
