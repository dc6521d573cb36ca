"""QEMU's RunState names (``query-status``), as the runtime, the monitor and migration use them."""

from __future__ import annotations

RUNNING = "running"
#: QMP ``stop``.
PAUSED = "paused"
#: ``-S``, or after a ``system_reset`` from ``internal-error``: the machine waits for ``cont``.
PRELAUNCH = "prelaunch"
#: ``-incoming``: waiting for (or loading) a migration stream.
INMIGRATE = "inmigrate"
#: A migration's switch-over, and after it on the source.
FINISH_MIGRATE = "finish-migrate"
POSTMIGRATE = "postmigrate"
#: A guest access to memory out of its reach stopped the VM; only a reset leaves it.
INTERNAL_ERROR = "internal-error"
SHUTDOWN = "shutdown"
#: The states after which only a reset lets the VM run (QEMU's ``runstate_needs_reset``).
NEEDS_RESET = (INTERNAL_ERROR, SHUTDOWN)
