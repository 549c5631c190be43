"""Immutable value objects.

`dataclasses` costs about 15 ms of import time (it pulls in `inspect`), more than the whole
launcher may add to a run, so value types are small slotted classes built on this base:
fields are set once in `__init__` and can never change afterwards.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing costs ~9 ms to import; mypy treats this name as True
if TYPE_CHECKING:
    from typing import Any


class Frozen:
    __slots__: tuple[str, ...] = ()

    def _init(self, **values: Any) -> None:
        for name in self.__slots__:
            object.__setattr__(self, name, values[name])

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
        return {name: getattr(self, name) for name in self.__slots__}
