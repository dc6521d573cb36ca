"""The virtio-mem device: spec rules, QEMU's answers, memslot mapping, and invariants."""

from __future__ import annotations

import logging
import struct

import pytest
from conftest import PlanFactory, requires_kvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from machines import check_invariants

from memslots.devices.virtio_mem.device import VirtioMem
from memslots.devices.virtio_mem.wire import (
    CONFIG_SIZE,
    BlockState,
    Config,
    ReqType,
    Request,
    Resp,
    Response,
)
from memslots.errors import ConfigError, DeviceError, HostMemoryError, PropertyError
from memslots.guest.inorder import drive_to
from memslots.host.memory import HostMemory
from memslots.kvm.vm import KvmVm
from memslots.machine.machine import Machine
from memslots.options import parse_machine_config
from memslots.sizes import GiB, MiB

BS = 2 * MiB


def req(dev: VirtioMem, kind: ReqType, offset: int = 0, nb: int = 0) -> Response:
    """Send a request by its wire bytes, at ``offset`` bytes from the device start."""
    return Response.unpack(dev.handle_request(Request(kind, dev.addr + offset, nb).pack()))


def small_device(
    plan_machine: PlanFactory, extra: str = "", size: str = "8G", maxmem: str = "1028G"
) -> tuple[Machine, VirtioMem]:
    m = plan_machine(
        f"4G,maxmem={maxmem}",
        [f"memory-backend-ram,id=mem0,size={size},reserve=off"],
        [f"virtio-mem,id=vmem0,memdev=mem0{extra}"],
    )
    return m, m.virtio_mem("vmem0")


def test_wire_layouts() -> None:
    raw = Request(ReqType.PLUG, 0x1234_5678_9000, 7).pack()
    assert len(raw) == 24
    assert struct.unpack_from("<H", raw, 0) == (0,) and raw[2:8] == bytes(6)
    assert struct.unpack_from("<Q", raw, 8) == (0x1234_5678_9000,)
    assert struct.unpack_from("<H", raw, 16) == (7,) and raw[18:] == bytes(6)
    resp = Response(Resp.ACK, BlockState.MIXED).pack()
    assert resp == struct.pack("<H6xH", 0, 2) and len(resp) == 10
    cfg = Config(BS, 0, 0x100_0000_0000, 8 * GiB, 2 * GiB, GiB, GiB).pack()
    assert len(cfg) == CONFIG_SIZE
    assert struct.unpack_from("<Q", cfg, 16) == (0x100_0000_0000,)
    assert struct.unpack_from("<Q", cfg, 40) == (GiB,)


def test_padding_is_ignored(plan_machine: PlanFactory) -> None:
    _, dev = small_device(plan_machine)
    dev.set_requested_size(BS)
    raw = bytearray(Request(ReqType.PLUG, dev.addr, 1).pack())
    raw[2:8] = b"\xff" * 6
    raw[18:24] = b"\xee" * 6
    assert Response.unpack(dev.handle_request(bytes(raw))).type == Resp.ACK


def test_plug_rules(plan_machine: PlanFactory) -> None:
    _, dev = small_device(plan_machine)
    assert dev.usable_region_size == 0
    assert req(dev, ReqType.PLUG, 0, 1).type == Resp.ERROR  # outside the (empty) usable region
    dev.set_requested_size(64 * MiB)
    assert dev.usable_region_size == 64 * MiB + 256 * MiB
    assert req(dev, ReqType.PLUG, 1 * MiB, 1).type == Resp.ERROR  # misaligned
    assert req(dev, ReqType.PLUG, 0, 0).type == Resp.ERROR  # zero blocks
    assert req(dev, ReqType.PLUG, 320 * MiB, 1).type == Resp.ERROR  # past the usable region
    assert req(dev, ReqType.PLUG, 0, 33).type == Resp.NACK  # more than requested
    assert req(dev, ReqType.PLUG, 0, 32).type == Resp.ACK
    assert dev.size == 64 * MiB
    assert req(dev, ReqType.PLUG, 0, 1).type == Resp.NACK  # NACK comes before the state check
    dev.set_requested_size(128 * MiB)
    assert req(dev, ReqType.PLUG, 62 * MiB, 2).type == Resp.ERROR  # one already plugged
    assert req(dev, ReqType.UNPLUG, 62 * MiB, 2).type == Resp.ERROR  # one not plugged
    assert req(dev, ReqType.UNPLUG, 0, 32).type == Resp.ACK  # never NACKed, even below requested
    assert dev.size == 0
    assert dict(dev.requests)[("plug", "ack")] == 1


def test_state_requests(plan_machine: PlanFactory) -> None:
    _, dev = small_device(plan_machine)
    dev.set_requested_size(8 * MiB)
    assert req(dev, ReqType.PLUG, 2 * MiB, 2).type == Resp.ACK
    assert req(dev, ReqType.STATE, 0, 1) == Response(Resp.ACK, BlockState.UNPLUGGED)
    assert req(dev, ReqType.STATE, 2 * MiB, 2) == Response(Resp.ACK, BlockState.PLUGGED)
    assert req(dev, ReqType.STATE, 0, 4) == Response(Resp.ACK, BlockState.MIXED)
    assert req(dev, ReqType.STATE, 0, 0).type == Resp.ERROR
    assert req(dev, ReqType.STATE, dev.usable_region_size, 1).type == Resp.ERROR


def test_busy_and_unplug_all(plan_machine: PlanFactory) -> None:
    _, dev = small_device(plan_machine, ",dynamic-memslots=on")
    dev.set_requested_size(2 * GiB)
    assert req(dev, ReqType.PLUG, 0, 512).type == Resp.ACK
    dev.busy = True
    assert req(dev, ReqType.PLUG, GiB, 1).type == Resp.BUSY
    assert req(dev, ReqType.UNPLUG, 0, 1).type == Resp.BUSY
    assert req(dev, ReqType.UNPLUG_ALL).type == Resp.BUSY
    assert dev.size == GiB and dev.mapped_memslots == 1
    dev.busy = False
    dev.set_requested_size(0)
    assert dev.usable_region_size == 2 * GiB + 256 * MiB  # never shrinks on its own
    assert req(dev, ReqType.UNPLUG_ALL).type == Resp.ACK
    assert (dev.size, dev.usable_region_size, dev.mapped_memslots) == (0, 0, 0)
    assert dev.nb_plugged_blocks == 0


def test_protocol_violation_needs_reset_and_keeps_state(plan_machine: PlanFactory) -> None:
    _, dev = small_device(plan_machine, ",dynamic-memslots=on")
    drive_to(dev, GiB)
    before = (dev.size, bytes(dev.bitmap), dev.mapped_memslots)
    with pytest.raises(DeviceError, match="invalid request size: 23"):
        dev.handle_request(Request(ReqType.PLUG, dev.addr, 1).pack()[:23])
    assert dev.needs_reset
    with pytest.raises(DeviceError, match="needs a reset"):
        dev.handle_request(Request(ReqType.STATE, dev.addr, 1).pack())
    dev.device_reset()
    with pytest.raises(DeviceError, match="unknown request type: 9"):
        dev.handle_request(Request(9, dev.addr, 1).pack())
    assert (dev.size, bytes(dev.bitmap), dev.mapped_memslots) == before
    dev.device_reset()  # a device reset leaves plugged blocks alone
    assert (dev.size, dev.mapped_memslots) == (GiB, 1)
    dev.system_reset()  # a system reset unplugs everything
    assert (dev.size, dev.mapped_memslots) == (0, 0)


def test_dynamic_memslots_map_and_unmap(plan_machine: PlanFactory) -> None:
    m, dev = small_device(plan_machine, ",dynamic-memslots=on", size="16G")
    assert (dev.nb_memslots, dev.memslot_size) == (4, 4 * GiB)  # 256 * 16/1024
    kvm_before = m.kvm.used_memslots
    dev.set_requested_size(16 * GiB)
    # A plug spanning the boundary of memslots 0 and 1 maps both, nothing else.
    assert req(dev, ReqType.PLUG, 4 * GiB - 2 * BS, 4).type == Resp.ACK
    assert [s.mapped for s in dev.memslot_map()] == [True, True, False, False]
    assert m.kvm.used_memslots == kvm_before + 2
    gpas = sorted(s.gpa for s in m.address_space.sections if s.gpa >= dev.addr)
    assert gpas == [dev.addr, dev.addr + 4 * GiB]
    # Unplugging part of memslot 0's blocks keeps it mapped until its last block goes.
    assert req(dev, ReqType.UNPLUG, 4 * GiB - 2 * BS, 1).type == Resp.ACK
    assert dev.memslot_map()[0].mapped
    assert req(dev, ReqType.UNPLUG, 4 * GiB - BS, 1).type == Resp.ACK
    assert [s.mapped for s in dev.memslot_map()] == [False, True, False, False]
    assert m.kvm.used_memslots == kvm_before + 1


def test_dynamic_off_maps_whole_region_at_plug(plan_machine: PlanFactory) -> None:
    m, dev = small_device(plan_machine, size="16G")
    assert dev.get_memslots() == 1 and dev.mapped_memslots == 1
    sec = [s for s in m.address_space.sections if s.gpa == dev.addr]
    assert len(sec) == 1 and sec[0].size == 16 * GiB
    drive_to(dev, GiB)
    drive_to(dev, 0)
    assert dev.mapped_memslots == 1


def test_fixed_memslot_size(plan_machine: PlanFactory) -> None:
    m, dev = small_device(plan_machine, ",memslot-size=128M", size="2G")
    assert (dev.nb_memslots, dev.memslot_size) == (16, 128 * MiB)
    assert m.device_memory is not None and m.device_memory.required_memslots == 16
    drive_to(dev, 300 * MiB)
    assert dev.mapped_memslots == 3
    with pytest.raises(ConfigError, match=r"'memslot-size' 0x100000 \(1 MiB\) has to be a"):
        small_device(plan_machine, ",memslot-size=1M", size="2G")


def test_dynamic_needs_unplugged_inaccessible(plan_machine: PlanFactory) -> None:
    with pytest.raises(
        ConfigError,
        match="'dynamic-memslots' property set to 'on' requires "
        "'unplugged-inaccessible' to be 'on'",
    ):
        small_device(plan_machine, ",dynamic-memslots=on,unplugged-inaccessible=off")
    # auto resolves to off for private anonymous memory, so dynamic memslots refuse it too
    with pytest.raises(ConfigError, match="requires 'unplugged-inaccessible'"):
        small_device(plan_machine, ",dynamic-memslots=on,unplugged-inaccessible=auto")


@pytest.mark.parametrize(
    "extra,size,match",
    [
        (
            ",requested-size=3M",
            "8G",
            "'requested-size' property has to be multiples of 'block-size' \\(0x200000\\)",
        ),
        (",block-size=4M", "6M", "memdev size has to be multiples of'block-size' \\(0x400000\\)"),
        (
            ",node=1",
            "8G",
            "'node' property has value '1', which exceedsthe number of numa nodes: 1",
        ),
    ],
)
def test_realize_errors(plan_machine: PlanFactory, extra: str, size: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        small_device(plan_machine, extra, size=size)


def test_requested_beyond_the_region_is_capped_at_realize(plan_machine: PlanFactory) -> None:
    # QEMU checks the backend size only for qom-set; at realize the usable region is capped.
    _, dev = small_device(plan_machine, ",requested-size=16G", size="8G")
    assert (dev.requested_size, dev.usable_region_size) == (16 * GiB, 8 * GiB)


def test_unplug_all_busy_only_with_memory_plugged(plan_machine: PlanFactory) -> None:
    _, dev = small_device(plan_machine, ",dynamic-memslots=on")
    dev.busy = True
    assert req(dev, ReqType.UNPLUG_ALL).type == Resp.ACK  # nothing plugged: nothing to refuse
    dev.busy = False
    drive_to(dev, 8 * MiB)
    dev.busy = True
    dev.system_reset()  # during migration QEMU's unplug-all fails and nothing changes
    assert dev.size == 8 * MiB and dev.mapped_memslots == 1
    dev.busy = False
    dev.system_reset()
    assert dev.size == 0 and dev.mapped_memslots == 0


def test_failed_discard_is_busy_and_changes_nothing(
    plan_machine: PlanFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    m, dev = small_device(plan_machine, ",dynamic-memslots=on")
    drive_to(dev, 64 * MiB)
    before = (dev.size, bytes(dev.bitmap), [s.mapped for s in dev.memslot_map()])
    sections = m.address_space.sections

    def fail(offset: int, length: int) -> None:
        raise HostMemoryError("injected discard failure")

    assert dev.memdev is not None
    monkeypatch.setattr(dev.memdev.memory, "discard", fail)
    assert req(dev, ReqType.UNPLUG, 0, 32).type == Resp.BUSY  # would empty memslot 0
    assert req(dev, ReqType.UNPLUG_ALL).type == Resp.BUSY
    assert (dev.size, bytes(dev.bitmap), [s.mapped for s in dev.memslot_map()]) == before
    assert m.address_space.sections == sections and dev.discard_failures == 2


def test_block_size_rules(plan_machine: PlanFactory, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(PropertyError, match="has to be at least 0x100000"):
        small_device(plan_machine, ",block-size=512K")
    with pytest.raises(PropertyError, match="has to be a power of two"):
        small_device(plan_machine, ",block-size=3M")
    with caplog.at_level(logging.WARNING):
        _, dev = small_device(plan_machine, ",block-size=1M")
    assert "smaller than the default block size (2 MiB)" in caplog.text
    with pytest.raises(PropertyError, match="'block-size' cannot be changed"):
        dev.set_block_size(4 * MiB)
    with pytest.raises(PropertyError, match="'requested-size' has to be multiples of"):
        dev.set_requested_size(MiB + 4096)
    with pytest.raises(PropertyError, match="cannot exceed the memory backend size"):
        dev.set_requested_size(16 * GiB)


def test_busy_memdev(plan_machine: PlanFactory) -> None:
    with pytest.raises(ConfigError, match="specifies a busy memdev: mem0"):
        plan_machine(
            "4G,maxmem=1028G",
            ["memory-backend-ram,id=mem0,size=8G"],
            ["virtio-mem,id=a,memdev=mem0", "virtio-mem,id=b,memdev=mem0"],
        )


def test_config_change_on_every_requested_size(plan_machine: PlanFactory) -> None:
    _, dev = small_device(plan_machine)
    seen: list[int] = []
    dev.config_change_listeners.append(lambda d: seen.append(d.requested_size))
    dev.set_requested_size(GiB)
    dev.set_requested_size(GiB)
    assert seen == [GiB, GiB]
    assert Config.unpack(dev.config().pack()) == dev.config()


def test_device_unplug_refusals(plan_machine: PlanFactory) -> None:
    m, dev = small_device(plan_machine, ",dynamic-memslots=on")
    drive_to(dev, GiB)
    with pytest.raises(DeviceError, match="some of its memory is still plugged"):
        m.remove_device("vmem0")
    dev.set_requested_size(0)
    assert req(dev, ReqType.UNPLUG_ALL).type == Resp.ACK
    m.remove_device("vmem0")
    assert "vmem0" not in m.devices


# -- property-based: any request sequence keeps the invariants --------------------------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(
            [ReqType.PLUG, ReqType.UNPLUG, ReqType.UNPLUG_ALL, ReqType.STATE, "resize"]
        ),
        st.integers(min_value=0, max_value=8 * 512 - 1),  # block index (8 GiB of 2 MiB blocks)
        st.integers(min_value=0, max_value=1200),
    ),
    max_size=40,
)


def run_ops(m: Machine, dev: VirtioMem, ops: list[tuple[object, int, int]]) -> None:
    for kind, block, nb in ops:
        if kind == "resize":
            dev.set_requested_size(min(nb * 8, 8 * 512) * dev.block_size)
        else:
            assert isinstance(kind, ReqType)
            r = req(dev, kind, block * dev.block_size, nb)
            assert r.type in (Resp.ACK, Resp.NACK, Resp.ERROR)
        check_invariants(m, dev)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=OPS, strategy=st.sampled_from([",dynamic-memslots=on", "", ",memslot-size=1G"]))
def test_invariants_on_model(
    plan_machine: PlanFactory, ops: list[tuple[object, int, int]], strategy: str
) -> None:
    m, dev = small_device(plan_machine, strategy, size="8G", maxmem="132G")
    run_ops(m, dev, ops)


@requires_kvm
@settings(max_examples=15, deadline=None)
@given(ops=OPS)
def test_kernel_slot_table_matches_on_real_kvm(ops: list[tuple[object, int, int]]) -> None:
    config = parse_machine_config(
        "1G,maxmem=9G",
        ["memory-backend-ram,id=mem0,size=8G,reserve=off"],
        ["virtio-mem,id=vmem0,memdev=mem0,memslot-size=1G"],
        accel="kvm",
    )
    with Machine(config, vm=KvmVm()) as m:
        run_ops(m, m.virtio_mem("vmem0"), ops)


def test_prealloc_populates_on_plug_and_busy_when_the_host_cannot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from memslots.kvm.model import KvmModel

    cfg = parse_machine_config(
        "1G,maxmem=3G",
        ["memory-backend-memfd,id=mem0,size=2G"],
        ["virtio-mem,id=vmem0,memdev=mem0,prealloc=on"],
        accel="sim",
    )
    with Machine(cfg, vm=KvmModel()) as m:
        dev = m.virtio_mem("vmem0")
        assert dev.memdev is not None
        mem = dev.memdev.memory
        assert isinstance(mem, HostMemory)
        dev.set_requested_size(64 * MiB)
        assert req(dev, ReqType.PLUG, 0, 16).type == Resp.ACK
        assert mem.allocated_bytes() >= 32 * MiB  # populated at plug, before any guest touch

        def no_memory(offset: int, length: int) -> None:
            raise HostMemoryError("injected: the host cannot supply the memory")

        monkeypatch.setattr(mem, "populate", no_memory)
        assert req(dev, ReqType.PLUG, 32 * MiB, 16).type == Resp.BUSY
        assert dev.size == 32 * MiB and dev.nb_plugged_blocks == 16
