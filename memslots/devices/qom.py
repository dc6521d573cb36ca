"""QOM objects as the monitor sees them: properties with a getter and maybe a setter.

Devices (and memory backends) describe their own properties here; the monitor only resolves
paths and calls ``get``/``set``. A setter that may change a realized device declares the QAPI
``type`` its value must have, which the monitor checks first (QEMU's input visitor).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from memslots.errors import PropertyError


@dataclass(frozen=True)
class QomProperty:
    """A QOM property: a getter and, when it may be set at all, a setter.

    ``type`` is the QAPI type (e.g. ``"size"``) the value is checked against before ``set``
    sees it; None leaves the value to the setter (a refusal that does not look at it).
    """

    get: Callable[[], object]
    set: Callable[[object], None] | None = None
    type: Literal["str", "int", "uint64", "size", "bool"] | None = None


@dataclass(frozen=True)
class QomObject:
    """An object at a QOM path: its type name and properties."""

    type_name: str
    props: dict[str, QomProperty]


def refuse_after_realize(
    prop: str, dev_id: str | None, type_name: str, *, link: bool = False
) -> Callable[[object], None]:
    """The setter of a qdev property of a realized device: QEMU's refusal, value unread."""

    def refuse(value: object) -> None:
        if link:
            # QEMU formats the id with %s; glibc prints a NULL id as "(null)".
            who = dev_id if dev_id is not None else "(null)"
            raise PropertyError(
                f"Attempt to set link property '{prop}' on device '{who}' "
                f"(type '{type_name}') after it was realized"
            )
        who = f"device '{dev_id}'" if dev_id is not None else "anonymous device"
        raise PropertyError(
            f"Attempt to set property '{prop}' on {who} (type '{type_name}') after it was realized"
        )

    return refuse


def refuse(message: str) -> Callable[[object], None]:
    """A setter that always refuses with ``message``."""

    def refuse_value(value: object) -> None:
        raise PropertyError(message)

    return refuse_value
