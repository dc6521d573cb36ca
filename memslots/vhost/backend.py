"""vhost back-ends as memslot consumers: what every back-end reports, and a model of one.

QEMU's rules (``hw/virtio/vhost.c``): vhost-kernel counts every RAM section; vhost-user counts only
sections whose memory has a file descriptor (anonymous RAM is invisible to it). A back-end only
reports facts (max, used, free, which sections it takes); how it is charged for memory devices'
reservations, and when it is refused, is the budget's (:mod:`memslots.devices.budget`).
vhost-kernel is in :mod:`memslots.vhost.kernel`, vhost-user in :mod:`memslots.vhost.user`.
"""

from __future__ import annotations

from memslots.errors import VhostError
from memslots.memory.address_space import Section
from memslots.memory.consumer import MemslotConsumer

VHOST_KINDS = ("kernel", "user")


class VhostBackend(MemslotConsumer):
    """A vhost back-end as the memslot budget sees it: a consumer that can be started, stopped
    and closed, and that may lose its connection."""

    kind: str

    def start(self) -> None:
        """The back-end was accepted: from now on it gets (and is limited to) its memory table."""

    def stop(self) -> None:
        """The back-end is going away: stop sending it changes."""

    def close(self) -> None:
        """Release the back-end (device fd, connection)."""


class VhostModel(VhostBackend):
    """A vhost back-end known only by its kind and limit (used by ``memslots plan``).

    ``other_used`` counts regions the back-end already holds for memory outside our machine
    model, so that "free when the first memory device is plugged" can be described exactly.
    """

    def __init__(self, name: str, limit: int, *, kind: str = "kernel", other_used: int = 0) -> None:
        if kind not in VHOST_KINDS:
            raise VhostError(f"vhost back-end '{name}': kind must be one of {VHOST_KINDS}")
        self.name = name
        self.kind = kind
        self.limit = limit
        self.other_used = other_used
        self._regions: set[Section] = set()

    @property
    def max_memslots(self) -> int:
        return self.limit

    @property
    def used_memslots(self) -> int:
        return len(self._regions) + self.other_used

    def accepts(self, section: Section) -> bool:
        # vhost-user back-ends can only map memory they get a file descriptor for.
        return self.kind == "kernel" or section.backend.fd_backed

    def region_add(self, section: Section) -> None:
        if not self.accepts(section):
            return
        if self.used_memslots >= self.limit:
            raise VhostError(
                f"vhost back-end '{self.name}': no free memory region for '{section.name}': "
                f"all {self.limit} are in use"
            )
        self._regions.add(section)

    def region_del(self, section: Section) -> None:
        self._regions.discard(section)
