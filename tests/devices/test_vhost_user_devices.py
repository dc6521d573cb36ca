"""vhost-user devices: options, attaching in QEMU's order, QEMU's refusals, precise accounting,
and a virtio-blk READ into plugged virtio-mem memory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from backends import (
    FakeBackend,
    QemuStorageDaemon,
    memfd_mappings,
    sector_pattern,
    wait_until,
)
from conftest import requires_qsd
from machines import NEGOTIATION, add_virtio_mem, assert_maps, check_invariants, memfd_machine

from memslots.devices.vhost_user import VhostUserDevice
from memslots.errors import (
    ConfigError,
    InaccessibleMemoryError,
    NotEnoughMemslotsError,
    VhostError,
    VhostLimitError,
)
from memslots.guest.inorder import drive_to
from memslots.kvm.model import KvmModel
from memslots.machine.machine import Machine
from memslots.memory.address_space import GuestMemory
from memslots.options import (
    ChardevOptions,
    parse_backend,
    parse_device,
    parse_machine_config,
    parse_vhost_user_device,
)
from memslots.sizes import GiB, MiB
from memslots.vhost.user.consumer import ConnectionState
from memslots.vhost.user.wire import ProtocolFeature

# -- attaching ---------------------------------------------------------------------------------


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeBackend]:
    backend = FakeBackend(str(tmp_path / "fake.sock"))
    yield backend
    backend.close()


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[QemuStorageDaemon]:
    with QemuStorageDaemon(tmp_path) as backend:
        yield backend


def attach(m: Machine, text: str, path: str) -> VhostUserDevice:
    m.chardevs["c0"] = ChardevOptions("c0", path)
    return m.add_vhost_user_device(parse_vhost_user_device(text))


def test_attach_in_qemus_order(fake: FakeBackend) -> None:
    with memfd_machine() as m:
        with pytest.raises(ConfigError, match=r"^Property 'vhost-user-blk\.chardev' can't find"):
            m.add_vhost_user_device(parse_vhost_user_device("vhost-user-blk,chardev=c9"))
        blk = attach(m, "vhost-user-blk,id=blk0,chardev=c0", fake.path)
        # Nothing fd-backed is mapped yet: no table message, then the block config.
        assert fake.log == [*NEGOTIATION, "GET_CONFIG"]
        assert blk.capacity == 0 and blk.state is ConnectionState.CONNECTED
        fs = parse_vhost_user_device("vhost-user-fs,id=fs0,chardev=c0,tag=t")
        with pytest.raises(ConfigError) as info:
            m.add_vhost_user_device(fs)
        assert (
            str(info.value) == "Property 'vhost-user-fs.chardev' can't take value 'c0', it's in use"
        )
        m.chardevs["c1"] = ChardevOptions("c1", "/nonexistent")
        again = parse_vhost_user_device("vhost-user-fs,id=blk0,chardev=c1,tag=t")
        with pytest.raises(ConfigError, match=r"^Duplicate device ID 'blk0'$"):
            m.add_vhost_user_device(again)
        with pytest.raises(VhostError, match=r"^Failed to connect to '/nonexistent'"):
            m.add_vhost_user_device(parse_vhost_user_device("vhost-user-blk,chardev=c1"))
        assert [b.name for b in m.budget.vhost_backends] == ["blk0"]
        blk.detach()
        assert blk.consumer.state is ConnectionState.CLOSED and m.budget.vhost_backends == []
        fs_dev = m.add_vhost_user_device(fs)  # the chardev is free again
        with pytest.raises(VhostError, match="is not a block device"):
            fs_dev.blk_read(0, 0, 512, ring_gpa=0)
        fs_dev.detach()


def test_refused_when_used_and_reserved_exceed_8_regions(tmp_path: Path) -> None:
    # Without CONFIGURE_MEM_SLOTS the limit is 8. Eight memfd DIMMs use 8 regions and a
    # virtio-mem device of 1 GiB (one memslot: not an auto decision) reserves one more.
    fake = FakeBackend(
        str(tmp_path / "fake.sock"),
        protocol_features=(1 << ProtocolFeature.REPLY_ACK) | (1 << ProtocolFeature.CONFIG),
    )
    objects = [f"memory-backend-memfd,id=d{i},size=128M" for i in range(8)]
    devices = [f"pc-dimm,id=dimm{i},memdev=d{i}" for i in range(8)]
    config = parse_machine_config(
        "1G,slots=8,maxmem=3G",
        [*objects, "memory-backend-memfd,id=mem0,size=1G"],
        [*devices, "virtio-mem,id=vm0,memdev=mem0,dynamic-memslots=on"],
        accel="sim",
    )
    with Machine(config, vm=KvmModel()) as m:
        assert m.device_memory is not None and m.device_memory.reserved_memslots == 1
        with pytest.raises(VhostLimitError) as info:
            attach(m, "vhost-user-blk,id=blk0,chardev=c0", fake.path)
        assert str(info.value) == (
            "vhost backend memory slots limit (8) is less than current number of used (8) and "
            "reserved (1) memory slots for memory devices. (vhost back-end 'blk0', QEMU's "
            "accounting)"
        )
        assert m.budget.vhost_backends == []
        # It never saw a table: negotiation only (no MQ, no CONFIGURE_MEM_SLOTS offered).
        fake.wait_session_end()
        assert fake.log == NEGOTIATION[:5] and fake.table == []
    fake.close()


@requires_qsd
def test_qemu_refuses_32_regions_after_an_auto_decision(qsd: QemuStorageDaemon) -> None:
    with memfd_machine() as m:
        dev = add_virtio_mem(m, "dynamic-memslots=on")
        assert dev.nb_memslots == 8  # no vhost yet: 8 GiB gets 1 GiB memslots
        drive_to(dev, 2 * GiB)
        with pytest.raises(VhostLimitError) as info:
            attach(m, "vhost-user-blk-pci,id=blk0,chardev=c0", qsd.socket_path)
        assert str(info.value) == (
            "some memory device (like virtio-mem) decided how many memory slots to use based "
            "on the overall number of memory slots; this vhost backend would further restricts "
            "the overall number of memory slots: vhost back-end 'blk0' supports 32 memory "
            "slots, fewer than 509\nTry plugging this vhost backend before plugging such "
            "memory devices."
        )
        assert m.budget.vhost_backends == [] and memfd_mappings(qsd.pid) == []
        # Precise accounting charges it 2 mapped + 6 reserved regions: that fits.
        blk = attach(
            m, "vhost-user-blk-pci,id=blk0,chardev=c0,memslot-accounting=precise", qsd.socket_path
        )
        assert_maps(qsd.pid, m, blk.consumer)
        drive_to(dev, 8 * GiB)
        assert_maps(qsd.pid, m, blk.consumer)
        blk.detach()


@requires_qsd
def test_precise_accounting_beside_32_regions(qsd: QemuStorageDaemon) -> None:
    with memfd_machine() as m:
        blk = attach(m, "vhost-user-blk,id=blk0,chardev=c0", qsd.socket_path)
        assert add_virtio_mem(m, "dynamic-memslots=on").nb_memslots == 1  # QEMU: 32 < 509
        blk.detach()
    config = parse_machine_config(
        "1G,slots=2,maxmem=41G", ["memory-backend-memfd,id=mem0,size=40G,share=on"], [], accel="sim"
    )
    with Machine(config, vm=KvmModel()) as m:
        text = "vhost-user-blk,id=blk0,chardev=c0,memslot-accounting=precise"
        blk = attach(m, text, qsd.socket_path)
        consumer = blk.consumer
        assert m.budget.vhost_max_memslots() > 509 and consumer.free_memslots == 32
        dev = add_virtio_mem(m, "dynamic-memslots=on")
        # Bounded by the back-end's 32 free regions instead of falling back to one memslot.
        assert (dev.nb_memslots, dev.memslot_size) == (32, 1280 * MiB)
        for target in (40 * GiB, 3 * GiB, 40 * GiB):
            drive_to(dev, target)
            check_invariants(m, dev)
            assert_maps(qsd.pid, m, consumer)
        assert consumer.used_memslots == 32 == consumer.max_memslots
        m.add_backend(parse_backend("memory-backend-memfd,id=d0,size=128M"))
        with pytest.raises(NotEnoughMemslotsError, match=r"^a used vhost backend has not enough"):
            m.add_device(parse_device("pc-dimm,id=dimm0,memdev=d0"))
        drive_to(dev, 0)
        # Unplugged, its 32 memslots are still reserved for the back-end.
        assert consumer.free_memslots == 32 and m.device_memory is not None
        assert m.device_memory.reserved_memslots == 32
        with pytest.raises(NotEnoughMemslotsError):
            m.add_device(parse_device("pc-dimm,id=dimm0,memdev=d0"))
        assert consumer.connected and len(memfd_mappings(qsd.pid)) == 0
        blk.detach()


@requires_qsd
def test_precise_charges_only_fd_backed_reservations(qsd: QemuStorageDaemon) -> None:
    text = "vhost-user-blk,id=blk0,chardev=c0,memslot-accounting=precise"
    with memfd_machine() as m:
        add_virtio_mem(m, "memslot-size=128M")  # 64 reserved memslots of a memfd
        with pytest.raises(VhostLimitError) as info:
            attach(m, text, qsd.socket_path)
        assert str(info.value) == (
            "vhost backend memory slots limit (32) is less than current number of used (0) and "
            "reserved (64) memory slots for memory devices. (vhost back-end 'blk0', precise "
            "accounting)"
        )
    config = parse_machine_config(
        "1G,maxmem=9G", ["memory-backend-ram,id=mem0,size=8G"], [], accel="sim"
    )
    with Machine(config, vm=KvmModel()) as m:
        dev = add_virtio_mem(m, "memslot-size=128M")  # the same, without an fd
        blk = attach(m, text, qsd.socket_path)
        consumer = blk.consumer
        # The back-end reports max - used; the memory-device layer subtracts all 64 reserved
        # memslots from what the budget tells it, so precise accounting gives them back there.
        assert consumer.used_memslots == 0 and consumer.free_memslots == 32
        assert m.budget.vhost_free_memslots() == 32 + 64
        drive_to(dev, 5 * GiB)
        check_invariants(m, dev)
        assert consumer.used_memslots == 0 and memfd_mappings(qsd.pid) == []
        blk.detach()


# -- virtio-blk ------------------------------------------------------------------------------------


@requires_qsd
def test_blk_read_lands_in_plugged_virtio_mem_memory(qsd: QemuStorageDaemon) -> None:
    with memfd_machine() as m:
        blk = attach(m, "vhost-user-blk-pci,id=blk0,chardev=c0", qsd.socket_path)
        assert blk.capacity == 2048  # the 1 MiB disk, in sectors
        dev = add_virtio_mem(m, "memslot-size=1G")
        drive_to(dev, 3 * GiB)
        guest = GuestMemory(m.address_space)
        ring, buf = dev.addr, dev.addr + 2 * GiB + 4096  # memslots 0 and 2
        assert blk.blk_read(8, buf, 16 * 512, ring_gpa=ring) == 16 * 512 + 1
        assert guest.read(buf, 16 * 512) == sector_pattern(8, 16)
        assert dev.memdev is not None
        assert dev.memdev.memory.read(2 * GiB + 4096, 16 * 512) == sector_pattern(8, 16)
        drive_to(dev, 2 * GiB)  # memslot 2 goes away
        with pytest.raises(VhostError, match="not in a memory region the vhost-user back-end"):
            blk.blk_read(8, buf, 512, ring_gpa=ring)
        with pytest.raises(VhostError, match="outside the 2048-sector disk"):
            blk.blk_read(2047, ring + 4096, 1024, ring_gpa=ring)
        assert blk.check() is ConnectionState.CONNECTED
        # Memslot 2 back with its first block only: the back-end maps all of it, but a READ
        # into its unplugged second block is refused before the back-end hears of it.
        drive_to(dev, 2 * GiB + dev.block_size)
        fd = dev.memdev.memory.fd
        assert fd is not None
        with pytest.raises(InaccessibleMemoryError):
            blk.blk_read(8, buf + dev.block_size, 512, ring_gpa=ring)
        assert os.pread(fd, 512, 2 * GiB + 4096 + dev.block_size) == bytes(512)
        assert blk.check() is ConnectionState.CONNECTED
        drive_to(dev, 3 * GiB)
        assert blk.blk_read(100, buf, 512, ring_gpa=ring) == 513
        assert guest.read(buf, 512) == sector_pattern(100, 1)
        qsd.kill()
        assert blk.check() is ConnectionState.DISCONNECTED
        with pytest.raises(VhostError, match="'blk0' is disconnected"):
            blk.blk_read(0, buf, 512, ring_gpa=ring)
        qsd.start()
        blk.reconnect()
        # A new connection needs the virtqueue set up again, which happens on use.
        assert blk.blk_read(2000, buf + 512, 1024, ring_gpa=ring) == 1025
        assert guest.read(buf + 512, 1024) == sector_pattern(2000, 2)
        blk.detach()
        assert wait_until(lambda: memfd_mappings(qsd.pid) == [])
