"""The real accelerator: a KVM VM on ``/dev/kvm`` whose memslots are set with ``ioctl``.

The VM itself creates no vCPU; it offers memslot operations plus the few system queries and
:meth:`KvmVm.create_vcpu` that :class:`memslots.kvm.vcpu.ProbeVcpu` builds on.
:meth:`KvmVm.probe_mapped` reads the kernel's slot table back by trying to create a scratch
slot, which the kernel refuses with EEXIST exactly when another slot covers the address.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import mmap
import os

from memslots.closing import Closing
from memslots.errors import KvmError, KvmUnavailableError
from memslots.kvm.abi import (
    DEFAULT_NR_MEMSLOTS,
    KVM_API_VERSION,
    KVM_CAP_DISABLE_QUIRKS2,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_CAP_MULTI_ADDRESS_SPACE,
    KVM_CAP_NR_MEMSLOTS,
    KVM_CAP_USER_MEMORY2,
    KVM_CHECK_EXTENSION,
    KVM_CLEAR_DIRTY_LOG,
    KVM_CREATE_VCPU,
    KVM_ENABLE_CAP,
    KVM_GET_API_VERSION,
    KVM_GET_DIRTY_LOG,
    KVM_GET_STATS_FD,
    KVM_GET_VCPU_MMAP_SIZE,
    KVM_SET_USER_MEMORY_REGION,
    KVM_SET_USER_MEMORY_REGION2,
    KVM_X86_QUIRK_SLOT_ZAP_ALL,
    PAGE_SIZE,
    STATS_DESC,
    STATS_HEADER,
    CpuidEntry,
    UserspaceMemoryRegion,
    memslot_error,
    pack_enable_cap,
    reject_guest_memfd,
)
from memslots.kvm.dirty import (
    CLEAR_DIRTY_LOG_STRUCT,
    DIRTY_LOG_STRUCT,
    KVM_DIRTY_LOG_INITIALLY_SET,
    KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    bitmap_bytes,
    dirty_log_error,
)
from memslots.kvm.host import host_info
from memslots.kvm.mmu import MmuConfig
from memslots.kvm.system import (
    KVM_PATH,
    create_vm_fd,
    errno_of,
    kvm_ioctl,
    open_system,
    supported_cpuid,
)
from memslots.sizes import align_down


class KvmVm(Closing):
    """A VM on ``/dev/kvm`` (type 0, the default x86 VM) used to set and probe memslots.

    Attributes: ``max_memslots`` (KVM_CAP_NR_MEMSLOTS, 32 if the kernel reports 0, as QEMU
    does), ``nr_address_spaces`` (KVM_CAP_MULTI_ADDRESS_SPACE, at least 1), ``has_region2``
    (KVM_CAP_USER_MEMORY2) and ``mmu`` (the host's MMU mode, ``HostInfo.mmu``, passed in or else
    the detected host's, with this VM's own SMM setting). Slot id
    ``max_memslots - 1`` of address space 0 is reserved for :meth:`probe_mapped`. Errors raise
    :class:`KvmError` with the kernel's errno; a missing or unusable ``/dev/kvm`` raises
    :class:`KvmUnavailableError`.

    ``slot_zap_all=False`` (the default, ``-accel kvm,slot-zap-all=off``) disables KVM's
    SLOT_ZAP_ALL quirk at creation where KVM_CAP_DISABLE_QUIRKS2 offers it (Linux 6.12+), so a
    memslot delete zaps only that slot's mappings instead of every shadow page of the VM;
    ``True`` keeps the kernel's default. :attr:`slot_zap_all` says what is in effect.
    """

    is_real = True

    def __init__(
        self, path: str = KVM_PATH, *, slot_zap_all: bool = False, mmu: MmuConfig | None = None
    ) -> None:
        self.path = path
        self._vm_fd = -1
        self._scratch: mmap.mmap | None = None
        self._vcpus = 0
        #: Quirks this VM has disabled through KVM_CAP_DISABLE_QUIRKS2.
        self.disabled_quirks = 0
        sys_fd = open_system(path)
        try:
            version = kvm_ioctl(sys_fd, KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
            if version != KVM_API_VERSION:
                raise KvmUnavailableError(
                    f"{path} speaks KVM API version {version}, expected {KVM_API_VERSION}"
                )
            self._vm_fd = create_vm_fd(sys_fd)
        finally:
            # The VM fd holds its own reference to KVM; the system fd is not needed any more.
            os.close(sys_fd)
        try:
            self.max_memslots: int = (
                self.check_extension(KVM_CAP_NR_MEMSLOTS) or DEFAULT_NR_MEMSLOTS
            )
            # 0 means the kernel was built without multiple address spaces (no SMM).
            self.nr_address_spaces: int = max(1, self.check_extension(KVM_CAP_MULTI_ADDRESS_SPACE))
            self.has_region2: bool = self.check_extension(KVM_CAP_USER_MEMORY2) > 0
            self.mmu: MmuConfig = dataclasses.replace(
                mmu if mmu is not None else host_info().mmu, smm=self.nr_address_spaces > 1
            )
            #: KVM_CHECK_EXTENSION(KVM_CAP_DISABLE_QUIRKS2): the quirks that can be disabled.
            self.disableable_quirks: int = self.check_extension(KVM_CAP_DISABLE_QUIRKS2)
            if not slot_zap_all and self.disableable_quirks & KVM_X86_QUIRK_SLOT_ZAP_ALL:
                self.disable_quirks(KVM_X86_QUIRK_SLOT_ZAP_ALL)
        except BaseException:
            self.close()
            raise

    @property
    def vm_fd(self) -> int:
        """The VM file descriptor; :class:`KvmError` (EBADF) once closed."""
        if self._vm_fd < 0:
            raise KvmError("the KVM VM is closed", errno.EBADF)
        return self._vm_fd

    def fileno(self) -> int:
        """The VM file descriptor, so the VM can be passed where a file is expected."""
        return self.vm_fd

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd: 0 if unsupported, else a capability-specific value."""
        return kvm_ioctl(self.vm_fd, KVM_CHECK_EXTENSION, cap, f"KVM_CHECK_EXTENSION({cap})")

    def disable_quirks(self, mask: int) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_DISABLE_QUIRKS2, mask): disable these quirks for this VM.

        Only before the first vCPU: KVM's documentation asks for it, and a quirk that changes
        how shadow pages are zapped must not change under a running vCPU (this kernel would
        accept it later; we refuse with EBUSY). A quirk the kernel does not offer is EINVAL,
        as the kernel answers.
        """
        if self._vcpus:
            raise KvmError(
                "KVM_CAP_DISABLE_QUIRKS2: quirks must be disabled before any vCPU is created",
                errno.EBUSY,
            )
        if mask & ~self.disableable_quirks:
            raise KvmError(
                f"KVM_CAP_DISABLE_QUIRKS2: quirks {mask & ~self.disableable_quirks:#x} cannot be "
                f"disabled here (offered: {self.disableable_quirks:#x})",
                errno.EINVAL,
            )
        self._enable_cap(KVM_CAP_DISABLE_QUIRKS2, "KVM_CAP_DISABLE_QUIRKS2", mask)
        self.disabled_quirks |= mask

    @property
    def slot_zap_all(self) -> bool:
        """Whether a memslot delete zaps every shadow page of the VM (the quirk is in effect).

        True unless this VM disabled KVM_X86_QUIRK_SLOT_ZAP_ALL; kernels before 6.12 have no
        such quirk and always zap everything.
        """
        return not self.disabled_quirks & KVM_X86_QUIRK_SLOT_ZAP_ALL

    def stats(self) -> dict[str, int]:
        """The VM's KVM binary statistics (e.g. ``mmu_shadow_zapped``), see :func:`read_stats`."""
        return read_stats(self.vm_fd)

    def set_memory_region(
        self, slot: int, gpa: int, size: int, userspace_addr: int, flags: int = 0
    ) -> None:
        """Create, move or change the flags of memslot ``slot`` (``as_id << 16 | id``).

        Uses KVM_SET_USER_MEMORY_REGION2 when the kernel has it, else the v1 ioctl.
        KVM_MEM_GUEST_MEMFD is refused with ValueError (no guest_memfd can be passed).
        """
        reject_guest_memfd(flags)
        region = UserspaceMemoryRegion(slot, flags, gpa, size, userspace_addr)
        self._set_region(region, "set_memory_region")

    def delete_memory_region(self, slot: int) -> None:
        """Delete memslot ``slot``; EINVAL if it does not exist."""
        self._set_region(UserspaceMemoryRegion(slot, 0, 0, 0, 0), "delete_memory_region")

    def probe_mapped(self, gpa: int) -> bool:
        """Whether a memslot of address space 0 covers ``gpa``, asked of the kernel itself.

        Creates a 4 KiB scratch slot (id ``max_memslots - 1``) over a private host page at the
        page containing ``gpa``: EEXIST means an existing slot covers it; success means none
        does, and the scratch slot is deleted again.
        """
        page = align_down(gpa, PAGE_SIZE)
        scratch = self.max_memslots - 1
        region = UserspaceMemoryRegion(scratch, 0, page, PAGE_SIZE, self._scratch_addr())
        try:
            self._ioctl_region(region)
        except OSError as e:
            if e.errno == errno.EEXIST:
                return True
            reason = None
            if e.errno == errno.EINVAL:
                reason = (
                    f"the scratch slot {scratch} is in use, or gpa is beyond the guest-physical "
                    "limit"
                )
            raise memslot_error(
                self._op("probe_mapped"), scratch, page, PAGE_SIZE, errno_of(e), reason
            ) from e
        self._set_region(UserspaceMemoryRegion(scratch, 0, 0, 0, 0), "probe_mapped (delete)")
        return False

    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes to mmap from a vCPU fd (``kvm_run`` and its data)."""
        fd = open_system(self.path)
        try:
            return kvm_ioctl(fd, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        finally:
            os.close(fd)

    def supported_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID: every CPUID leaf KVM can give a guest, as KVM fills it in."""
        return supported_cpuid(self.path)

    def create_vcpu(self, vcpu_id: int) -> int:
        """KVM_CREATE_VCPU: a new vCPU fd (the caller closes it).

        The kernel keeps the vCPU until the VM is closed, even after its fd is closed, so an id
        can be created only once per VM (EEXIST otherwise).
        """
        fd = kvm_ioctl(self.vm_fd, KVM_CREATE_VCPU, vcpu_id, f"KVM_CREATE_VCPU({vcpu_id})")
        self._vcpus += 1
        return fd

    # -- dirty logging (memslots.kvm.dirty.DirtyLogBackend) ------------------------------------

    def dirty_log_caps(self) -> int:
        """KVM_CHECK_EXTENSION(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): 0, or the options' mask."""
        return self.check_extension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)

    def enable_dirty_log_protect(self, initially_set: bool = False) -> None:
        """KVM_ENABLE_CAP(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2); EINVAL if the kernel lacks it."""
        args = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        if initially_set:
            args |= KVM_DIRTY_LOG_INITIALLY_SET
        self._enable_cap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, "MANUAL_DIRTY_LOG_PROTECT2", args)

    def _enable_cap(self, cap: int, name: str, arg: int) -> None:
        """KVM_ENABLE_CAP(cap, arg) on the VM fd; :class:`KvmError` with the kernel's errno."""
        buf = bytearray(pack_enable_cap(cap, arg))
        try:
            fcntl.ioctl(self.vm_fd, KVM_ENABLE_CAP, buf, True)
        except OSError as e:
            raise KvmError(
                f"KVM_ENABLE_CAP({name}, {arg:#x}) failed: {e.strerror}", errno_of(e)
            ) from e

    def get_dirty_log(self, slot: int, npages: int) -> bytearray:
        """KVM_GET_DIRTY_LOG of ``slot``, which must have exactly ``npages`` pages (the kernel
        copies that many bits; the VM does not know its slots' sizes)."""
        bitmap = bytearray(max(8, bitmap_bytes(npages)))
        holder = (ctypes.c_char * len(bitmap)).from_buffer(bitmap)
        arg = DIRTY_LOG_STRUCT.pack(slot, 0, ctypes.addressof(holder))
        try:
            fcntl.ioctl(self.vm_fd, KVM_GET_DIRTY_LOG, arg)
        except OSError as e:
            raise dirty_log_error("KVM_GET_DIRTY_LOG", slot, errno_of(e)) from e
        finally:
            del holder
        return bitmap[: bitmap_bytes(npages)]

    def clear_dirty_log(
        self, slot: int, first_page: int, num_pages: int, bitmap: bytes | bytearray
    ) -> None:
        """KVM_CLEAR_DIRTY_LOG: clear the pages of ``bitmap`` in ``[first_page, +num_pages)``."""
        need = bitmap_bytes(num_pages)
        if len(bitmap) < need:
            # The kernel would read past the buffer.
            raise ValueError(f"clear_dirty_log: {num_pages} pages need a {need}-byte bitmap")
        buf = bytearray(bitmap[:need]) or bytearray(8)
        holder = (ctypes.c_char * len(buf)).from_buffer(buf)
        arg = CLEAR_DIRTY_LOG_STRUCT.pack(slot, num_pages, first_page, ctypes.addressof(holder))
        try:
            fcntl.ioctl(self.vm_fd, KVM_CLEAR_DIRTY_LOG, arg)
        except OSError as e:
            raise dirty_log_error("KVM_CLEAR_DIRTY_LOG", slot, errno_of(e)) from e
        finally:
            del holder

    def close(self) -> None:
        """Close the VM (the kernel frees all its memslots); safe to call more than once."""
        if self._vm_fd >= 0:
            fd, self._vm_fd = self._vm_fd, -1
            os.close(fd)
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None

    def __del__(self) -> None:
        # Safety net for VMs that were never closed; a leaked VM pins all its metadata.
        self.close()

    def _op(self, what: str) -> str:
        ioctl = "KVM_SET_USER_MEMORY_REGION2" if self.has_region2 else "KVM_SET_USER_MEMORY_REGION"
        return f"{what} ({ioctl})"

    def _ioctl_region(self, region: UserspaceMemoryRegion) -> None:
        if self.has_region2:
            fcntl.ioctl(self.vm_fd, KVM_SET_USER_MEMORY_REGION2, region.pack2())
        else:
            fcntl.ioctl(self.vm_fd, KVM_SET_USER_MEMORY_REGION, region.pack())

    def _set_region(self, region: UserspaceMemoryRegion, what: str) -> None:
        try:
            self._ioctl_region(region)
        except OSError as e:
            raise memslot_error(
                self._op(what), region.slot, region.guest_phys_addr, region.memory_size, errno_of(e)
            ) from e

    def _scratch_addr(self) -> int:
        if self._scratch is None:
            self._scratch = mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        # The temporary ctypes view is dropped at once, so the mmap can still be closed later.
        return ctypes.addressof(ctypes.c_char.from_buffer(self._scratch))


def read_stats(fd: int) -> dict[str, int]:
    """KVM_GET_STATS_FD on a VM or vCPU fd: every single-value statistic by name.

    Histograms (statistics of more than one value) are left out. :class:`KvmError` if the
    kernel has no binary statistics (before Linux 5.14).
    """
    stats_fd = kvm_ioctl(fd, KVM_GET_STATS_FD, 0, "KVM_GET_STATS_FD")
    try:
        header = os.pread(stats_fd, STATS_HEADER.size, 0)
        _flags, name_size, num_desc, _id, desc_offset, data_offset = STATS_HEADER.unpack(header)
        stride = STATS_DESC.size + name_size
        descs = os.pread(stats_fd, stride * num_desc, desc_offset)
        wanted: list[tuple[str, int]] = []
        end = 0
        for i in range(num_desc):
            _f, _exp, size, offset, _bucket = STATS_DESC.unpack_from(descs, i * stride)
            raw = descs[i * stride + STATS_DESC.size : (i + 1) * stride]
            if size == 1:
                wanted.append((raw.split(b"\0", 1)[0].decode(), offset))
            end = max(end, offset + 8 * size)
        data = os.pread(stats_fd, end, data_offset)
        return {name: int.from_bytes(data[o : o + 8], "little") for name, o in wanted}
    finally:
        os.close(stats_fd)
