"""A faithful model of KVM's memslot table, with the interface of :class:`memslots.kvm.vm.KvmVm`.

It enforces the rules of ``kvm_set_memory_region()`` (and the x86 extras) and fails with the
errno the kernel would return, so code and tests can use it wherever ``/dev/kvm`` is missing
and compare it with the real thing where it is not. It also tracks what the slots cost the
kernel (:func:`memslots.kvm.cost.slot_metadata_bytes`).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import Enum
from typing import NoReturn

from memslots.closing import Closing
from memslots.errors import KvmError
from memslots.kvm.abi import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_MAX_NR_PAGES,
    KVM_MEM_READONLY,
    KVM_MEM_SLOTS_NUM,
    KVM_MEM_V1_FLAGS,
    KVM_X86_QUIRK_SLOT_ZAP_ALL,
    KVM_X86_QUIRKS2_MASK_6_18,
    PAGE_SHIFT,
    PAGE_SIZE,
    SHADOW_MAX_GPA_BITS,
    X86_64_USER_ADDR_END,
    X86_USER_MEM_SLOTS,
    UserspaceMemoryRegion,
    memslot_error,
    reject_guest_memfd,
    split_slot,
)
from memslots.kvm.cost import slot_metadata_bytes
from memslots.kvm.dirty import (
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    bitmap_bytes,
    dirty_log_error,
    full_bitmap,
)
from memslots.kvm.mmu import MmuConfig
from memslots.sizes import align_down

# Host address the model's probe slot pretends to use; any page-aligned user address works.
_SCRATCH_UADDR = 0x7F00_0000_0000


@dataclass(frozen=True)
class ModelSlot:
    """One memslot in the model's table; ``slot`` is the full ``as_id << 16 | id`` value."""

    slot: int
    gpa: int
    size: int
    uaddr: int
    flags: int

    @property
    def end(self) -> int:
        """First guest-physical address after the slot."""
        return self.gpa + self.size


class _Change(Enum):
    # The kernel's enum kvm_mr_change, plus the no-op of identical parameters.
    CREATE = "create"
    DELETE = "delete"
    MOVE = "move"
    FLAGS_ONLY = "flags-only"
    NONE = "none"


class KvmModel(Closing):
    """KVM's memslot rules without a kernel (see the module docstring).

    ``max_memslots`` is KVM_CAP_NR_MEMSLOTS (32764 on x86 since Linux 5.12); ``mmu`` defaults
    to shadow paging like this host; ``nr_address_spaces`` is 2 for a kernel with SMM.
    ``max_gpa_bits`` bounds guest-physical addresses (52 under shadow paging; pass the host's
    MAXPHYADDR to model TDP). Slot id ``max_memslots - 1`` of address space 0 is reserved for
    :meth:`probe_mapped`, as on the real VM. ``creates`` and ``deletes`` count successful
    creations and deletions, however requested (probes excluded).

    ``disableable_quirks`` is what KVM_CHECK_EXTENSION(KVM_CAP_DISABLE_QUIRKS2) reports (Linux
    6.18's x86 mask by default; 0 models a kernel before 6.12, which always zaps everything on
    a delete). ``slot_zap_all=False`` disables KVM_X86_QUIRK_SLOT_ZAP_ALL at creation where it
    is offered, as :class:`~memslots.kvm.vm.KvmVm` does.

    Dirty logging follows the kernel too: a bitmap is allocated when a slot gets
    KVM_MEM_LOG_DIRTY_PAGES, kept across MOVE and FLAGS_ONLY, freed when logging goes off;
    ``dirty_log_caps`` is what KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 reports (0: a kernel without
    it). The model cannot see guest writes: :meth:`mark_dirty` stands in for them.
    """

    is_real = False

    def __init__(
        self,
        max_memslots: int = X86_USER_MEM_SLOTS,
        mmu: MmuConfig | None = None,
        nr_address_spaces: int = 1,
        *,
        max_gpa_bits: int = SHADOW_MAX_GPA_BITS,
        slot_zap_all: bool = False,
        disableable_quirks: int = KVM_X86_QUIRKS2_MASK_6_18,
        dirty_log_caps: int = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET,
    ) -> None:
        if not 1 <= max_memslots <= KVM_MEM_SLOTS_NUM:
            raise ValueError(f"max_memslots {max_memslots} is outside 1..{KVM_MEM_SLOTS_NUM}")
        if nr_address_spaces < 1:
            raise ValueError(f"nr_address_spaces {nr_address_spaces} must be at least 1")
        self.max_memslots = max_memslots
        self.mmu = mmu if mmu is not None else MmuConfig()
        self.nr_address_spaces = nr_address_spaces
        self._max_gfn = (1 << (max_gpa_bits - PAGE_SHIFT)) - 1
        self._slots: dict[int, ModelSlot] = {}
        self._closed = False
        self.creates = 0
        self.deletes = 0
        self._dirty_caps = dirty_log_caps
        #: The KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 options enabled (0: GET_DIRTY_LOG clears).
        self.dirty_log_protect = 0
        #: Dirty bitmaps of the slots with KVM_MEM_LOG_DIRTY_PAGES, one bit per page.
        self._dirty: dict[int, bytearray] = {}
        self.disableable_quirks = disableable_quirks
        self.disabled_quirks = 0
        if not slot_zap_all and disableable_quirks & KVM_X86_QUIRK_SLOT_ZAP_ALL:
            self.disable_quirks(KVM_X86_QUIRK_SLOT_ZAP_ALL)

    def disable_quirks(self, mask: int) -> None:
        """KVM_CAP_DISABLE_QUIRKS2: EINVAL for a quirk that is not offered, as the kernel."""
        if self._closed:
            raise KvmError("the model VM is closed", errno.EBADF)
        if mask & ~self.disableable_quirks:
            raise KvmError(
                f"KVM_CAP_DISABLE_QUIRKS2: quirks {mask & ~self.disableable_quirks:#x} cannot be "
                f"disabled here (offered: {self.disableable_quirks:#x})",
                errno.EINVAL,
            )
        self.disabled_quirks |= mask

    @property
    def slot_zap_all(self) -> bool:
        """Whether a memslot delete zaps every shadow page of the VM (see KvmVm)."""
        return not self.disabled_quirks & KVM_X86_QUIRK_SLOT_ZAP_ALL

    def slots(self) -> dict[int, ModelSlot]:
        """A copy of the slot table, keyed and ordered by the full slot number."""
        return dict(sorted(self._slots.items()))

    def metadata_bytes(self) -> int:
        """VmallocUsed bytes the current slots cost (x2 per slot with ``mmu.smm``).

        With SMM, QEMU maps RAM into both address spaces, so each slot is charged twice; slots
        created explicitly in address space 1 are charged on top of that.
        """
        return sum(
            slot_metadata_bytes(s.gpa, s.size, self.mmu, bool(s.flags & KVM_MEM_LOG_DIRTY_PAGES))
            for s in self._slots.values()
        )

    def set_memory_region(
        self, slot: int, gpa: int, size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        """Create, move or change the flags of memslot ``slot``, with the kernel's errors.

        KVM_MEM_GUEST_MEMFD is refused with ValueError, as on the real VM.
        """
        reject_guest_memfd(flags)
        region = UserspaceMemoryRegion(slot, flags, gpa, size, userspace_addr)
        self._count(self._apply(region, "set_memory_region"))

    def delete_memory_region(self, slot: int) -> None:
        """Delete memslot ``slot``; EINVAL if it does not exist."""
        self._count(self._apply(UserspaceMemoryRegion(slot, 0, 0, 0, 0), "delete_memory_region"))

    def probe_mapped(self, gpa: int) -> bool:
        """Whether a slot of address space 0 covers ``gpa``, decided as the real probe does.

        A 4 KiB scratch slot is created at ``gpa``'s page and removed again; EEXIST means
        mapped. Errors the real probe would hit (scratch slot in use, gpa beyond the
        guest-physical limit) are raised the same way.
        """
        page = align_down(gpa, PAGE_SIZE)
        scratch = self.max_memslots - 1
        if scratch in self._slots:
            # The kernel sees a modification of the existing slot with another size/address.
            raise memslot_error(
                "probe_mapped",
                scratch,
                page,
                PAGE_SIZE,
                errno.EINVAL,
                f"the scratch slot {scratch} is in use",
            )
        try:
            self._apply(UserspaceMemoryRegion(scratch, 0, page, PAGE_SIZE, _SCRATCH_UADDR), "probe")
        except KvmError as e:
            if e.errno == errno.EEXIST:
                return True
            raise
        del self._slots[scratch]
        return False

    # -- dirty logging (memslots.kvm.dirty.DirtyLogBackend) ------------------------------------

    def dirty_log_caps(self) -> int:
        """What KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 reports (the constructor's ``dirty_log_caps``)."""
        self._check_open("KVM_CHECK_EXTENSION")
        return self._dirty_caps

    def enable_dirty_log_protect(self, initially_set: bool = False) -> None:
        """Enable manual protection (and INITIALLY_SET); EINVAL for options the caps lack."""
        self._check_open("KVM_ENABLE_CAP")
        args = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        if initially_set:
            args |= KVM_DIRTY_LOG_INITIALLY_SET
        if not self._dirty_caps or args & ~self._dirty_caps:
            raise KvmError(
                f"KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2, {args:#x}) failed: Invalid argument",
                errno.EINVAL,
            )
        self.dirty_log_protect = args

    def get_dirty_log(self, slot: int, npages: int) -> bytearray:
        """The slot's bitmap; cleared (re-protected) unless manual protection is enabled.

        ``npages`` must be the slot's size in pages: the kernel cannot check it (it copies the
        slot's bitmap into a buffer the caller sized), so the model raises ValueError.
        """
        bitmap = self._dirty_bitmap("KVM_GET_DIRTY_LOG", slot)
        if npages != self._slots[slot].size >> PAGE_SHIFT:
            raise ValueError(
                f"get_dirty_log: memslot {slot} has {self._slots[slot].size >> PAGE_SHIFT} "
                f"pages, not {npages}"
            )
        out = bytearray(bitmap)
        if not self.dirty_log_protect & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            bitmap[:] = bytes(len(bitmap))
        return out

    def clear_dirty_log(
        self, slot: int, first_page: int, num_pages: int, bitmap: bytes | bytearray
    ) -> None:
        """Clear the pages of ``bitmap`` in ``[first_page, +num_pages)``, with the kernel's
        checks (EINVAL for an unaligned or out-of-range range)."""
        what = "KVM_CLEAR_DIRTY_LOG"
        if len(bitmap) < bitmap_bytes(num_pages):
            raise ValueError(
                f"clear_dirty_log: {num_pages} pages need a {bitmap_bytes(num_pages)}-byte bitmap"
            )
        self._check_dirty_slot_id(what, slot)
        if first_page % 64:
            raise dirty_log_error(what, slot, errno.EINVAL, "first_page is not a multiple of 64")
        live = self._dirty_bitmap(what, slot)
        npages = self._slots[slot].size >> PAGE_SHIFT
        if (
            first_page > npages
            or num_pages > npages - first_page
            or (num_pages < npages - first_page and num_pages % 64)
        ):
            raise dirty_log_error(
                what,
                slot,
                errno.EINVAL,
                f"pages [{first_page}, +{num_pages}) are not a 64-aligned range of the slot's "
                f"{npages}",
            )
        lo, hi = first_page // 8, first_page // 8 + bitmap_bytes(num_pages)
        mask = int.from_bytes(bytes(bitmap[: hi - lo]), "little")
        cur = int.from_bytes(live[lo:hi], "little")
        live[lo:hi] = (cur & ~mask).to_bytes(hi - lo, "little")

    def mark_dirty(self, gpa: int, length: int, as_id: int = 0) -> int:
        """Stand in for guest writes to ``[gpa, gpa + length)``: set the dirty bits of every
        logged page there (as a vCPU's stores would). Returns the pages marked; pages of slots
        without logging, and addresses no slot covers, are skipped."""
        if length <= 0:
            return 0
        first_gfn, end_gfn = gpa >> PAGE_SHIFT, (gpa + length - 1 >> PAGE_SHIFT) + 1
        marked = 0
        for slot, bitmap in self._dirty.items():
            s = self._slots[slot]
            if split_slot(slot)[0] != as_id:
                continue
            lo = max(first_gfn, s.gpa >> PAGE_SHIFT) - (s.gpa >> PAGE_SHIFT)
            hi = min(end_gfn, s.end >> PAGE_SHIFT) - (s.gpa >> PAGE_SHIFT)
            if lo >= hi:
                continue
            value = int.from_bytes(bitmap, "little") | (((1 << (hi - lo)) - 1) << lo)
            bitmap[:] = value.to_bytes(len(bitmap), "little")
            marked += hi - lo
        return marked

    def dirty_logging(self, slot: int) -> bool:
        """Whether ``slot`` has a dirty bitmap (KVM_MEM_LOG_DIRTY_PAGES)."""
        return slot in self._dirty

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise KvmError(f"{what} failed: the model VM is closed", errno.EBADF)

    def _check_dirty_slot_id(self, what: str, slot: int) -> None:
        self._check_open(what)
        as_id, slot_id = split_slot(slot)
        if as_id >= self.nr_address_spaces or slot_id >= self.max_memslots:
            raise dirty_log_error(what, slot, errno.EINVAL)

    def _dirty_bitmap(self, what: str, slot: int) -> bytearray:
        self._check_dirty_slot_id(what, slot)
        bitmap = self._dirty.get(slot)
        if bitmap is None:
            raise dirty_log_error(what, slot, errno.ENOENT)
        return bitmap

    def close(self) -> None:
        """Forget all slots; later operations fail with EBADF like a closed VM. Idempotent."""
        self._closed = True
        self._slots.clear()
        self._dirty.clear()

    def _count(self, change: _Change) -> None:
        # A size-0 set_memory_region is a deletion too, as in the kernel.
        if change is _Change.CREATE:
            self.creates += 1
        elif change is _Change.DELETE:
            self.deletes += 1

    def _apply(self, region: UserspaceMemoryRegion, what: str) -> _Change:
        """Validate and apply one KVM_SET_USER_MEMORY_REGION2, in the kernel's order."""
        slot, flags = region.slot, region.flags
        gpa, size, uaddr = region.guest_phys_addr, region.memory_size, region.userspace_addr

        def fail(err: int, reason: str) -> NoReturn:
            raise memslot_error(what, slot, gpa, size, err, reason)

        if self._closed:
            fail(errno.EBADF, "the model VM is closed")
        as_id, slot_id = split_slot(slot)
        if slot_id >= self.max_memslots:
            fail(errno.EINVAL, f"slot id {slot_id} is not below KVM_CAP_NR_MEMSLOTS")
        if flags & ~KVM_MEM_V1_FLAGS:
            fail(errno.EINVAL, f"flags {flags:#x} has bits other than LOG_DIRTY_PAGES|READONLY")
        if size % PAGE_SIZE or gpa % PAGE_SIZE:
            fail(errno.EINVAL, "gpa and size must be multiples of 4 KiB")
        if uaddr % PAGE_SIZE:
            fail(errno.EINVAL, f"userspace_addr {uaddr:#x} is not page-aligned")
        if uaddr + size > X86_64_USER_ADDR_END:
            fail(errno.EINVAL, f"userspace_addr {uaddr:#x} + size is not a user address range")
        if as_id >= self.nr_address_spaces:
            fail(errno.EINVAL, f"address space {as_id} does not exist")
        if gpa + size >= 1 << 64:
            fail(errno.EINVAL, "gpa + size wraps around 2^64")
        npages = size >> PAGE_SHIFT
        if npages > KVM_MEM_MAX_NR_PAGES:
            fail(errno.EINVAL, "a memslot is limited to 2^31-1 pages")

        old = self._slots.get(slot)
        if size == 0:
            if old is None:
                fail(errno.EINVAL, "the slot does not exist")
            del self._slots[slot]
            self._dirty.pop(slot, None)
            return _Change.DELETE
        if old is None:
            change = _Change.CREATE
        else:
            if uaddr != old.uaddr or size != old.size or (flags ^ old.flags) & KVM_MEM_READONLY:
                fail(
                    errno.EINVAL,
                    f"existing slot (gpa {old.gpa:#x}, size {old.size:#x}, uaddr "
                    f"{old.uaddr:#x}) cannot change its size, host address or READONLY",
                )
            if gpa != old.gpa:
                change = _Change.MOVE
            elif flags != old.flags:
                change = _Change.FLAGS_ONLY
            else:
                return _Change.NONE

        if change in (_Change.CREATE, _Change.MOVE):
            for other in self._slots.values():
                if (
                    other.slot != slot
                    and split_slot(other.slot)[0] == as_id
                    and other.gpa < gpa + size
                    and gpa < other.end
                ):
                    fail(
                        errno.EEXIST,
                        f"overlaps memslot {other.slot} [{other.gpa:#x}, {other.end:#x})",
                    )
            # x86 kvm_arch_prepare_memory_region(), after the overlap check.
            if (gpa >> PAGE_SHIFT) + npages - 1 > self._max_gfn:
                fail(errno.EINVAL, "the slot ends beyond the guest-physical address limit")
        self._slots[slot] = ModelSlot(slot, gpa, size, uaddr, flags)
        # kvm_prepare_memory_region(): an existing bitmap is reused, else allocated.
        if not flags & KVM_MEM_LOG_DIRTY_PAGES:
            self._dirty.pop(slot, None)
        elif slot not in self._dirty:
            initially_set = self.dirty_log_protect & KVM_DIRTY_LOG_INITIALLY_SET
            self._dirty[slot] = (
                full_bitmap(npages) if initially_set else bytearray(bitmap_bytes(npages))
            )
        return change
