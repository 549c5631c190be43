"""Immutable value objects.

`dataclasses` costs about 15 ms of import time (it pulls in `inspect`), more than the whole
launcher may add to a run, so value types are small slotted classes built on this base. Each
field is written once, as an annotation with an optional default:

    class Limits(Frozen):
        memory_bytes: int | None
        timeout_s: float | None = None

The metaclass turns the annotated names into `__slots__` (the defaults move to `_defaults`: a
slot and a class attribute of one name cannot coexist) and Frozen's one `__init__` takes them
in that order, by position or keyword; `class X(Frozen, kw_only=True)` for keywords only, which
mypy enforces. Fields are set once and can never change afterwards.

Type checkers learn that signature through `dataclass_transform` (PEP 681), which they read
from `typing`; at run time a do-nothing stand-in takes its place, so `typing` (~9 ms) is never
imported. A class that needs more than a plain assignment defines its own `__init__` and calls
`self._init(...)`. Annotations must stay strings (`from __future__ import annotations`).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs ~9 ms to import; mypy treats this name as True
if TYPE_CHECKING:
    from typing import Any, ClassVar, dataclass_transform
else:

    def dataclass_transform(**_options):
        return lambda cls: cls


@dataclass_transform(frozen_default=True)
class _FrozenFields(type):
    def __new__(
        mcs, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **options: Any
    ) -> _FrozenFields:
        if "__slots__" not in namespace:
            annotations: dict[str, object] = namespace.get("__annotations__", {})
            names = tuple(n for n, kind in annotations.items() if "ClassVar" not in str(kind))
            namespace["_defaults"] = {n: namespace.pop(n) for n in names if n in namespace}
            namespace["__slots__"] = names
        return super().__new__(mcs, name, bases, namespace)


class Frozen(metaclass=_FrozenFields):
    __slots__ = ()
    _defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, *args: Any, **values: Any) -> None:
        if args:
            values = self._with_positional(args, values)
        names: tuple[str, ...] = self.__slots__
        defaults = self._defaults
        set_field = object.__setattr__
        used = 0
        for name in names:
            if name in values:
                set_field(self, name, values[name])
                used += 1
            elif name in defaults:
                set_field(self, name, defaults[name])
            else:
                raise TypeError(f"{type(self).__name__} needs a value for {name}")
        if used < len(values):
            unknown = ", ".join(sorted(values.keys() - set(names)))
            raise TypeError(f"{type(self).__name__} has no field {unknown}")

    def _with_positional(self, args: tuple[Any, ...], values: dict[str, Any]) -> dict[str, Any]:
        names: tuple[str, ...] = self.__slots__
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes {len(names)} fields, not {len(args)}")
        given = dict(zip(names, args, strict=False))
        twice = given.keys() & values.keys()
        if twice:
            raise TypeError(f"{type(self).__name__} got {', '.join(sorted(twice))} twice")
        return {**values, **given}

    def _init(self, **values: Any) -> None:
        """For a class with its own `__init__`: set every field from keywords."""
        Frozen.__init__(self, **values)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash(tuple(self.as_dict().items()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items())
        return f"{type(self).__name__}({fields})"

    def as_dict(self) -> dict[str, Any]:
        names: tuple[str, ...] = self.__slots__
        return {name: getattr(self, name) for name in names}
