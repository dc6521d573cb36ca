"""The KVM userspace ABI for memslots (and the probe vCPU): ioctl numbers, flags, capabilities
and struct layouts.

Values follow Linux's ``include/uapi/linux/kvm.h`` (x86-64). Structs are packed with
:mod:`struct` in native byte order, exactly as the kernel copies them from user memory.
:class:`VmBackend` is the interface shared by the real accelerator (:class:`memslots.kvm.vm.KvmVm`)
and the model (:class:`memslots.kvm.model.KvmModel`).
"""

from __future__ import annotations

import errno as errno_mod
import os
import struct
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

from memslots.errors import KvmError
from memslots.kvm.dirty import CLEAR_DIRTY_LOG_STRUCT, DIRTY_LOG_STRUCT, DirtyLogBackend
from memslots.sizes import format_size

if TYPE_CHECKING:
    from memslots.kvm.mmu import MmuConfig

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

KVMIO = 0xAE
KVM_API_VERSION = 12

# asm-generic/ioctl.h: nr in bits 0-7, type in 8-15, size in 16-29, direction in 30-31.
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


# struct kvm_userspace_memory_region: slot, flags, guest_phys_addr, memory_size, userspace_addr.
REGION_STRUCT = struct.Struct("=IIQQQ")
# struct kvm_userspace_memory_region2: the same 32 bytes, then guest_memfd_offset, guest_memfd,
# pad1 and pad2[14].
REGION2_STRUCT = struct.Struct("=IIQQQQII14Q")
# struct kvm_enable_cap: cap, flags, args[4], pad[64].
ENABLE_CAP_STRUCT = struct.Struct("=II4Q64x")

KVM_GET_API_VERSION = _ioc(_IOC_NONE, 0x00, 0)
KVM_CREATE_VM = _ioc(_IOC_NONE, 0x01, 0)
KVM_CHECK_EXTENSION = _ioc(_IOC_NONE, 0x03, 0)
KVM_GET_DIRTY_LOG = _ioc(_IOC_WRITE, 0x42, DIRTY_LOG_STRUCT.size)
KVM_SET_USER_MEMORY_REGION = _ioc(_IOC_WRITE, 0x46, REGION_STRUCT.size)
KVM_SET_USER_MEMORY_REGION2 = _ioc(_IOC_WRITE, 0x49, REGION2_STRUCT.size)
KVM_ENABLE_CAP = _ioc(_IOC_WRITE, 0xA3, ENABLE_CAP_STRUCT.size)
KVM_CLEAR_DIRTY_LOG = _ioc(_IOC_READ | _IOC_WRITE, 0xC0, CLEAR_DIRTY_LOG_STRUCT.size)
# Binary statistics (Linux 5.14+), on a VM or vCPU fd: returns a read-only stats fd.
KVM_GET_STATS_FD = _ioc(_IOC_NONE, 0xCE, 0)
# struct kvm_stats_header: flags, name_size, num_desc, id_offset, desc_offset, data_offset.
STATS_HEADER = struct.Struct("=6I")
# struct kvm_stats_desc (then char name[name_size]): flags, exponent, size, offset, bucket_size.
STATS_DESC = struct.Struct("=IhHII")

# vCPU ABI (x86-64), used by memslots.kvm.vcpu to run a probe guest.
# struct kvm_regs: rax rbx rcx rdx rsi rdi rsp rbp r8-r15 rip rflags.
REGS_STRUCT = struct.Struct("=18Q")
REGS_FIELDS = (
    *("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"),
    *(f"r{i}" for i in range(8, 16)),
    *("rip", "rflags"),
)
# struct kvm_segment: base, limit, selector, type, present, dpl, db, s, l, g, avl, unusable, pad.
SEGMENT_STRUCT = struct.Struct("=QIH10B")
# struct kvm_dtable: base, limit, padding[3].
DTABLE_STRUCT = struct.Struct("=QH3H")
# struct kvm_sregs: cs ds es fs gs ss tr ldt, gdt idt, cr0 cr2 cr3 cr4 cr8 efer apic_base,
# interrupt_bitmap[4].
SREGS_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
SREGS_GDT_OFFSET = 8 * SEGMENT_STRUCT.size
SREGS_IDT_OFFSET = SREGS_GDT_OFFSET + DTABLE_STRUCT.size
SREGS_CONTROL_OFFSET = SREGS_IDT_OFFSET + DTABLE_STRUCT.size
SREGS_CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")
SREGS_SIZE = SREGS_CONTROL_OFFSET + 8 * len(SREGS_CONTROL) + 4 * 8
# struct kvm_cpuid2 header (nent, padding) and struct kvm_cpuid_entry2 (function, index, flags,
# eax, ebx, ecx, edx, padding[3]).
CPUID2_HEADER = struct.Struct("=II")
CPUID_ENTRY2 = struct.Struct("=7I12x")

KVM_GET_VCPU_MMAP_SIZE = _ioc(_IOC_NONE, 0x04, 0)
KVM_GET_SUPPORTED_CPUID = _ioc(_IOC_READ | _IOC_WRITE, 0x05, CPUID2_HEADER.size)
KVM_CREATE_VCPU = _ioc(_IOC_NONE, 0x41, 0)
KVM_RUN = _ioc(_IOC_NONE, 0x80, 0)
KVM_GET_REGS = _ioc(_IOC_READ, 0x81, REGS_STRUCT.size)
KVM_SET_REGS = _ioc(_IOC_WRITE, 0x82, REGS_STRUCT.size)
KVM_GET_SREGS = _ioc(_IOC_READ, 0x83, SREGS_SIZE)
KVM_SET_SREGS = _ioc(_IOC_WRITE, 0x84, SREGS_SIZE)
KVM_SET_CPUID2 = _ioc(_IOC_WRITE, 0x90, CPUID2_HEADER.size)

# struct kvm_run: exit_reason at 8, the exit union at 32.
RUN_EXIT_REASON = struct.Struct("=I")
RUN_EXIT_REASON_OFFSET = 8
RUN_EXIT_OFFSET = 32
# The io member: direction, size, port, count, data_offset (data lives in the kvm_run mapping).
RUN_IO = struct.Struct("=BBHIQ")
# The mmio member: phys_addr, data[8], len, is_write.
RUN_MMIO = struct.Struct("=Q8sIB")
RUN_MMIO_DATA_OFFSET = RUN_EXIT_OFFSET + 8
# The internal member: suberror, ndata.
RUN_INTERNAL = struct.Struct("=II")

KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_IO_OUT = 1

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2
# Bits 0-15 belong to userspace; bits 16+ are KVM-internal (e.g. KVM_MEMSLOT_INVALID).
KVM_MEM_USER_FLAGS_MASK = 0xFFFF
# The v1 ioctl rejects every flag except these two.
KVM_MEM_V1_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY

KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_READONLY_MEM = 81
KVM_CAP_MULTI_ADDRESS_SPACE = 118
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 225
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_GUEST_MEMFD = 234
# KVM_CHECK_EXTENSION returns the mask of quirks that can be disabled; KVM_ENABLE_CAP with
# args[0] = mask disables them (on the VM fd, before any vCPU exists).
KVM_CAP_DISABLE_QUIRKS2 = 213
# Linux 6.12+: with this quirk (on by default), deleting or moving any memslot zaps every shadow
# page of the VM, not just the slot's own mappings; every vCPU then re-faults its working set.
KVM_X86_QUIRK_SLOT_ZAP_ALL = 1 << 7
# What KVM_CAP_DISABLE_QUIRKS2 offers on this kind of host (Linux 6.18, x86): quirks 0-8 and 10.
KVM_X86_QUIRKS2_MASK_6_18 = 0x5FF

# Dirty bitmaps are indexed by unsigned int, hence the per-slot page limit.
KVM_MEM_MAX_NR_PAGES = (1 << 31) - 1
KVM_MEM_SLOTS_NUM = 32767
X86_INTERNAL_MEM_SLOTS = 3
X86_USER_MEM_SLOTS = KVM_MEM_SLOTS_NUM - X86_INTERNAL_MEM_SLOTS
# QEMU's fallback when KVM_CAP_NR_MEMSLOTS reports 0 (very old kernels).
DEFAULT_NR_MEMSLOTS = 32
# Guest-physical bound under shadow paging (kvm_mmu_max_gfn); with TDP it is MAXPHYADDR.
SHADOW_MAX_GPA_BITS = 52
# access_ok() on x86-64 with 4-level paging: userspace_addr + size must not exceed
# TASK_SIZE_MAX = 2^47 - 4 KiB (measured on this host; 5-level paging raises it to 2^56 - 4 KiB).
X86_64_USER_ADDR_END = (1 << 47) - PAGE_SIZE


def split_slot(slot: int) -> tuple[int, int]:
    """Split a ``slot`` field into ``(as_id, id)`` the way the kernel does (``>> 16``, ``u16``)."""
    return slot >> 16, slot & 0xFFFF


def make_slot(as_id: int, slot_id: int) -> int:
    """Build a ``slot`` field from an address-space id and a slot id."""
    return (as_id << 16) | slot_id


_FIELD_BITS = (
    ("slot", 32),
    ("flags", 32),
    ("guest_phys_addr", 64),
    ("memory_size", 64),
    ("userspace_addr", 64),
    ("guest_memfd_offset", 64),
    ("guest_memfd", 32),
)


@dataclass(frozen=True)
class UserspaceMemoryRegion:
    """One ``kvm_userspace_memory_region[2]``: the argument of KVM_SET_USER_MEMORY_REGION[2]."""

    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    guest_memfd_offset: int = 0
    guest_memfd: int = 0

    def __post_init__(self) -> None:
        for name, bits in _FIELD_BITS:
            value = getattr(self, name)
            if not 0 <= value < 1 << bits:
                raise ValueError(f"{name} {value:#x} does not fit in an unsigned {bits}-bit field")

    def pack(self) -> bytes:
        """The 32-byte v1 struct; the guest_memfd fields have no place in it and must be 0."""
        if self.guest_memfd_offset or self.guest_memfd:
            raise ValueError("guest_memfd fields need kvm_userspace_memory_region2")
        return REGION_STRUCT.pack(
            self.slot, self.flags, self.guest_phys_addr, self.memory_size, self.userspace_addr
        )

    def pack2(self) -> bytes:
        """The 160-byte v2 struct (padding zeroed, as the kernel requires)."""
        return REGION2_STRUCT.pack(
            self.slot,
            self.flags,
            self.guest_phys_addr,
            self.memory_size,
            self.userspace_addr,
            self.guest_memfd_offset,
            self.guest_memfd,
            0,
            *([0] * 14),
        )

    @classmethod
    def unpack(cls, data: bytes) -> UserspaceMemoryRegion:
        """Decode a 32-byte v1 struct."""
        slot, flags, gpa, size, uaddr = REGION_STRUCT.unpack(data)
        return cls(slot, flags, gpa, size, uaddr)

    @classmethod
    def unpack2(cls, data: bytes) -> UserspaceMemoryRegion:
        """Decode a 160-byte v2 struct; the padding is ignored."""
        slot, flags, gpa, size, uaddr, gmem_offset, gmem_fd, *_pad = REGION2_STRUCT.unpack(data)
        return cls(slot, flags, gpa, size, uaddr, gmem_offset, gmem_fd)


@dataclass(frozen=True)
class CpuidEntry:
    """One ``struct kvm_cpuid_entry2``."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def pack_cpuid2(entries: list[CpuidEntry]) -> bytearray:
    """A ``struct kvm_cpuid2`` holding ``entries``, as a mutable buffer for ``ioctl``.

    It is a bytearray because ``fcntl.ioctl`` refuses immutable arguments over 1024 bytes.
    """
    buf = bytearray(CPUID2_HEADER.size + CPUID_ENTRY2.size * len(entries))
    CPUID2_HEADER.pack_into(buf, 0, len(entries), 0)
    for i, entry in enumerate(entries):
        CPUID_ENTRY2.pack_into(
            buf,
            CPUID2_HEADER.size + i * CPUID_ENTRY2.size,
            *(entry.function, entry.index, entry.flags),
            *(entry.eax, entry.ebx, entry.ecx, entry.edx),
        )
    return buf


def unpack_cpuid2(buf: bytes | bytearray) -> list[CpuidEntry]:
    """The entries of a ``struct kvm_cpuid2`` (as many as its ``nent`` says)."""
    nent, _pad = CPUID2_HEADER.unpack_from(buf, 0)
    return [
        CpuidEntry(*CPUID_ENTRY2.unpack_from(buf, CPUID2_HEADER.size + i * CPUID_ENTRY2.size))
        for i in range(nent)
    ]


def pack_enable_cap(cap: int, *args: int) -> bytes:
    """A ``struct kvm_enable_cap`` for ``cap`` with up to four arguments (flags 0)."""
    if len(args) > 4:
        raise ValueError("kvm_enable_cap has four arguments")
    return ENABLE_CAP_STRUCT.pack(cap, 0, *args, *([0] * (4 - len(args))))


def memslot_error(
    op: str, slot: int, gpa: int, size: int, err: int, reason: str | None = None
) -> KvmError:
    """Build the :class:`KvmError` for a failed memslot operation.

    The message names the operation, the slot (with its address space), the guest-physical
    address in hex, the size and the errno, then ``reason`` (or a hint derived from the errno).
    """
    as_id, slot_id = split_slot(slot)
    name = errno_mod.errorcode.get(err, str(err))
    why = reason if reason is not None else _ERRNO_HINTS.get(err, os.strerror(err))
    return KvmError(
        f"{op} failed for memslot {slot} (as_id {as_id}, id {slot_id}) at gpa {gpa:#x}, "
        f"size {format_size(size)} ({size:#x}): {name}: {why}",
        err,
    )


def reject_guest_memfd(flags: int) -> None:
    """Refuse KVM_MEM_GUEST_MEMFD: the backends' interface passes no guest_memfd fd or offset.

    Without one the kernel's outcome would depend on whatever file descriptor 0 happens to be.
    """
    if flags & KVM_MEM_GUEST_MEMFD:
        raise ValueError("KVM_MEM_GUEST_MEMFD slots need a guest_memfd; this interface has none")


_ERRNO_HINTS = {
    errno_mod.EEXIST: "the range overlaps another memslot in the same address space",
    errno_mod.EINVAL: (
        "the kernel rejected the slot id, an unaligned or out-of-range address or size, "
        "the flags, a change of an existing slot's size, host address or READONLY bit, "
        "or the deletion of a slot that does not exist"
    ),
    errno_mod.ENOMEM: "the kernel could not allocate the memslot's metadata",
    errno_mod.EFAULT: "the kernel could not read the ioctl argument",
}


class VmBackend(DirtyLogBackend, Protocol):
    """What memslot code needs from a VM: the real :class:`~memslots.kvm.vm.KvmVm` or the model.

    Dirty logging (:class:`~memslots.kvm.dirty.DirtyLogBackend`) is part of it.

    Both raise :class:`~memslots.errors.KvmError` carrying the kernel's errno, so callers and
    tests can treat them alike.
    """

    @property
    def is_real(self) -> bool:
        """True for a VM on ``/dev/kvm``, False for the model."""
        ...

    @property
    def max_memslots(self) -> int:
        """``KVM_CAP_NR_MEMSLOTS``: user slot ids per address space are ``0 .. max-1``."""
        ...

    @property
    def nr_address_spaces(self) -> int:
        """Number of address spaces (2 with SMM); ``slot >> 16`` must be below it."""
        ...

    @property
    def mmu(self) -> MmuConfig:
        """The MMU configuration that decides what each memslot costs the kernel."""
        ...

    @property
    def slot_zap_all(self) -> bool:
        """Whether deleting a memslot zaps every shadow page of the VM (KVM's SLOT_ZAP_ALL quirk
        in effect), rather than only the slot's own mappings."""
        ...

    def set_memory_region(
        self, slot: int, gpa: int, size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        """Create (or move, or change the flags of) memslot ``slot``."""
        ...

    def delete_memory_region(self, slot: int) -> None:
        """Delete memslot ``slot`` (a region of size 0)."""
        ...

    def probe_mapped(self, gpa: int) -> bool:
        """Whether a memslot of address space 0 covers guest-physical address ``gpa``."""
        ...

    def close(self) -> None:
        """Release the VM; idempotent."""
        ...

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
