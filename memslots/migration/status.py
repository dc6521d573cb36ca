"""A migration's status, parameters and capabilities, with QEMU's names and defaults.

``MigrationStatus`` values are QAPI's ``MigrationStatus`` strings (the ``status`` of
``query-migrate`` and of the ``MIGRATION`` event). The parameters are the two QEMU 8.2 knobs
that decide when a live migration switches over and how fast it sends; the capabilities are
``events`` (QEMU's: the ``MIGRATION`` and ``MIGRATION_PASS`` events are sent only with it) and
``x-ignore-shared`` (shared memory is handed over, not copied).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

#: QEMU 8.2's default ``downtime-limit``, milliseconds.
DEFAULT_DOWNTIME_LIMIT_MS = 300
#: QEMU's largest ``downtime-limit`` (MAX_MIGRATE_DOWNTIME_SECONDS), milliseconds.
MAX_DOWNTIME_LIMIT_MS = 2000 * 1000
#: QEMU 8.2's default ``max-bandwidth`` (MAX_THROTTLE, 128 MiB/s), bytes per second.
DEFAULT_MAX_BANDWIDTH = 128 << 20


class MigrationStatus(enum.Enum):
    """QAPI's MigrationStatus (the ones this implementation goes through)."""

    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    COMPLETED = "completed"
    FAILED = "failed"

    @property
    def running(self) -> bool:
        """QEMU's migration_is_running(): a second migration is refused meanwhile."""
        return self in (
            MigrationStatus.SETUP,
            MigrationStatus.ACTIVE,
            MigrationStatus.CANCELLING,
        )


@dataclass
class MigrationParameters:
    """``migrate-set-parameters``: they may change while a migration runs."""

    #: Longest acceptable stop of the guest at switch-over, milliseconds.
    downtime_limit: int = DEFAULT_DOWNTIME_LIMIT_MS
    #: Most bytes per second the live phase sends (the switch-over is not limited).
    max_bandwidth: int = DEFAULT_MAX_BANDWIDTH


@dataclass
class MigrationCapabilities:
    """``migrate-set-capabilities``: fixed while a migration runs."""

    events: bool = False
    x_ignore_shared: bool = False

    #: QAPI names -> attribute names.
    NAMES: ClassVar[dict[str, str]] = {"events": "events", "x-ignore-shared": "x_ignore_shared"}
