"""What the systemd backend relies on in pystemd.dbuslib, checked against the installed pystemd.

lean_import.py bypasses pystemd/__init__.py (import_dbuslib: only dbuslib and dbusexc load),
and the backend builds StartTransientUnit's a(sv) argument in dbuslib's own (type code, value)
form (properties.encode_properties). Neither is pystemd's documented API: a release that changes
them breaks the backend, and without this test only the VM stage would notice. pyproject.toml
bounds the version; run this after raising the bound.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sandbox.backends.systemd.properties import SIGNATURES, encode_properties

try:
    from sandbox.backends.systemd.lean_import import import_dbuslib

    DBUSLIB, DBUSEXC = import_dbuslib()
except ImportError as err:  # pragma: no cover - where the systemd extra is not installed
    pytest.skip(f"pystemd is not installed ({err})", allow_module_level=True)

CLOSE = (-1, None)


def test_the_bus_methods_and_errors_we_call_exist() -> None:
    for method in (
        "open",
        "close",
        "call_method",
        "get_property",
        "get_unique_name",
        "match_signal",
        "process",
        "wait",
    ):
        assert callable(getattr(DBUSLIB.DBus, method)), method
    assert callable(DBUSLIB.apply_signature) and callable(DBUSLIB.path_encode)
    assert issubclass(DBUSEXC.DBusNoSuchUnitError, DBUSEXC.DBusBaseError)


def test_unit_paths_are_encoded_as_systemd_does() -> None:
    encoded = DBUSLIB.path_encode(b"/org/freedesktop/systemd1/unit", b"aero-sandbox-1-ab.scope")
    assert encoded == b"/org/freedesktop/systemd1/unit/aero_2dsandbox_2d1_2dab_2escope"


@pytest.mark.parametrize(
    ("signature", "values", "expected"),
    [
        (b"s", [b"x"], [(ord("s"), b"x")]),
        (b"t", [7], [(ord("t"), 7)]),
        (b"b", [True], [(ord("b"), True)]),
        (b"au", [[1, 2]], [(ord("a"), b"u"), (ord("u"), 1), (ord("u"), 2), CLOSE]),
        (b"ss", [b"a", b"b"], [(ord("s"), b"a"), (ord("s"), b"b")]),
        (b"ssi", [b"a", b"b", 9], [(ord("s"), b"a"), (ord("s"), b"b"), (ord("i"), 9)]),
        (
            b"asas",
            [[], [b"p"]],
            [(ord("a"), b"s"), CLOSE, (ord("a"), b"s"), (ord("s"), b"p"), CLOSE],
        ),
    ],
)
def test_apply_signature_builds_the_form_we_extend(
    signature: bytes, values: list[object], expected: list[tuple[int, object]]
) -> None:
    """encode_properties opens containers as (type code, contents signature) and closes them
    with (-1, None), the form apply_signature gives for the types bus.py passes it."""
    assert DBUSLIB.apply_signature(signature, values) == expected


def test_every_property_type_encodes_balanced() -> None:
    samples = {"s": "text", "b": True, "t": 5, "au": [1, 2]}
    for name, signature in SIGNATURES.items():
        args = encode_properties([(name, samples[signature])], DBUSLIB.apply_signature)
        opened = sum(1 for code, _ in args if code in (ord("a"), ord("r"), ord("v")))
        assert opened == sum(1 for code, _ in args if code == -1), name


def test_only_dbuslib_loads_not_the_object_api() -> None:
    """import_dbuslib skips pystemd/__init__.py, which loads lxml, and pystemd.utils and pprint,
    which load pathlib, inspect... (start-up time); later imports of those get the real ones."""
    code = (
        "import sys\n"
        "from sandbox.backends.systemd.lean_import import import_dbuslib\n"
        "dbuslib, errors = import_dbuslib()\n"
        "assert 'lxml.etree' not in sys.modules and 'pystemd.systemd1' not in sys.modules\n"
        "for name in ('pprint', 'pystemd.utils', 'pathlib', 'inspect', 'typing', 'uuid'):\n"
        "    assert name not in sys.modules, name\n"
        "assert dbuslib.apply_signature(b's', [b'x']) == [(ord('s'), b'x')]\n"
        "import pprint, pystemd.utils\n"
        "assert hasattr(pprint, 'PrettyPrinter') and hasattr(pystemd.utils, 'str2cmd')\n"
        "import pathlib\n"
        "assert [pystemd.utils.x2char_star(v) for v in ('a', b'b', pathlib.Path('/c'), 1)] == [\n"
        "    dbuslib.x2char_star(v) for v in ('a', b'b', pathlib.Path('/c'), 1)]\n"
        "assert 'TypeError' in dbuslib.pformat([TypeError])\n"
    )
    root = Path(__file__).resolve().parents[2]  # this checkout's sandbox/, not an installed one
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=root)
