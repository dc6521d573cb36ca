"""A real vCPU that checks guest-physical memory from inside the guest.

:class:`ProbeVcpu` runs a tiny 64-bit guest on a :class:`~memslots.kvm.vm.KvmVm`. The host puts
a batch of commands (read or write a byte or a 64-bit word at a guest-physical address) into
guest memory and enters the guest with KVM_RUN; the guest performs them with ordinary loads
and stores and reports the end of the batch with ``out`` to port 0x10. An access to a GPA that
no memslot backs comes back as KVM_EXIT_MMIO carrying that exact address. The guest cannot
tell MMIO from RAM, so the host records the exit, answers a read with all-ones (what a read
of nothing on a bus returns) and re-enters. A guest exception reports its vector on port 0x11
and becomes a :class:`~memslots.errors.VcpuError`.

An access to a mapped memslot whose host memory is out of reach (``PROT_NONE``: an unplugged
virtio-mem block) becomes a :class:`~memslots.errors.GuestMemoryFault`, and the vCPU stops
until :meth:`ProbeVcpu.reset`. Measured on this host (kernel 6.18, kvm_pvm): at CPL3 KVM_RUN
fails with EFAULT, the exit reason stays 0 and the ``memory_fault`` fields stay empty although
KVM_CAP_MEMORY_FAULT_INFO is offered, and entering again faults again (RIP stays on the
instruction); so the address is the probe's current command's. A kernel that fills
KVM_EXIT_MEMORY_FAULT gives the page instead. At CPL0 KVM's instruction emulator reports the
unreadable memory as an MMIO exit at the exact address, which is told from real MMIO by the
address space: a mapped RAM section there. Neither path allocates host memory.

Facts this relies on (measured on this kind of host, ``shared/reference/kvm-vcpu.md``):

* KVM_SET_SREGS can put a vCPU straight into long mode. KVM_SET_CPUID2 with KVM's full
  supported list is needed (once, before the first KVM_RUN): without it the guest's
  MAXPHYADDR is 36 and every GPA at or above 64 GiB faults instead of exiting.
* KVM offers no 1 GiB pages here, so guest-physical memory is mapped with 2 MiB pages.
* At CPL3 (the default) the guest's loads and stores run natively through KVM's shadow page
  tables; at CPL0 KVM emulates every instruction. Both see the same memslots.
* With shadow paging, a host write to a guest page-table entry that is already present is not
  seen by the guest, which keeps the old translation. Entries therefore only ever change from
  not-present to present, and KVM keeps a vCPU (and its shadow pages) until the VM is closed,
  so a VM gets at most one ProbeVcpu: the image is never rewritten under a live shadow.

The image lives in guest-physical [0, :data:`IMAGE_SIZE`), which must be RAM (boot RAM in a
:class:`~memslots.machine.machine.Machine`); it is mapped 1:1 at virtual address 0:

========== ==============================================================================
0x1000     GDT: null, ring-0 code/data, the 64-bit TSS, ring-3 data/code
0x2000     IDT: 32 interrupt gates to the exception stubs
0x3000     control block: address of the command list, command being run
0x4000     TSS (only RSP0 is set: CPL3 exceptions need a ring-0 stack)
0x5000     the command loop; 0x6000 exception stubs; stacks below 0x8000 (ring 0) and
           0x9000 (ring 3)
0x10000    PML4; 0x11000/0x12000 PDPT/PD mapping the image; 0x13000 the window PDPT
0x20000    command list (:data:`MAX_BATCH` commands of 24 bytes and an end marker)
0x80000    pool of 384 page directories for the window
========== ==============================================================================

Every probed GPA is reached through the window: the n-th distinct 2 MiB frame that is
probed gets virtual address ``2**39 + n * 2 MiB``, by one new page-directory entry (and a new
PDPT entry for every 512th frame). Any GPA below the guest's MAXPHYADDR (2**48 here) works,
up to :data:`MAX_FRAMES` distinct frames (384 GiB of them) per vCPU.

Measured on this host (kvm_pvm, CPL3): a single command takes about 35 us, 28 us of which is
KVM_RUN itself, and 55-65 us when it exits as MMIO; in a batch, a command on populated memory
adds about 2 us. A first touch that makes the host allocate costs more (see
:meth:`ProbeVcpu.write_pattern`).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from memslots.closing import Closing
from memslots.errors import GuestMemoryFault, KvmError, VcpuError
from memslots.kvm.abi import (
    DTABLE_STRUCT,
    KVM_EXIT_FAIL_ENTRY,
    KVM_EXIT_HLT,
    KVM_EXIT_INTERNAL_ERROR,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_IO_OUT,
    KVM_EXIT_MEMORY_FAULT,
    KVM_EXIT_MMIO,
    KVM_EXIT_SHUTDOWN,
    KVM_GET_REGS,
    KVM_GET_SREGS,
    KVM_RUN,
    KVM_SET_CPUID2,
    KVM_SET_REGS,
    KVM_SET_SREGS,
    REGS_FIELDS,
    REGS_STRUCT,
    RUN_EXIT_OFFSET,
    RUN_EXIT_REASON,
    RUN_EXIT_REASON_OFFSET,
    RUN_INTERNAL,
    RUN_IO,
    RUN_MEMORY_FAULT,
    RUN_MMIO,
    RUN_MMIO_DATA_OFFSET,
    SEGMENT_STRUCT,
    SREGS_CONTROL,
    SREGS_CONTROL_OFFSET,
    SREGS_GDT_OFFSET,
    SREGS_IDT_OFFSET,
    SREGS_SEGMENTS,
    SREGS_SIZE,
    CpuidEntry,
    pack_cpuid2,
)
from memslots.kvm.vm import KvmVm, read_stats
from memslots.memory.address_space import GuestMemory, RamBlock
from memslots.sizes import MiB

#: Guest-physical bytes at 0 that hold the probe's image; commands may not write there.
IMAGE_SIZE = 2 * MiB
#: The unit of the window mapping (a 2 MiB guest page).
FRAME_SIZE = 2 * MiB

_PAGE = 0x1000
_GDT = 0x1000
_IDT = 0x2000
_CTRL = 0x3000
_TSS = 0x4000
_CODE = 0x5000
_STUBS = 0x6000
_STACK0_TOP = 0x8000
_STACK3_TOP = 0x9000
_PML4 = 0x10000
_PDPT_LOW = 0x11000
_PD_LOW = 0x12000
_PDPT_WINDOW = 0x13000
_ENTRIES = 0x20000
_POOL = 0x80000
_WINDOW_VA = 1 << 39  # PML4 entry 1
_ENTRY = struct.Struct("=QQQ")  # op, virtual address, value (result of a read)

#: Most commands per KVM_RUN; longer batches are split.
MAX_BATCH = (_POOL - _ENTRIES) // _ENTRY.size - 1
#: Most distinct 2 MiB frames one vCPU can map (512 per page directory of the pool).
MAX_FRAMES = (IMAGE_SIZE - _POOL) // _PAGE * 512

# Command ops; an all-zero entry ends the list.
_OP_READ8, _OP_WRITE8, _OP_READ64, _OP_WRITE64 = 1, 2, 3, 4
_PORT_DONE = 0x10
_PORT_EXCEPTION = 0x11

# Page-table entry bits: present, writable, user, 2 MiB page.
_P, _RW, _US, _PS = 0x1, 0x2, 0x4, 0x80
_CR0 = 0x80000033  # PE MP ET NE PG
_CR4 = 0x20  # PAE
_EFER = 0x500  # LME LMA
# IOPL 3 makes the ring-3 ``out`` legal on VMX/SVM too (kvm_pvm lets it exit regardless).
_RFLAGS_CPL0, _RFLAGS_CPL3 = 0x2, 0x3002

_SEL_CODE0, _SEL_DATA0, _SEL_TSS = 0x08, 0x10, 0x18
_SEL_DATA3, _SEL_CODE3 = 0x28 | 3, 0x30 | 3
_TSS_LIMIT = 0x67
_SEG_CODE, _SEG_DATA, _SEG_TSS_BUSY, _SEG_LDT = 11, 3, 11, 2

_U64 = (1 << 64) - 1
_SALT = 0x5BD1E995  # separates the choice of the middle word from the words' values

# Vectors for which the CPU pushes an error code.
_ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21, 29, 30})
_VECTOR_NAMES = {0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 6: "#UD", 8: "#DF", 13: "#GP", 14: "#PF"}

# The command loop (our own, checked with ``objdump -D -b binary -mi386:x86-64``):
#   00 mov ebx,0x3000       05 mov rdi,[rbx]        ; first command
#   08 mov [rbx+8],rdi      ; publish the command being run, for MMIO exits and exceptions
#   0c mov eax,[rdi]        0e mov rsi,[rdi+8]      12 mov rdx,[rdi+16]
#   16 cmp eax,1 / je 2e    1b cmp eax,2 / je 3c    20 cmp eax,3 / je 33    25 cmp eax,4 / je 40
#   2a out 0x10,al          2c jmp 00               ; end marker: batch done
#   2e movzx edx,byte [rsi] 31 jmp 36               ; READ8
#   33 mov rdx,[rsi]                                ; READ64
#   36 mov [rdi+16],rdx     3a jmp 43               ; store the result
#   3c mov [rsi],dl         3e jmp 43               ; WRITE8
#   40 mov [rsi],rdx                                ; WRITE64
#   43 add rdi,24           47 jmp 08
_GUEST_CODE = bytes.fromhex(
    "bb00300000488b3b48897b088b07488b7708488b571083f801741383f802741c83f803740e83f804"
    "7416e610ebd20fb616eb03488b1648895710eb078816eb034889164883c718ebbf"
)


def _stub(vector: int) -> bytes:
    """``mov al,vector; out 0x11,al; hlt; jmp hlt``."""
    return bytes((0xB0, vector, 0xE6, _PORT_EXCEPTION, 0xF4, 0xEB, 0xFD))


@dataclass(frozen=True)
class VcpuStats:
    """Counters of a :class:`ProbeVcpu`: commands run, KVM_RUN calls, MMIO exits, and the
    seconds spent inside KVM_RUN (the guest's own time, without the host's Python), as wall
    time and as the thread's CPU time (which does not count waiting for a busy host's CPU)."""

    commands: int = 0
    runs: int = 0
    mmio_exits: int = 0
    run_seconds: float = 0.0
    run_cpu_seconds: float = 0.0


def pattern_words(gpa: int, length: int, seed: int) -> list[tuple[int, int]]:
    """The ``(gpa, value)`` words of the pattern that :meth:`ProbeVcpu.write_pattern` writes.

    ``[gpa, gpa + length)`` is cut at 2 MiB boundaries; each piece gets its first and last
    64-bit word and one word chosen from ``seed`` and the piece's address. Values depend on
    ``seed`` and the word's own address, so data that shows up at the wrong address does not
    match, and are never 0, so discarded (zeroed) memory never matches. ``gpa`` and
    ``length`` must be multiples of 8.
    """
    if gpa < 0 or length <= 0 or gpa % 8 or length % 8:
        raise ValueError(
            f"pattern range [{gpa:#x}, +{length:#x}) must be non-empty and 8-byte aligned"
        )
    key = _mix64(seed & _U64)
    words: dict[int, int] = {}
    pos, end = gpa, gpa + length
    while pos < end:
        piece_end = min(end, (pos // FRAME_SIZE + 1) * FRAME_SIZE)
        nwords = (piece_end - pos) // 8
        middle = pos + 8 * (_mix64(key ^ pos ^ _SALT) % nwords)
        for addr in (pos, middle, piece_end - 8):
            words[addr] = _mix64(key ^ addr) or 1
        pos = piece_end
    return list(words.items())


def _mix64(x: int) -> int:
    """SplitMix64's finaliser: a cheap, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _U64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _U64
    return x ^ (x >> 31)


def _descriptor(base: int, limit: int, access: int, flags: int) -> int:
    """An 8-byte GDT descriptor (the low half of a system descriptor)."""
    return (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | access << 40
        | (limit >> 16 & 0xF) << 48
        | flags << 52
        | (base >> 24 & 0xFF) << 56
    )


def _boot_image(cpl3: bool) -> bytes:
    """Everything below the command list: tables, code, stubs and the fixed page tables."""
    img = bytearray(_ENTRIES)
    gdt = (
        0,
        _descriptor(0, 0xFFFFF, 0x9A, 0xA),  # 0x08 ring-0 64-bit code (L, G)
        _descriptor(0, 0xFFFFF, 0x92, 0xC),  # 0x10 ring-0 data (DB, G)
        _descriptor(_TSS, _TSS_LIMIT, 0x89, 0),  # 0x18 64-bit TSS, low half
        _TSS >> 32,  # high half: base bits 32-63
        _descriptor(0, 0xFFFFF, 0xF2, 0xC),  # 0x28 ring-3 data
        _descriptor(0, 0xFFFFF, 0xFA, 0xA),  # 0x30 ring-3 64-bit code
    )
    struct.pack_into(f"={len(gdt)}Q", img, _GDT, *gdt)
    for vector in range(32):
        stub = _STUBS + 16 * vector
        img[stub : stub + 7] = _stub(vector)
        # 64-bit interrupt gate (type 0x8E): offset 0-15, selector, IST, type, 16-31, 32-63.
        gate = (stub & 0xFFFF, _SEL_CODE0, 0, 0x8E, stub >> 16 & 0xFFFF, stub >> 32, 0)
        struct.pack_into("=HHBBHII", img, _IDT + 16 * vector, *gate)
    struct.pack_into("=Q", img, _CTRL, _ENTRIES)
    struct.pack_into("=Q", img, _TSS + 4, _STACK0_TOP)  # RSP0
    img[_CODE : _CODE + len(_GUEST_CODE)] = _GUEST_CODE
    table = _P | _RW | (_US if cpl3 else 0)
    struct.pack_into("=QQ", img, _PML4, _PDPT_LOW | table, _PDPT_WINDOW | table)
    struct.pack_into("=Q", img, _PDPT_LOW, _PD_LOW | table)
    struct.pack_into("=Q", img, _PD_LOW, 0 | table | _PS)  # the image, 1:1
    return bytes(img)


def _phys_bits(cpuid: Sequence[CpuidEntry]) -> int:
    """Guest MAXPHYADDR from leaf 0x80000008 (36 if KVM offers no such leaf)."""
    for entry in cpuid:
        if entry.function == 0x80000008:
            return entry.eax & 0xFF
    return 36


def _errno(e: OSError) -> int:
    return e.errno if e.errno is not None else errno.EIO


class ProbeVcpu(Closing):
    """A vCPU that reads and writes guest-physical memory from inside the guest.

    ``vm`` is the VM whose memslots are probed; ``boot`` must have RAM at guest-physical
    [0, :data:`IMAGE_SIZE`), which the probe overwrites with its image and uses as its own
    memory, so it needs no memslot of its own. ``cpl3`` runs the guest in ring 3, where KVM
    executes its accesses natively through shadow paging (ring 0 is emulated). Only one
    ProbeVcpu can ever be created per VM; a second one raises :class:`VcpuError` (EEXIST).

    ``state`` (from :meth:`save_state` on a migration source) resumes a vCPU on a destination
    whose boot RAM already holds the source's image and page tables: the image is not written
    again, the window mappings are the source's and the registers are where the source's vCPU
    stopped.

    Accessors return None / False when the access came back as KVM_EXIT_MMIO, i.e. no memslot
    backs that GPA. GPAs must lie below ``2**phys_bits``; writes into the image and misaligned
    64-bit accesses raise ValueError. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self, vm: KvmVm, boot: GuestMemory, *, cpl3: bool = True, state: bytes | None = None
    ) -> None:
        saved = _decode_state(state) if state is not None else None
        if saved is not None:
            cpl3 = saved.cpl3
        self.cpl3 = cpl3
        self._fd = -1
        self._run: mmap.mmap | None = None
        self._commands = self._runs = self._mmio_exits = 0
        self._run_seconds = 0.0
        self._run_cpu_seconds = 0.0
        section = boot.address_space.find(0)
        if section is None or section.end < IMAGE_SIZE:
            raise VcpuError(
                f"the probe vCPU needs RAM at guest-physical [0, {IMAGE_SIZE:#x}) in "
                f"'{boot.address_space.name}' for its image"
            )
        self._mem: RamBlock = section.backend
        self._mem_offset = section.offset
        self._space = boot.address_space
        self._fault: GuestMemoryFault | None = None
        #: 2 MiB frame number -> virtual address of its window mapping.
        self._frames: dict[int, int] = {}
        cpuid = vm.supported_cpuid()
        self._phys_bits = _phys_bits(cpuid)
        try:
            self._fd = vm.create_vcpu(0)
        except KvmError as e:
            if e.errno == errno.EEXIST:
                raise VcpuError(
                    "this VM already has a probe vCPU: KVM keeps a vCPU and its shadow page "
                    "tables until the VM is closed, so the image cannot be rebuilt",
                    e.errno,
                ) from e
            raise VcpuError(str(e), e.errno) from e
        try:
            self._run = mmap.mmap(
                self._fd, vm.vcpu_mmap_size(), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
            )
            # Once only: KVM refuses KVM_SET_CPUID2 after the first KVM_RUN.
            self._ioctl(KVM_SET_CPUID2, pack_cpuid2(cpuid), "KVM_SET_CPUID2")
            if saved is None:
                self._mem.write(self._mem_offset, _boot_image(cpl3))
            self._sregs = self._initial_sregs()
            regs = dict.fromkeys(REGS_FIELDS, 0)
            regs.update(
                rsp=_STACK3_TOP if cpl3 else _STACK0_TOP,
                rip=_CODE,
                rflags=_RFLAGS_CPL3 if cpl3 else _RFLAGS_CPL0,
            )
            self._regs = REGS_STRUCT.pack(*regs.values())
            if saved is None:
                self._set_state()
            else:
                for n, frame in enumerate(saved.frames):
                    self._frames[frame] = _WINDOW_VA + n * FRAME_SIZE
                self._ioctl(KVM_SET_SREGS, bytearray(saved.sregs), "KVM_SET_SREGS")
                self._ioctl(KVM_SET_REGS, bytearray(saved.regs), "KVM_SET_REGS")
        except BaseException:
            self.close()
            raise

    # -- public API ----------------------------------------------------------------------------

    @property
    def phys_bits(self) -> int:
        """The guest's MAXPHYADDR: GPAs must be below ``2**phys_bits``."""
        return self._phys_bits

    @property
    def fault(self) -> GuestMemoryFault | None:
        """The guest memory fault the vCPU stopped on; None while it can run."""
        return self._fault

    def reset(self) -> None:
        """Put the vCPU back at the start of its command loop, as a reset does; clears
        :attr:`fault`. Memory and the window mappings stay."""
        self._finish_exit()
        self._set_state()
        self._fault = None

    @property
    def stats(self) -> VcpuStats:
        """A snapshot of the counters."""
        return VcpuStats(
            self._commands, self._runs, self._mmio_exits, self._run_seconds, self._run_cpu_seconds
        )

    def read8(self, gpa: int) -> int | None:
        """The byte at ``gpa`` as the guest reads it; None if it is not RAM (MMIO exit)."""
        return self._run_batch([(_OP_READ8, self._va(gpa, 1, False), 0)], [gpa])[0]

    def read64(self, gpa: int) -> int | None:
        """The 64-bit word at 8-byte aligned ``gpa``; None if it is not RAM (MMIO exit)."""
        return self._run_batch([(_OP_READ64, self._va(gpa, 8, False), 0)], [gpa])[0]

    def write8(self, gpa: int, value: int) -> bool:
        """Store a byte at ``gpa`` from the guest; False if it is not RAM (MMIO exit)."""
        if not 0 <= value <= 0xFF:
            raise ValueError(f"write8 value {value:#x} does not fit in a byte")
        return self._run_batch([(_OP_WRITE8, self._va(gpa, 1, True), value)], [gpa])[0] is not None

    def write64(self, gpa: int, value: int) -> bool:
        """Store a 64-bit word at 8-byte aligned ``gpa``; False if it is not RAM (MMIO exit)."""
        if not 0 <= value <= _U64:
            raise ValueError(f"write64 value {value:#x} does not fit in 64 bits")
        va = self._va(gpa, 8, True)
        return self._run_batch([(_OP_WRITE64, va, value)], [gpa])[0] is not None

    def kvm_stats(self) -> dict[str, int]:
        """The vCPU's KVM binary statistics (``pf_fixed``: page faults KVM fixed, ...)."""
        if self._fd < 0:
            raise VcpuError("the probe vCPU is closed", errno.EBADF)
        return read_stats(self._fd)

    def read64_many(self, gpas: Sequence[int]) -> list[int | None]:
        """:meth:`read64` of every GPA, in order, in one KVM_RUN per :data:`MAX_BATCH`."""
        ops = [(_OP_READ64, self._va(gpa, 8, False), 0) for gpa in gpas]
        return self._run_batch(ops, gpas)

    def write64_many(self, words: Sequence[tuple[int, int]]) -> bool:
        """:meth:`write64` of every ``(gpa, value)``, batched; False if any hit MMIO."""
        for _gpa, value in words:
            if not 0 <= value <= _U64:
                raise ValueError(f"write64 value {value:#x} does not fit in 64 bits")
        ops = [(_OP_WRITE64, self._va(gpa, 8, True), value) for gpa, value in words]
        return all(r is not None for r in self._run_batch(ops, [gpa for gpa, _ in words]))

    def is_ram(self, gpa: int) -> bool:
        """Whether a guest read of ``gpa`` reaches memory rather than exiting as MMIO.

        Probing can allocate host memory: a read of an untouched page of private anonymous
        memory maps the shared zero page (nothing allocated), but a read of a memfd (shmem) or
        other shared file page allocates it. Probing a mapped but unplugged block of a memfd
        backend thus populates it; a GPA that no memslot backs costs nothing.
        """
        return self.read8(gpa) is not None

    def write_pattern(self, gpa: int, length: int, seed: int) -> bool:
        """Write the :func:`pattern_words` of ``[gpa, gpa + length)`` from the guest.

        All words go in one KVM_RUN per :data:`MAX_BATCH` words. Returns False if any of
        them hit MMIO (so the range is not all RAM). The first write to a block makes the host
        allocate its memory: on transparent-huge-page backed RAM that is 2 MiB per block, which
        costs milliseconds per block here at CPL3 (about 35 us per block without THP).
        """
        words = pattern_words(gpa, length, seed)
        ops = [(_OP_WRITE64, self._va(addr, 8, True), value) for addr, value in words]
        results = self._run_batch(ops, [addr for addr, _ in words])
        return all(r is not None for r in results)

    def check_pattern(self, gpa: int, length: int, seed: int) -> bool:
        """Whether the guest reads back the :func:`pattern_words` of the range (all RAM)."""
        words = pattern_words(gpa, length, seed)
        ops = [(_OP_READ64, self._va(addr, 8, False), 0) for addr, _ in words]
        results = self._run_batch(ops, [addr for addr, _ in words])
        return all(r == value for r, (_, value) in zip(results, words, strict=True))

    def save_state(self) -> bytes:
        """The vCPU as a migration carries it: its registers (KVM_GET_REGS, KVM_GET_SREGS),
        its ring and the 2 MiB frames its window maps, in mapping order (the page tables
        themselves are in boot RAM, which travels). Call it while the vCPU is not running."""
        regs = bytearray(REGS_STRUCT.size)
        self._ioctl(KVM_GET_REGS, regs, "KVM_GET_REGS")
        sregs = bytearray(SREGS_SIZE)
        self._ioctl(KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        frames = list(self._frames)
        head = _STATE_HEAD.pack(int(self.cpl3), len(frames))
        return bytes(regs) + bytes(sregs) + head + struct.pack(f"<{len(frames)}Q", *frames)

    def close(self) -> None:
        """Close the vCPU fd and unmap its ``kvm_run``; safe to call more than once.

        The kernel keeps the vCPU itself until the VM is closed.
        """
        if self._run is not None:
            self._run.close()
            self._run = None
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __del__(self) -> None:
        # Safety net for vCPUs that were never closed.
        self.close()

    # -- address translation ------------------------------------------------------------------

    def _va(self, gpa: int, size: int, write: bool) -> int:
        """The guest-virtual address of ``gpa``, mapping its frame on first use."""
        if gpa < 0 or gpa + size > 1 << self._phys_bits:
            raise ValueError(
                f"gpa {gpa:#x} is outside the guest's {self._phys_bits}-bit physical space"
            )
        if gpa % size:
            raise ValueError(f"gpa {gpa:#x} is not aligned to the {size}-byte access")
        if write and gpa < IMAGE_SIZE:
            raise ValueError(f"gpa {gpa:#x} is inside the probe's image [0, {IMAGE_SIZE:#x})")
        frame, offset = divmod(gpa, FRAME_SIZE)
        va = self._frames.get(frame)
        if va is None:
            va = self._map_frame(frame)
        return va + offset

    def _map_frame(self, frame: int) -> int:
        n = len(self._frames)
        if n >= MAX_FRAMES:
            raise VcpuError(
                f"the probe vCPU has mapped its maximum of {MAX_FRAMES} distinct 2 MiB frames; "
                "entries are never reused (shadow paging would not see the change)"
            )
        pd_index, slot = divmod(n, 512)
        table = _P | _RW | (_US if self.cpl3 else 0)
        pd = _POOL + pd_index * _PAGE
        if slot == 0:
            # A fresh page directory: clear it before it becomes reachable.
            self._write(pd, bytes(_PAGE))
            self._write(_PDPT_WINDOW + 8 * pd_index, struct.pack("=Q", pd | table))
        self._write(pd + 8 * slot, struct.pack("=Q", frame * FRAME_SIZE | table | _PS))
        va = _WINDOW_VA + n * FRAME_SIZE
        self._frames[frame] = va
        return va

    # -- running the guest --------------------------------------------------------------------

    def _run_batch(
        self, ops: Sequence[tuple[int, int, int]], gpas: Sequence[int]
    ) -> list[int | None]:
        """Run commands ``(op, va, value)`` in order; each result (reads: the value, writes: 0)
        or None where the access exited as MMIO."""
        results: list[int | None] = []
        for start in range(0, len(ops), MAX_BATCH):
            chunk = ops[start : start + MAX_BATCH]
            results.extend(self._run_chunk(chunk, gpas[start : start + MAX_BATCH]))
        return results

    def _run_chunk(
        self, ops: Sequence[tuple[int, int, int]], gpas: Sequence[int]
    ) -> list[int | None]:
        if self._fault is not None:
            raise VcpuError(
                f"the probe vCPU stopped on a guest memory fault at gpa {self._fault.gpa:#x}; "
                "reset it first",
                errno.EFAULT,
            )
        run = self._kvm_run()
        n = len(ops)
        buf = bytearray((n + 1) * _ENTRY.size)  # zero-filled: the last entry is the end marker
        for i, op in enumerate(ops):
            _ENTRY.pack_into(buf, i * _ENTRY.size, *op)
        self._write(_ENTRIES, buf)
        mmio: set[int] = set()
        while True:
            try:
                self._enter(run)
            except VcpuError as e:
                if e.errno != errno.EFAULT:
                    raise
                raise self._stop(self._efault(run, ops, gpas)) from e
            reason = RUN_EXIT_REASON.unpack_from(run, RUN_EXIT_REASON_OFFSET)[0]
            if reason == KVM_EXIT_MMIO:
                index = self._current_command()
                phys, _data, size, is_write = RUN_MMIO.unpack_from(run, RUN_EXIT_OFFSET)
                if self._space.find(phys) is not None:
                    # RAM that KVM's emulator could not read: out of reach, not MMIO.
                    if not is_write:
                        run[RUN_MMIO_DATA_OFFSET : RUN_MMIO_DATA_OFFSET + 8] = b"\xff" * 8
                    self._finish_exit()
                    access = "write" if is_write else "read"
                    raise self._stop(self._memory_fault(phys, size, access, "mmio-exit"))
                if not 0 <= index < n or phys != gpas[index]:
                    self._fail(f"MMIO exit at gpa {phys:#x} that no probe command asked for")
                mmio.add(index)
                self._mmio_exits += 1
                if not is_write:
                    run[RUN_MMIO_DATA_OFFSET : RUN_MMIO_DATA_OFFSET + 8] = b"\xff" * 8
            elif reason == KVM_EXIT_IO:
                direction, size, port, _count, data_offset = RUN_IO.unpack_from(
                    run, RUN_EXIT_OFFSET
                )
                if direction == KVM_EXIT_IO_OUT and size == 1 and port == _PORT_DONE:
                    break
                if direction == KVM_EXIT_IO_OUT and size == 1 and port == _PORT_EXCEPTION:
                    self._guest_exception(run[data_offset], gpas)
                self._fail(f"unexpected port I/O exit (port {port:#x})")
            elif reason != KVM_EXIT_INTR:
                self._fail(_describe_exit(run, reason))
        self._commands += n
        values = [v for _op, _va, v in _ENTRY.iter_unpack(self._read(_ENTRIES, n * _ENTRY.size))]
        return [None if i in mmio else v for i, v in enumerate(values)]

    def _enter(self, run: mmap.mmap) -> None:
        while True:
            self._runs += 1
            t0, cpu0 = time.perf_counter(), time.thread_time()
            try:
                fcntl.ioctl(self._fd, KVM_RUN, 0)
                return
            except InterruptedError:
                # A signal arrived; KVM leaves the vCPU ready to run again.
                continue
            except OSError as e:
                raise VcpuError(f"KVM_RUN failed: {e.strerror}", _errno(e)) from e
            finally:
                self._run_seconds += time.perf_counter() - t0
                self._run_cpu_seconds += time.thread_time() - cpu0

    def _efault(
        self, run: mmap.mmap, ops: Sequence[tuple[int, int, int]], gpas: Sequence[int]
    ) -> GuestMemoryFault:
        """What KVM_RUN's EFAULT was about: KVM_EXIT_MEMORY_FAULT's page where the kernel
        fills it, else the command the guest was running (see the module docstring)."""
        index = self._current_command()
        command: tuple[int, int, str] | None = None
        if 0 <= index < len(ops):
            op = ops[index][0]
            size = 8 if op in (_OP_READ64, _OP_WRITE64) else 1
            command = (gpas[index], size, "write" if op in (_OP_WRITE8, _OP_WRITE64) else "read")
        cause = efault_cause(run, command)
        if cause is None:
            self._set_state()
            raise VcpuError("KVM_RUN failed: Bad address, outside any probe command", errno.EFAULT)
        return self._memory_fault(*cause)

    def _memory_fault(
        self, gpa: int, size: int, access: str | None, detected_by: str
    ) -> GuestMemoryFault:
        what = f"a {access}" if access is not None else "an access"
        return GuestMemoryFault(
            f"guest memory fault: {what} of {size} byte(s) at gpa {gpa:#x} reached host memory "
            f"that is out of reach (detected by {detected_by}); the vCPU stops",
            gpa=gpa,
            size=size,
            access=access,
            detected_by=detected_by,
        )

    def _stop(self, fault: GuestMemoryFault) -> GuestMemoryFault:
        # The vCPU stays where it faulted (as QEMU keeps it for a dump) until reset().
        self._fault = fault
        return fault

    def _current_command(self) -> int:
        va = struct.unpack("=Q", self._read(_CTRL + 8, 8))[0]
        return int((va - _ENTRIES) // _ENTRY.size)

    def _guest_exception(self, vector: int, gpas: Sequence[int]) -> NoReturn:
        """Decode the exception frame the stub left on the ring-0 stack, reset, raise."""
        self._finish_exit()
        regs = bytearray(REGS_STRUCT.size)
        self._ioctl(KVM_GET_REGS, regs, "KVM_GET_REGS")
        rsp = REGS_STRUCT.unpack(regs)[REGS_FIELDS.index("rsp")]
        sregs = bytearray(SREGS_SIZE)
        self._ioctl(KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        cr2 = struct.unpack_from(
            "=Q", sregs, SREGS_CONTROL_OFFSET + 8 * SREGS_CONTROL.index("cr2")
        )[0]
        frame = self._read(rsp, 16)
        error_code: int | None = None
        if vector in _ERROR_CODE_VECTORS:
            error_code, rip = struct.unpack("=QQ", frame)
        else:
            rip = struct.unpack_from("=Q", frame)[0]
        index = self._current_command()
        where = f" while probing gpa {gpas[index]:#x}" if 0 <= index < len(gpas) else ""
        name = _VECTOR_NAMES.get(vector, "exception")
        code = f", error code {error_code:#x}" if error_code is not None else ""
        self._set_state()
        raise VcpuError(
            f"guest exception {name} (vector {vector}){code} at rip {rip:#x}, cr2 {cr2:#x}{where}",
            vector=vector,
            error_code=error_code,
            rip=rip,
            cr2=cr2,
        )

    def _fail(self, message: str) -> NoReturn:
        """Put the vCPU back at its start and raise :class:`VcpuError`."""
        self._finish_exit()
        self._set_state()
        raise VcpuError(f"probe vCPU: {message}")

    def _finish_exit(self) -> None:
        # KVM completes an exit's I/O on the next KVM_RUN; with immediate_exit it does only
        # that, so the registers read or set next are consistent.
        run = self._kvm_run()
        run[1] = 1
        try:
            fcntl.ioctl(self._fd, KVM_RUN, 0)
        except InterruptedError:
            pass
        except OSError as e:
            raise VcpuError(f"KVM_RUN (immediate exit) failed: {e.strerror}", _errno(e)) from e
        finally:
            run[1] = 0

    # -- state and plumbing --------------------------------------------------------------------

    def _initial_sregs(self) -> bytes:
        sregs = bytearray(SREGS_SIZE)
        self._ioctl(KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        dpl = 3 if self.cpl3 else 0
        code = (_SEL_CODE3 if self.cpl3 else _SEL_CODE0, _SEG_CODE, 0, 1)  # sel, type, db, l
        data = (_SEL_DATA3 if self.cpl3 else _SEL_DATA0, _SEG_DATA, 1, 0)
        for i, name in enumerate(SREGS_SEGMENTS):
            offset = i * SEGMENT_STRUCT.size
            seg = list(SEGMENT_STRUCT.unpack_from(sregs, offset))
            # base, limit, selector, type, present, dpl, db, s, l, g, avl, unusable, padding
            if name == "tr":
                seg = [_TSS, _TSS_LIMIT, _SEL_TSS, _SEG_TSS_BUSY, 1, 0, 0, 0, 0, 0, 0, 0, 0]
            elif name == "ldt":
                seg[2], seg[3], seg[11] = 0, _SEG_LDT, 1
            else:
                sel, typ, db, long_mode = code if name == "cs" else data
                seg = [0, 0xFFFFFFFF, sel, typ, 1, dpl, db, 1, long_mode, 1, 0, 0, 0]
            SEGMENT_STRUCT.pack_into(sregs, offset, *seg)
        DTABLE_STRUCT.pack_into(sregs, SREGS_GDT_OFFSET, _GDT, 7 * 8 - 1, 0, 0, 0)
        DTABLE_STRUCT.pack_into(sregs, SREGS_IDT_OFFSET, _IDT, 32 * 16 - 1, 0, 0, 0)
        layout = f"={len(SREGS_CONTROL)}Q"
        current = struct.unpack_from(layout, sregs, SREGS_CONTROL_OFFSET)
        control = dict(zip(SREGS_CONTROL, current, strict=True))
        control.update(cr0=_CR0, cr3=_PML4, cr4=_CR4, efer=_EFER)
        struct.pack_into(layout, sregs, SREGS_CONTROL_OFFSET, *control.values())
        return bytes(sregs)

    def _set_state(self) -> None:
        self._ioctl(KVM_SET_SREGS, bytearray(self._sregs), "KVM_SET_SREGS")
        self._ioctl(KVM_SET_REGS, bytearray(self._regs), "KVM_SET_REGS")

    def _ioctl(self, request: int, buf: bytearray, what: str) -> None:
        if self._fd < 0:
            raise VcpuError("the probe vCPU is closed", errno.EBADF)
        try:
            fcntl.ioctl(self._fd, request, buf, True)
        except OSError as e:
            raise VcpuError(f"{what} failed: {e.strerror}", _errno(e)) from e

    def _kvm_run(self) -> mmap.mmap:
        if self._run is None:
            raise VcpuError("the probe vCPU is closed", errno.EBADF)
        return self._run

    def _write(self, gpa: int, data: bytes | bytearray) -> None:
        self._mem.write(self._mem_offset + gpa, bytes(data))

    def _read(self, gpa: int, length: int) -> bytes:
        return self._mem.read(self._mem_offset + gpa, length)


def efault_cause(
    run: mmap.mmap | bytes | bytearray, command: tuple[int, int, str] | None
) -> tuple[int, int, str | None, str] | None:
    """``(gpa, size, access, detected_by)`` of the access behind KVM_RUN's EFAULT.

    ``run`` is the vCPU's ``kvm_run``; ``command`` the ``(gpa, size, access)`` the guest was
    running, if any. A kernel that fills KVM_EXIT_MEMORY_FAULT names the page (the access is
    the command's if it lies there); this one leaves exit reason 0, so the command is the
    answer. None: nothing says what failed.
    """
    reason = RUN_EXIT_REASON.unpack_from(run, RUN_EXIT_REASON_OFFSET)[0]
    if reason == KVM_EXIT_MEMORY_FAULT:
        _flags, gpa, size = RUN_MEMORY_FAULT.unpack_from(run, RUN_EXIT_OFFSET)
        inside = command is not None and gpa <= command[0] < gpa + size
        access = command[2] if command is not None and inside else None
        return gpa, size, access, "memory-fault-exit"
    if command is None:
        return None
    return (*command, "efault")


#: Version of :meth:`ProbeVcpu.save_state`'s format (a migration's STATE section version).
STATE_VERSION = 1
_STATE_HEAD = struct.Struct("<II")


@dataclass(frozen=True)
class _SavedState:
    regs: bytes
    sregs: bytes
    cpl3: bool
    frames: list[int]


def _decode_state(state: bytes) -> _SavedState:
    """Parse :meth:`ProbeVcpu.save_state`'s bytes, raising :class:`VcpuError` if malformed."""
    fixed = REGS_STRUCT.size + SREGS_SIZE
    if len(state) < fixed + _STATE_HEAD.size:
        raise VcpuError(f"probe vCPU state of {len(state)} bytes is too short")
    cpl3, count = _STATE_HEAD.unpack_from(state, fixed)
    if (
        cpl3 not in (0, 1)
        or count > MAX_FRAMES
        or len(state) != fixed + _STATE_HEAD.size + 8 * count
    ):
        raise VcpuError(
            f"probe vCPU state is malformed ({len(state)} bytes, ring flag {cpl3}, {count} frames)"
        )
    frames = list(struct.unpack_from(f"<{count}Q", state, fixed + _STATE_HEAD.size))
    if len(set(frames)) != count:
        raise VcpuError("probe vCPU state maps a frame twice")
    return _SavedState(
        state[: REGS_STRUCT.size], state[REGS_STRUCT.size : fixed], bool(cpl3), frames
    )


def _describe_exit(run: mmap.mmap, reason: int) -> str:
    if reason == KVM_EXIT_INTERNAL_ERROR:
        suberror, _ndata = RUN_INTERNAL.unpack_from(run, RUN_EXIT_OFFSET)
        return f"KVM internal error (suberror {suberror})"
    names = {
        KVM_EXIT_HLT: "HLT",
        KVM_EXIT_SHUTDOWN: "SHUTDOWN (triple fault)",
        KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY",
    }
    return f"unexpected exit {names.get(reason, str(reason))}"
