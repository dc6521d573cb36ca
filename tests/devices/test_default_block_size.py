"""virtio-mem's default block size (QEMU's virtio_mem_default_block_size) on real backends, for
the THP size of the host it is given (detected once, or described for planning)."""

from __future__ import annotations

from pathlib import Path

from conftest import AMD_HOST, PlanFactory

from memslots.devices.virtio_mem.device import default_block_size
from memslots.host.memory import FileBackend, MemfdBackend, RamBackend
from memslots.host.pages import HostPages, host_page_size
from memslots.sizes import GiB, KiB, MiB

SIZE = 8 * MiB
PAGE = host_page_size()


def test_default_block_size_for_base_page_backends_is_thp(tmp_path: Path) -> None:
    with RamBackend("r", SIZE) as ram, MemfdBackend("m", SIZE) as memfd:
        for thp in (2 * MiB, 4 * MiB):
            pages = HostPages(PAGE, thp, 2 * MiB)
            assert default_block_size(ram, pages) == thp
            assert default_block_size(memfd, pages) == thp
    with FileBackend("f", SIZE, tmp_path) as file:
        assert default_block_size(file, HostPages(PAGE, 2 * MiB, 2 * MiB)) == 2 * MiB
    # A host without THP (QEMU 9.2: 1 MiB) still gets at least a page.
    with RamBackend("r", SIZE) as ram:
        assert default_block_size(ram, HostPages(PAGE, MiB, 2 * MiB)) == MiB


def test_default_block_size_for_other_page_sizes() -> None:
    # Huge pages smaller than 1 MiB (64 KiB on arm64) are raised to virtio-mem's 1 MiB minimum.
    pages = HostPages(PAGE, 2 * MiB, 2 * MiB)
    with RamBackend("r", SIZE) as mem:
        mem.page_size = 64 * KiB
        assert default_block_size(mem, pages) == MiB
        mem.page_size = 32 * MiB
        assert default_block_size(mem, pages) == 32 * MiB


def test_planning_for_a_host_with_another_thp_size(plan_machine: PlanFactory) -> None:
    """The host is an input: its THP size decides the default block size and the alignment
    of planned devices, and planned hugetlb memfds take its default huge page size."""
    objects = [
        "memory-backend-ram,id=mem0,size=4G",
        "memory-backend-memfd,id=mem1,size=4G,hugetlb=on",
    ]
    devices = [
        "virtio-mem,id=vm0,memdev=mem0",
        "virtio-mem,id=vm1,memdev=mem1",
    ]
    for thp, huge in ((2 * MiB, 2 * MiB), (32 * MiB, 512 * MiB), (MiB, GiB)):
        host = AMD_HOST.override(thp_size=thp, huge_page_size=huge)
        m = plan_machine("4G,maxmem=12G", objects, devices, host=host)
        vm0, vm1 = m.virtio_mem("vm0"), m.virtio_mem("vm1")
        assert vm0.block_size == thp
        assert m.backends["mem1"].memory.page_size == huge
        assert vm1.block_size == max(huge, MiB)
        assert vm1.addr % huge == 0
