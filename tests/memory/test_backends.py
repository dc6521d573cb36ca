"""Memory backend objects: real and planned memory, alignment, busy tracking."""

from __future__ import annotations

from memslots.host.pages import host_page_size
from memslots.memory.backends import ANON_RAM_ALIGN, PlannedMemory, create_backend
from memslots.options import parse_backend
from memslots.sizes import GiB, TiB


def test_planned_memory_is_not_mapped_and_distinct() -> None:
    a = create_backend(parse_backend("memory-backend-ram,id=a,size=1T"), planned=True)
    b = create_backend(parse_backend("memory-backend-memfd,id=b,size=1T"), planned=True)
    assert isinstance(a.memory, PlannedMemory) and isinstance(b.memory, PlannedMemory)
    # fake host addresses never overlap and stay in the user address range KVM checks
    lo, hi = sorted((a.memory.host_addr, b.memory.host_addr))
    assert lo + TiB <= hi < 1 << 47
    assert not a.memory.fd_backed and b.memory.fd_backed
    assert a.region.align == ANON_RAM_ALIGN and b.region.align == host_page_size()
    assert a.qom_path == "/objects/a" and a.used_by is None


def test_real_backend_maps_memory() -> None:
    be = create_backend(parse_backend("memory-backend-memfd,id=m,size=1G"))
    try:
        assert be.memory.fd_backed and be.size == GiB
        be.memory.write(4096, b"hello")
        assert be.memory.read(4096, 5) == b"hello"
    finally:
        be.close()
