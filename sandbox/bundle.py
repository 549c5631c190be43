"""The launcher's compiled modules in one file, read once at start-up.

Finding and loading a module through Python's path finder costs more than running its code:
the directory listing's check, a spec, the .pyc's open, stat, read and validation, each in
importlib's Python; the first module found in a directory lists it (the standard library's
~200 entries for `select`). A run imports ~30 modules of ours and a few compiled ones of the
standard library. `scripts/install` writes every module of `sandbox` and `fallback`, compiled,
into one file beside the entry, with where each compiled (extension) module of EXTENSIONS is
(`write`); the entry reads its index and puts a finder first on sys.meta_path (`use`).
It serves a module only while its file has the size and modification time it had then, as
Python's own .pyc check does: a module edited since, added since, or not in the file is
imported the usual way; an unreadable file, or one from another Python, is not used at all.
Measured with bench/launch.py: ~1.5 ms of ~21 (README, "Speed").

    python -m sandbox.bundle FILE       write FILE (scripts/install: BIN/aero-sandbox.bundle)
"""

# No `from __future__ import annotations` here: the entry imports this module the usual way,
# and the bundle's modules do without importing __future__ (see _compiled()).
import marshal
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from importlib.machinery import ModuleSpec
    from types import CodeType, ModuleType

# The marshal format of code objects changes between Python versions: a file says which wrote it.
_HEADER = f"aero-sandbox bundle 2 {sys.implementation.cache_tag} {sys.hexversion}\n".encode()
PACKAGES = ("sandbox", "fallback")
# The compiled modules a run may import (spawn and the supervisor; the rlimit backend; ctypes
# where sandbox/core/syscalls.c was not built), found without listing their directories.
EXTENSIONS = ("select", "sandbox.core._syscalls", "resource", "mmap", "_ctypes")
_EXTENSION = -1  # an index entry's offset for a compiled module: no code in the file

# name -> (is a package, file, its st_mtime_ns, its st_size, offset of the code, its length)
_Index = dict[str, tuple[bool, str, int, int, int, int]]


def write(
    path: str,
    home: str | None = None,
    packages: tuple[str, ...] = PACKAGES,
    extensions: tuple[str, ...] = EXTENSIONS,
) -> int:
    """Compile every module of `packages` (in `home`, by default where this one is) into `path`,
    and note where each of `extensions` is; return the number of modules."""
    home = home or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    index: _Index = {}
    blobs: list[bytes] = []
    offset = 0
    for package in packages:
        for directory, subdirs, files in os.walk(os.path.join(home, package)):
            subdirs[:] = sorted(d for d in subdirs if d != "__pycache__")
            for name in sorted(f for f in files if f.endswith(".py")):
                source = os.path.join(directory, name)
                dotted = os.path.relpath(source, home)[: -len(".py")].replace(os.sep, ".")
                is_package = name == "__init__.py"
                if is_package:
                    dotted = dotted[: -len(".__init__")]
                with open(source, "rb") as f:
                    code = marshal.dumps(_compiled(f.read(), source))
                found = os.stat(source)
                stamp = (found.st_mtime_ns, found.st_size)
                index[dotted] = (is_package, source, *stamp, offset, len(code))
                blobs.append(code)
                offset += len(code)
    for name in extensions:
        where = _extension(name)
        if where is not None:
            found = os.stat(where)
            index[name] = (False, where, found.st_mtime_ns, found.st_size, _EXTENSION, 0)
    head = marshal.dumps(index)
    sizes = len(head).to_bytes(4, "little") + offset.to_bytes(4, "little")
    temporary = f"{path}.{os.getpid()}"
    with open(temporary, "wb") as out:
        out.write(_HEADER + sizes + head + b"".join(blobs))
    os.replace(temporary, path)
    return len(index)


def _compiled(source: bytes, path: str) -> "CodeType":
    """The module's code, its `from __future__ import ...` turned into compiler flags: the
    statement is also an import at run time, of a module in the standard library's directory
    (which its finder lists: ~0.3 ms)."""
    import __future__

    import ast

    tree = ast.parse(source, path)
    flags = 0
    for node in list(tree.body):
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            flags |= sum(getattr(__future__, alias.name).compiler_flag for alias in node.names)
            tree.body.remove(node)
    code: CodeType = compile(tree, path, "exec", flags=flags, dont_inherit=True)
    return code


def _extension(name: str) -> str | None:
    """The file of the compiled module `name`, where it exists here; None otherwise."""
    import importlib.machinery
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except ImportError:  # its package is missing
        return None
    if spec is None or not isinstance(spec.loader, importlib.machinery.ExtensionFileLoader):
        return None  # not here, or built into the interpreter
    return spec.origin


def use(path: str) -> bool:
    """Serve our modules from the file `path` from now on; False (nothing changed) without one.

    The file stays open (close-on-exec) and each module's code is read when it is imported:
    reading the whole file (~700 KB, most of it modules a run never imports) cost ~0.3 ms more.
    A file replaced meanwhile (scripts/install again) is still read whole through this fd."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        start = len(_HEADER) + 8
        head = os.pread(fd, 65536, 0)  # the header and an index of ~80 modules (~7 KB)
        if not head.startswith(_HEADER) or len(head) < start:
            raise ValueError("not a bundle of this Python")
        length = int.from_bytes(head[start - 8 : start - 4], "little")
        code = int.from_bytes(head[start - 4 : start], "little")
        if os.fstat(fd).st_size != start + length + code:  # cut short (a full disk)
            raise ValueError("cut short")
        if len(head) < start + length:
            head = os.pread(fd, start + length, 0)
        index = marshal.loads(memoryview(head)[start : start + length])
        if not _same_packages(index):
            raise ValueError("another copy of the packages comes first on sys.path")
        if fd < 3:  # a standard fd the launcher was started without: not ours to keep
            finder = _Finder(index, os.pread(fd, code, start + length), -1)
            os.close(fd)
        else:
            finder = _Finder(index, None, fd, start + length)
    except (OSError, ValueError, EOFError, TypeError):
        os.close(fd)
        return False
    sys.meta_path.insert(0, finder)
    return True


def _same_packages(index: _Index) -> bool:
    """Whether each package of the file that is imported already (`sandbox`, whose module this
    is) was imported from where the file's copy is: with PYTHONPATH naming another checkout, its
    code comes first, as it would without the file, and no module of the file is mixed in."""
    for name, (is_package, where, *_) in index.items():
        module = sys.modules.get(name) if is_package and "." not in name else None
        if module is not None and os.path.dirname(where) not in getattr(module, "__path__", ()):
            return False
    return True


class _Finder:
    """A meta path finder over one bundle file's index, and the loader of its code: read from
    `fd` at `base` + the module's offset, or sliced from `code` where the file is read whole."""

    def __init__(self, index: _Index, code: bytes | None, fd: int, base: int = 0):
        self._index = index
        self._code = code
        self._fd = fd
        self._base = base

    def find_spec(
        self, name: str, path: "Sequence[str] | None" = None, target: "ModuleType | None" = None
    ) -> "ModuleSpec | None":
        entry = self._index.get(name)
        if entry is None:
            return None
        is_package, where, mtime_ns, size, offset, _ = entry
        try:
            found = os.stat(where)
        except OSError:
            return None
        if found.st_mtime_ns != mtime_ns or found.st_size != size:
            return None  # changed since `write`: Python's own finder takes it
        # The classes of the running import system: importlib.machinery's own, without
        # importing it (~0.9 ms: importlib's package imports warnings).
        loader = self
        if offset == _EXTENSION:
            loader = sys.modules["_frozen_importlib_external"].ExtensionFileLoader(name, where)
        spec: ModuleSpec = type(sys.__spec__)(
            name,
            loader,  # type: ignore[arg-type]  # a Loader by its methods; importlib.abc costs
            origin=where,
            is_package=is_package,
        )
        spec.has_location = True  # __file__ is the file, as for a module found on the path
        if is_package:
            spec.submodule_search_locations = [os.path.dirname(where)]
        return spec

    def create_module(self, spec: "ModuleSpec") -> None:
        return None  # the usual module object

    def exec_module(self, module: "ModuleType") -> None:
        _, _, _, _, offset, length = self._index[module.__name__]
        if self._code is not None:
            data = self._code[offset : offset + length]
        else:
            data = os.pread(self._fd, length, self._base + offset)
        exec(marshal.loads(data), module.__dict__)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m sandbox.bundle FILE")
    print(f"bundle: {write(sys.argv[1])} modules in {sys.argv[1]}")
