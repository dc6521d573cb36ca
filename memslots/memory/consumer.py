"""Memslot consumers: listeners of the guest address space that spend a limited resource.

KVM and every vhost back-end turn each RAM section they are shown into one memslot (one vhost
region), and each has a limit. A consumer reports its maximum, how many it uses and how many are
free (``max - used``), and whether a section costs it one: facts only. Every rule about them is
the memslot budget's (:mod:`memslots.devices.budget`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from memslots.memory.address_space import Section


class MemslotConsumer(ABC):
    """A :class:`~memslots.memory.address_space.MemoryListener` that spends memslots."""

    name: str
    #: Memslots used by things outside our model (ROMs, BARs, other devices' memory).
    other_used: int = 0

    @property
    @abstractmethod
    def max_memslots(self) -> int:
        """How many memslots this consumer supports in total."""

    @property
    @abstractmethod
    def used_memslots(self) -> int:
        """How many memslots are in use now (including ones used by others outside us)."""

    @property
    def free_memslots(self) -> int:
        """``max - used``, never negative."""
        return max(0, self.max_memslots - self.used_memslots)

    @property
    def connected(self) -> bool:
        """False while the consumer is lost (a dead vhost-user back-end maps none of our memory)."""
        return True

    def accepts(self, section: Section) -> bool:
        """Whether ``section`` costs this consumer a memslot (vhost-user skips fd-less RAM)."""
        return True

    def begin(self) -> None:  # noqa: B027 - an optional hook, not an abstract method
        """A batch of changes starts (nothing to do by default)."""

    def commit(self) -> None:  # noqa: B027 - an optional hook, not an abstract method
        """A batch of changes ends (nothing to do by default)."""

    @abstractmethod
    def region_add(self, section: Section) -> None:
        """Map ``section``; raise without side effects if that is impossible."""

    @abstractmethod
    def region_del(self, section: Section) -> None:
        """Unmap ``section``."""
