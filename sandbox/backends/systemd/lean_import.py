"""pystemd.dbuslib, the only part of pystemd the systemd backend uses, loaded lean: without
pystemd/__init__.py (its object API) and with stand-ins for the two modules dbuslib imports at
load, each a large share of the launcher's start-up on the systemd backend (see below).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def import_dbuslib() -> tuple[Any, Any]:
    """pystemd.dbuslib and pystemd.dbusexc, without running pystemd/__init__.py.

    That file loads pystemd's whole object API (lxml, typing, inspect...), of which we use
    nothing: 13 of the 34 ms the import takes on the development machine, and about 250 of
    360 ms under the VM stage's emulation. So unless pystemd is imported already, the package is
    entered as a bare module with its search path, and only the two submodules load.
    """
    import sys

    if "pystemd" not in sys.modules:
        # Its directory on sys.path, as the path finder would find it (pystemd's modules are C
        # extensions: never in a zip), without importlib.machinery (importlib, warnings: ~1 ms).
        found = (os.path.join(entry or os.curdir, "pystemd") for entry in sys.path)
        location = next((path for path in found if os.path.isdir(path)), None)
        if location is None:
            raise ImportError("No module named 'pystemd'")
        package = type(sys)("pystemd")
        package.__path__, package.__package__ = [location], "pystemd"
        package.__file__ = os.path.join(location, "__init__.py")
        sys.modules["pystemd"] = package
    try:
        import pystemd.dbusexc as errors

        dbuslib = sys.modules.get("pystemd.dbuslib") or _import_lean_dbuslib()
    except ImportError:
        if getattr(sys.modules.get("pystemd"), "__path__", None) is not None:
            sys.modules.pop("pystemd", None)  # a bare package that leads nowhere: forget it
        raise
    return dbuslib, errors


def _import_lean_dbuslib() -> Any:
    """pystemd.dbuslib with stand-ins for the two names it imports at load: pprint.pformat (for
    one error message; pprint loads dataclasses and inspect) and pystemd.utils.x2char_star
    (utils loads pathlib, uuid, shlex and typing). About half of what is left of the import
    (20 of 46 ms on the development machine). The stand-ins leave sys.modules once dbuslib has
    bound them, so a later import of either module gets the real one."""
    import sys

    stand_ins = {
        "pprint": _module("pprint", pformat=_pformat),
        "pystemd.utils": _module("pystemd.utils", x2char_star=_x2char_star),
    }
    added = [name for name in stand_ins if name not in sys.modules]
    for name in added:
        sys.modules[name] = stand_ins[name]
    try:
        import pystemd.dbuslib as dbuslib
    finally:
        for name in added:
            if sys.modules.get(name) is stand_ins[name]:
                del sys.modules[name]
    return dbuslib


def _module(name: str, **attributes: Any) -> Any:
    module = type(os)(name)
    module.__dict__.update(attributes)
    return module


def _pformat(value: Any) -> str:
    from pprint import pformat  # the real one: the stand-in is gone from sys.modules by now

    return pformat(value)


def _x2char_star(value: Any) -> Any:
    """pystemd.utils.x2char_star for what dbuslib gives it (names, paths, string arguments):
    text and paths as bytes, anything else as it is."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, os.PathLike):
        return os.fsencode(value)
    return value
