"""Memory backend objects: real and planned memory, alignment, busy tracking."""

from __future__ import annotations

from conftest import AMD_HOST, HOST, PlanFactory

from memslots.host.pages import host_page_size
from memslots.memory.backends import (
    ANON_RAM_ALIGN,
    PlannedAddresses,
    PlannedMemory,
    create_backend,
)
from memslots.options import parse_backend
from memslots.sizes import GiB, TiB


def test_planned_memory_is_not_mapped_and_distinct() -> None:
    addresses = PlannedAddresses()
    a = create_backend(
        parse_backend("memory-backend-ram,id=a,size=1T"),
        pages=AMD_HOST.pages,
        planned=True,
        addresses=addresses,
    )
    b = create_backend(
        parse_backend("memory-backend-memfd,id=b,size=1T"),
        pages=AMD_HOST.pages,
        planned=True,
        addresses=addresses,
    )
    assert isinstance(a.memory, PlannedMemory) and isinstance(b.memory, PlannedMemory)
    # fake host addresses never overlap and stay in the user address range KVM checks
    lo, hi = sorted((a.memory.host_addr, b.memory.host_addr))
    assert lo + TiB <= hi < 1 << 47
    assert not a.memory.fd_backed and b.memory.fd_backed
    assert a.region.align == ANON_RAM_ALIGN and b.region.align == host_page_size()
    assert a.qom_path == "/objects/a" and a.used_by is None


def test_fake_addresses_are_per_machine(plan_machine: PlanFactory) -> None:
    """Planning again and again in one process never runs out of fake host addresses: each
    machine hands out its own (they used to leak, and planning failed after ~128 TiB)."""
    first = None
    for _ in range(300):  # 300 TiB of planned memory in all
        m = plan_machine(
            "4G,maxmem=1028G",
            ["memory-backend-ram,id=mem0,size=1T"],
            ["virtio-mem,id=vm0,memdev=mem0,dynamic-memslots=on"],
        )
        addr = m.backends["mem0"].memory.host_addr
        assert first is None or addr == first
        first = addr
        m.close()


def test_real_backend_maps_memory() -> None:
    be = create_backend(parse_backend("memory-backend-memfd,id=m,size=1G"), pages=HOST.pages)
    try:
        assert be.memory.fd_backed and be.size == GiB
        be.memory.write(4096, b"hello")
        assert be.memory.read(4096, 5) == b"hello"
    finally:
        be.close()
