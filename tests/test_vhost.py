"""vhost back-ends as memslot consumers (the model used by plan)."""

from __future__ import annotations

import pytest

from memslots.address_space import Section
from memslots.consumer import UINT_MAX
from memslots.errors import VhostError
from memslots.memdev import PlannedMemory
from memslots.options import parse_backend
from memslots.vhost import VhostModel, VhostSet


def section(kind: str, gpa: int = 0) -> Section:
    mem = PlannedMemory(parse_backend(f"memory-backend-{kind},id=x,size=1G"))
    return Section(gpa, mem.size, mem, 0, "x")


def test_kernel_counts_all_ram_user_only_fd_backed() -> None:
    kernel, user = VhostModel("k", 64), VhostModel("u", 32, kind="user")
    for consumer in (kernel, user):
        consumer.region_add(section("ram"))
        consumer.region_add(section("memfd", 1 << 30))
    assert kernel.used_memslots == 2 and user.used_memslots == 1


def test_limit_and_set() -> None:
    v = VhostModel("k", 1)
    v.region_add(section("ram"))
    with pytest.raises(VhostError, match="all 1 are in use"):
        v.region_add(section("ram", 1 << 30))
    s = VhostSet()
    assert (s.max_memslots(), s.free_memslots()) == (UINT_MAX, UINT_MAX)
    s.add(v)
    s.add(VhostModel("big", 509))
    assert (s.max_memslots(), s.free_memslots()) == (1, 0)
    with pytest.raises(VhostError, match="kind must be one of"):
        VhostModel("x", 8, kind="vdpa")
