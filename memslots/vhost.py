"""vhost back-ends as memslot consumers, and the set of them that the machine consults.

QEMU's rules (``hw/virtio/vhost.c``): vhost-kernel counts every RAM section; vhost-user counts
only sections whose memory has a file descriptor (anonymous RAM is invisible to it). The machine
asks the :class:`VhostSet` for the minimum limit and the minimum free count over all back-ends,
or ``UINT_MAX`` for both when there is none.
"""

from __future__ import annotations

from memslots.address_space import Section
from memslots.consumer import UINT_MAX, MemslotConsumer
from memslots.errors import VhostError

VHOST_KINDS = ("kernel", "user")


class VhostModel(MemslotConsumer):
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


class VhostSet:
    """All vhost back-ends of a machine; answers QEMU's ``vhost_get_{max,free}_memslots``."""

    def __init__(self) -> None:
        self.backends: list[MemslotConsumer] = []

    def add(self, backend: MemslotConsumer) -> None:
        """Register a back-end (the caller also registers it with the address space)."""
        self.backends.append(backend)

    def remove(self, backend: MemslotConsumer) -> None:
        """Forget a back-end."""
        self.backends.remove(backend)

    def max_memslots(self) -> int:
        """Minimum limit over all back-ends, or UINT_MAX when there is none."""
        return min((b.max_memslots for b in self.backends), default=UINT_MAX)

    def free_memslots(self) -> int:
        """Minimum free count over all back-ends, or UINT_MAX when there is none."""
        return min((b.free_memslots for b in self.backends), default=UINT_MAX)
