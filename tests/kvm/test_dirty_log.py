"""KVM dirty logging: bitmap helpers, the model's kernel rules, the accelerator, the real kernel."""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
from collections.abc import Iterator

import pytest
from conftest import requires_kvm
from hypothesis import given, settings
from hypothesis import strategies as st

from memslots.devices.virtio_mem.device import VirtioMem
from memslots.errors import KvmError
from memslots.guest.inorder import drive_to
from memslots.host.memory import HostMemory
from memslots.kvm.abi import KVM_MEM_LOG_DIRTY_PAGES, make_slot
from memslots.kvm.accel import KvmAccel
from memslots.kvm.cost import slot_metadata_bytes
from memslots.kvm.dirty import (
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    bitmap_any,
    bitmap_bytes,
    bitmap_count,
    bitmap_runs,
    full_bitmap,
)
from memslots.kvm.mmu import MmuConfig
from memslots.kvm.model import KvmModel
from memslots.kvm.vcpu import ProbeVcpu, pattern_words
from memslots.kvm.vm import KvmVm
from memslots.machine.machine import Machine
from memslots.memory.address_space import GuestMemory, Section
from memslots.memory.backends import PlannedMemory
from memslots.migration.dirty import DirtyTracker
from memslots.options import parse_backend, parse_machine_config
from memslots.sizes import GiB, MiB, TiB

UADDR = 0x7F00_0000_0000
BOTH = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET


def pages_of(bitmap: bytes | bytearray) -> list[int]:
    value = int.from_bytes(bytes(bitmap), "little")
    return [i for i in range(len(bitmap) * 8) if value >> i & 1]


# -- bitmap helpers ---------------------------------------------------------------------------


def test_bitmap_sizes_and_full_bitmaps() -> None:
    assert [bitmap_bytes(n) for n in (0, 1, 64, 65, 1 << 20)] == [0, 8, 8, 16, 1 << 17]
    for n in (0, 1, 7, 8, 63, 64, 65, 1000):
        full = full_bitmap(n)
        assert len(full) == bitmap_bytes(n) and pages_of(full) == list(range(n))
    assert not bitmap_any(bytes(64)) and bitmap_any(bytes(63) + b"\x80")
    assert bitmap_count(full_bitmap(1000)) == 1000


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 255), max_size=300), st.integers(0, 2500))
def test_bitmap_runs_match_the_bits(raw: list[int], limit: int) -> None:
    data = bytes(raw)
    runs = list(bitmap_runs(data, limit))
    want = [p for p in pages_of(data) if p < limit]
    assert [p for first, n in runs for p in range(first, first + n)] == want
    # Runs are maximal: never adjacent, never empty.
    assert all(n > 0 for _, n in runs)
    assert all(a + n < b for (a, n), (b, _) in itertools.pairwise(runs))


def test_bitmap_runs_of_a_huge_full_bitmap_are_one_run() -> None:
    npages = 1 << 20  # a 4 GiB slot
    assert list(bitmap_runs(full_bitmap(npages), npages)) == [(0, npages)]
    # Runs crossing the helper's internal pieces are joined.
    sparse = bytearray(bitmap_bytes(npages))
    sparse[4095:4099] = b"\xff" * 4
    assert list(bitmap_runs(sparse)) == [(4095 * 8, 32)]


# -- the model's rules ---------------------------------------------------------------------------


def test_model_logging_follows_the_slot_flag() -> None:
    m = KvmModel(max_memslots=16)
    m.enable_dirty_log_protect(initially_set=True)
    m.set_memory_region(0, GiB, 2 * MiB, UADDR)
    with pytest.raises(KvmError) as info:
        m.get_dirty_log(0, 512)
    assert info.value.errno == errno.ENOENT and "no dirty bitmap" in str(info.value)
    # FLAGS_ONLY on: a bitmap, all set with INITIALLY_SET.
    m.set_memory_region(0, GiB, 2 * MiB, UADDR, KVM_MEM_LOG_DIRTY_PAGES)
    assert m.dirty_logging(0) and pages_of(m.get_dirty_log(0, 512)) == list(range(512))
    # Manual protection: GET only reads; CLEAR clears exactly the mask.
    assert pages_of(m.get_dirty_log(0, 512)) == list(range(512))
    m.clear_dirty_log(0, 0, 512, full_bitmap(512))
    assert not bitmap_any(m.get_dirty_log(0, 512))
    assert m.mark_dirty(GiB + 5 * 4096 + 100, 4096) == 2  # straddles two pages
    assert pages_of(m.get_dirty_log(0, 512)) == [5, 6]
    # MOVE keeps the bitmap (kvm_prepare_memory_region reuses it).
    m.set_memory_region(0, 2 * GiB, 2 * MiB, UADDR, KVM_MEM_LOG_DIRTY_PAGES)
    assert pages_of(m.get_dirty_log(0, 512)) == [5, 6]
    # FLAGS_ONLY off frees it; on again allocates a fresh (full) one.
    m.set_memory_region(0, 2 * GiB, 2 * MiB, UADDR)
    assert not m.dirty_logging(0)
    m.set_memory_region(0, 2 * GiB, 2 * MiB, UADDR, KVM_MEM_LOG_DIRTY_PAGES)
    assert bitmap_count(m.get_dirty_log(0, 512)) == 512
    m.delete_memory_region(0)
    for slot, err in ((0, errno.ENOENT), (3, errno.ENOENT), (16, errno.EINVAL)):
        with pytest.raises(KvmError) as info:
            m.get_dirty_log(slot, 512)
        assert info.value.errno == err
    with pytest.raises(KvmError) as info:
        m.get_dirty_log(make_slot(1, 0), 512)
    assert info.value.errno == errno.EINVAL


def test_model_created_with_logging_and_without_manual_protect() -> None:
    m = KvmModel()
    m.set_memory_region(2, 0, 1 * MiB, UADDR, KVM_MEM_LOG_DIRTY_PAGES)
    assert not bitmap_any(m.get_dirty_log(2, 256))  # not INITIALLY_SET: starts empty
    m.mark_dirty(0, 3 * 4096)
    m.mark_dirty(10 * MiB, 4096)  # no slot there: nothing to mark
    assert pages_of(m.get_dirty_log(2, 256)) == [0, 1, 2]
    assert not bitmap_any(m.get_dirty_log(2, 256))  # without manual protection GET clears
    with pytest.raises(ValueError, match="256 pages"):
        m.get_dirty_log(2, 255)


def test_model_clear_dirty_log_ranges() -> None:
    m = KvmModel()
    m.enable_dirty_log_protect(initially_set=True)
    m.set_memory_region(0, 0, 200 * 4096, UADDR, KVM_MEM_LOG_DIRTY_PAGES)  # 200 pages
    for first, num in ((1, 64), (0, 63), (64, 200), (0, 264), (256, 0)):
        with pytest.raises(KvmError) as info:
            m.clear_dirty_log(0, first, num, bytes(bitmap_bytes(num) or 8))
        assert info.value.errno == errno.EINVAL, (first, num)
    # A range may end unaligned only at the slot's end.
    m.clear_dirty_log(0, 128, 72, full_bitmap(72))
    m.clear_dirty_log(0, 64, 64, b"\x01" + bytes(7))
    assert pages_of(m.get_dirty_log(0, 200)) == [*range(64), *range(65, 128)]
    with pytest.raises(ValueError, match="bitmap"):
        m.clear_dirty_log(0, 0, 128, bytes(8))


def test_model_enable_cap_needs_the_capability() -> None:
    for caps, initially_set, ok in (
        (0, False, False),
        (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, True, False),
        (KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, False, True),
        (BOTH, True, True),
    ):
        m = KvmModel(dirty_log_caps=caps)
        assert m.dirty_log_caps() == caps
        if ok:
            m.enable_dirty_log_protect(initially_set)
        else:
            with pytest.raises(KvmError) as info:
                m.enable_dirty_log_protect(initially_set)
            assert info.value.errno == errno.EINVAL
    m.close()
    with pytest.raises(KvmError) as info:
        m.dirty_log_caps()
    assert info.value.errno == errno.EBADF


# -- the accelerator ---------------------------------------------------------------------------


def device_machine(vm: KvmModel | KvmVm | None = None, accel: str = "sim") -> Machine:
    """Boot RAM plus a 1 TiB dynamic-memslots device (256 memslots of 4 GiB)."""
    config = parse_machine_config(
        "1G,maxmem=1025G",
        ["memory-backend-ram,id=mem0,size=1T,reserve=off"],
        ["virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on"],
        accel=accel,
    )
    return Machine(config, vm=vm if vm is not None else KvmModel(mmu=MmuConfig()))


def test_accel_logs_only_its_mapped_memslots() -> None:
    with device_machine() as m:
        dev = m.virtio_mem("vmem0")
        drive_to(dev, 1 * GiB)
        model = m.vm
        assert isinstance(model, KvmModel)
        assert m.kvm.dirty_log_protect == BOTH  # enabled at construction, before any slot
        before = model.metadata_bytes()
        predicted = m.kvm.predicted_dirty_log_bytes()
        m.kvm.start_dirty_log()
        assert all(model.dirty_logging(k.slot) for k in m.kvm.slots())
        assert len(m.kvm.slots()) == 2  # boot RAM and the one memslot holding 1 GiB
        assert model.metadata_bytes() - before == predicted
        assert m.kvm.predicted_metadata_bytes() == model.metadata_bytes()
        # One 4 GiB memslot's bitmaps (2 x 128 KiB) and boot RAM's, against what one 1 TiB
        # memslot would cost: 2 x 32 MiB.
        single = slot_metadata_bytes(dev.addr, TiB, m.mmu, True) - slot_metadata_bytes(
            dev.addr, TiB, m.mmu
        )
        assert predicted < single / 100
        m.kvm.stop_dirty_log()
        assert not any(model.dirty_logging(k.slot) for k in m.kvm.slots())
        assert model.metadata_bytes() == before


def test_accel_sync_reports_pages_then_only_new_writes() -> None:
    with device_machine() as m:
        dev = m.virtio_mem("vmem0")
        drive_to(dev, 8 * GiB)  # two memslots
        model = m.vm
        assert isinstance(model, KvmModel)
        with pytest.raises(KvmError) as info:
            m.kvm.sync_dirty_log()
        assert info.value.errno == errno.ENOENT
        m.kvm.start_dirty_log()
        first = m.kvm.sync_dirty_log()
        assert [d.dirty_pages for d in first] == [d.npages for d in first]
        assert not any(d.dirty_pages for d in m.kvm.sync_dirty_log())
        model.mark_dirty(dev.addr + 4 * GiB + 8192, 3 * 4096)
        model.mark_dirty(64 * MiB, 1)
        dirty = {d.section.gpa: d for d in m.kvm.sync_dirty_log() if d.dirty_pages}
        assert sorted(dirty) == [0, dev.addr + 4 * GiB]
        assert list(dirty[dev.addr + 4 * GiB].gpa_ranges()) == [(dev.addr + 4 * GiB + 8192, 12288)]
        assert list(dirty[dev.addr + 4 * GiB].backend_ranges()) == [(4 * GiB + 8192, 12288)]
        assert list(dirty[0].backend_ranges()) == [(64 * MiB, 4096)]
        assert not any(d.dirty_pages for d in m.kvm.sync_dirty_log())


def test_accel_keeps_logging_across_memslot_changes() -> None:
    with device_machine() as m:
        dev = m.virtio_mem("vmem0")
        drive_to(dev, 4 * GiB)
        model = m.vm
        assert isinstance(model, KvmModel)
        m.kvm.start_dirty_log()
        m.kvm.sync_dirty_log()
        model.mark_dirty(dev.addr + 4096, 4096)
        drive_to(dev, 8 * GiB)  # a new memslot appears: logged, and all of it is new
        new = max(m.kvm.slots(), key=lambda k: k.section.gpa)
        assert model.slots()[new.slot].flags & KVM_MEM_LOG_DIRTY_PAGES
        drive_to(dev, 0)  # both device memslots go: their logs are kept for the next sync
        synced = {d.section.gpa: d for d in m.kvm.sync_dirty_log()}
        assert sorted(synced) == [0, dev.addr, dev.addr + 4 * GiB]
        assert list(synced[dev.addr].backend_ranges()) == [(4096, 4096)]
        assert synced[dev.addr + 4 * GiB].dirty_pages == synced[dev.addr + 4 * GiB].npages
        assert synced[0].dirty_pages == 0
        assert [d.section.gpa for d in m.kvm.sync_dirty_log()] == [0]


def test_accel_without_manual_protect() -> None:
    model = KvmModel(dirty_log_caps=0)
    kvm = KvmAccel(model)
    assert kvm.dirty_log_protect == 0
    mem = PlannedMemory(parse_backend("memory-backend-ram,id=r,size=1G"))
    kvm.region_add(Section(0, GiB, mem, 0, "r"))
    kvm.start_dirty_log()
    assert bitmap_count(kvm.sync_dirty_log()[0].bitmap) == GiB // 4096  # synthesised
    model.mark_dirty(4096, 1)
    assert list(kvm.sync_dirty_log()[0].runs()) == [(1, 1)]
    assert not kvm.sync_dirty_log()[0].dirty_pages


class FailingFlags(KvmModel):
    """A model that refuses to turn logging on for one slot."""

    fail_slot = 1

    def set_memory_region(
        self, slot: int, gpa: int, size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        if slot == self.fail_slot and flags & KVM_MEM_LOG_DIRTY_PAGES:
            raise KvmError("injected ENOMEM", errno.ENOMEM)
        super().set_memory_region(slot, gpa, size, userspace_addr, flags)


def test_accel_start_failure_changes_nothing() -> None:
    model = FailingFlags()
    kvm = KvmAccel(model)
    mem = PlannedMemory(parse_backend("memory-backend-ram,id=r,size=3G"))
    for i in range(3):
        kvm.region_add(Section(i * GiB, GiB, mem, i * GiB, f"r{i}"))
    with pytest.raises(KvmError, match="injected"):
        kvm.start_dirty_log()
    assert not kvm.dirty_logging
    assert not any(model.dirty_logging(s) for s in range(3))


# -- the real kernel ---------------------------------------------------------------------------


@pytest.fixture
def real_machine() -> Iterator[Machine]:
    vm = KvmVm()
    config = parse_machine_config(
        "256M,maxmem=2304M",
        ["memory-backend-ram,id=mem0,size=2G"],
        ["virtio-mem,id=vmem0,memdev=mem0,memslot-size=1G"],
        accel="kvm",
    )
    with Machine(config, vm=vm) as m:
        yield m


@requires_kvm
def test_real_kernel_matches_the_model() -> None:
    with KvmVm() as real:
        caps = real.dirty_log_caps()
        model = KvmModel(real.max_memslots, real.mmu, real.nr_address_spaces, dirty_log_caps=caps)
        assert caps & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        buf = mmap.mmap(-1, 4 * MiB)
        holder = ctypes.c_char.from_buffer(buf)
        uaddr = ctypes.addressof(holder)

        def outcome(vm: KvmVm | KvmModel, op: str) -> object:
            try:
                if op == "enable":
                    vm.enable_dirty_log_protect(bool(caps & KVM_DIRTY_LOG_INITIALLY_SET))
                elif op == "create":
                    vm.set_memory_region(0, GiB, 4 * MiB, uaddr)
                elif op == "get":
                    return pages_of(vm.get_dirty_log(0, 1024))
                elif op == "get-missing":
                    return pages_of(vm.get_dirty_log(5, 1024))
                elif op == "get-bad-id":
                    return pages_of(vm.get_dirty_log(real.max_memslots, 1024))
                elif op == "log-on":
                    vm.set_memory_region(0, GiB, 4 * MiB, uaddr, KVM_MEM_LOG_DIRTY_PAGES)
                elif op == "log-off":
                    vm.set_memory_region(0, GiB, 4 * MiB, uaddr)
                elif op == "clear-all":
                    vm.clear_dirty_log(0, 0, 1024, full_bitmap(1024))
                elif op == "clear-unaligned":
                    vm.clear_dirty_log(0, 32, 64, full_bitmap(64))
                elif op == "clear-short":
                    vm.clear_dirty_log(0, 0, 1000, full_bitmap(1000))
                elif op == "clear-tail":
                    vm.clear_dirty_log(0, 960, 64, full_bitmap(64))
            except KvmError as e:
                return ("errno", e.errno)
            return None

        try:
            ops = [
                "enable", "create", "get", "log-on", "get", "clear-unaligned", "clear-short",
                "clear-tail", "get", "clear-all", "get", "get-missing", "get-bad-id", "log-off",
                "get", "clear-all",
            ]  # fmt: skip
            for op in ops:
                assert outcome(model, op) == outcome(real, op), op
        finally:
            del holder
            buf.close()


@requires_kvm
def test_real_vcpu_writes_are_logged_and_host_writes_are_not(real_machine: Machine) -> None:
    m = real_machine
    vm = m.vm
    assert isinstance(vm, KvmVm)
    dev = m.virtio_mem("vmem0")
    assert isinstance(dev, VirtioMem)
    drive_to(dev, 4 * MiB)  # maps memslot 0 (1 GiB) of the device; memslot 1 stays unmapped
    assert m.kvm.dirty_log_protect & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    memory = GuestMemory(m.address_space)
    boot = m.boot_ram
    assert boot is not None
    assert dev.memdev is not None
    device_memory, boot_memory = dev.memdev.memory, boot.memory
    assert isinstance(device_memory, HostMemory) and isinstance(boot_memory, HostMemory)
    tracker = DirtyTracker()
    with ProbeVcpu(vm, memory) as vcpu:
        tracker.track(device_memory)
        tracker.track(boot_memory)
        m.kvm.start_dirty_log()
        gpas = sorted(d.section.gpa for d in m.kvm.sync_dirty_log())
        assert gpas == [0, dev.addr]  # the unmapped memslot has no log
        tracker.take_all()
        # The guest writes two words in the device and one in boot RAM; the VMM writes one
        # page of the device through its host mapping.
        assert vcpu.write64(dev.addr + 8192, 1) and vcpu.write64(dev.addr + 3 * MiB + 16, 2)
        assert vcpu.write64(100 * MiB, 3)
        memory.write(dev.addr + MiB, b"written by the VMM")
        dirty = {d.section.gpa: d for d in m.kvm.sync_dirty_log()}
        assert list(dirty[dev.addr].backend_ranges()) == [(8192, 4096), (3 * MiB, 4096)]
        assert (100 * MiB, 4096) in list(dirty[0].backend_ranges())
        # The VMM's write is not in KVM's log, only in the tracker (with the vCPU's command
        # lists, which the VMM writes into boot RAM too).
        assert tracker.take(device_memory) == [(MiB, 4096)]
        assert tracker.take(boot_memory)
        # Pages written again after a sync show up in the next one, and only those.
        words = pattern_words(dev.addr + 2 * MiB, 4096, seed=7)
        assert vcpu.write_pattern(dev.addr + 2 * MiB, 4096, seed=7)
        dirty = {d.section.gpa: d for d in m.kvm.sync_dirty_log()}
        assert list(dirty[dev.addr].gpa_ranges()) == [(dev.addr + 2 * MiB, 4096)]
        assert len(words) == 3
        m.kvm.stop_dirty_log()
        with pytest.raises(KvmError) as info:
            vm.get_dirty_log(m.kvm.slots()[0].slot, m.kvm.slots()[0].section.size // 4096)
        assert info.value.errno == errno.ENOENT
    tracker.close()
