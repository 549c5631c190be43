"""The value-class base: one `__init__` from the annotated fields, immutable afterwards."""

from __future__ import annotations

import pytest

from sandbox.core.frozen import Frozen


class Point(Frozen):
    x: int
    y: int = 0
    label: str | None = None


class Named(Frozen, kw_only=True):
    first: int = 1
    second: str


def test_fields_become_slots_and_defaults() -> None:
    assert Point.__slots__ == ("x", "y", "label")
    point = Point(1, label="a")
    assert point.as_dict() == {"x": 1, "y": 0, "label": "a"}
    assert point == Point(x=1, y=0, label="a")
    assert hash(point) == hash(Point(1, 0, "a"))
    assert repr(point) == "Point(x=1, y=0, label='a')"
    assert not hasattr(point, "__dict__")  # slotted: no stray attributes


def test_keyword_only_class_takes_keywords() -> None:
    assert Named(second="b").as_dict() == {"first": 1, "second": "b"}


def test_immutable() -> None:
    point = Point(1)
    with pytest.raises(AttributeError, match="immutable"):
        point.x = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {}, "needs a value for x"),
        ((1,), {"z": 2}, "has no field z"),
        ((1, 2, "a", 4), {}, "takes 3 fields"),
        ((1,), {"x": 1}, "got x twice"),
    ],
)
def test_bad_construction(
    args: tuple[object, ...], kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        Point(*args, **kwargs)
