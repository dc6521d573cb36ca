"""``/dev/kvm``'s system file descriptor: whether KVM is there, and what it offers before any VM
object of ours exists (KVM_CAP_NR_MEMSLOTS, KVM_GET_SUPPORTED_CPUID, SMM).

These are the probes :func:`memslots.kvm.host.detect_host` runs once; :class:`memslots.kvm.vm.KvmVm`
shares the helpers that open the system fd, create a VM fd and turn errors into
:class:`~memslots.errors.KvmError`.
"""

from __future__ import annotations

import errno
import fcntl
import os

from memslots.errors import KvmError, KvmUnavailableError
from memslots.kvm.abi import (
    DEFAULT_NR_MEMSLOTS,
    KVM_API_VERSION,
    KVM_CAP_MULTI_ADDRESS_SPACE,
    KVM_CAP_NR_MEMSLOTS,
    KVM_CHECK_EXTENSION,
    KVM_CREATE_VM,
    KVM_GET_API_VERSION,
    KVM_GET_SUPPORTED_CPUID,
    CpuidEntry,
    pack_cpuid2,
    unpack_cpuid2,
)

#: Where KVM lives.
KVM_PATH = "/dev/kvm"


def kvm_available(path: str = KVM_PATH) -> bool:
    """Whether ``path`` can be opened read-write and speaks KVM API version 12."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, KVM_GET_API_VERSION, 0) == KVM_API_VERSION
    except OSError:
        return False
    finally:
        os.close(fd)


def read_max_memslots(path: str = KVM_PATH) -> int:
    """KVM_CAP_NR_MEMSLOTS from the system fd, without creating a VM (32 if it reports 0).

    Raises :class:`KvmUnavailableError` if ``path`` cannot be opened.
    """
    fd = open_system(path)
    try:
        nr = kvm_ioctl(
            fd, KVM_CHECK_EXTENSION, KVM_CAP_NR_MEMSLOTS, "KVM_CHECK_EXTENSION(NR_MEMSLOTS)"
        )
    finally:
        os.close(fd)
    return nr or DEFAULT_NR_MEMSLOTS


def supported_cpuid(path: str = KVM_PATH) -> list[CpuidEntry]:
    """KVM_GET_SUPPORTED_CPUID on the system fd: every CPUID leaf KVM can give a guest."""
    fd = open_system(path)
    try:
        nent = 128
        while True:
            buf = pack_cpuid2([CpuidEntry(0, 0, 0, 0, 0, 0, 0)] * nent)
            try:
                fcntl.ioctl(fd, KVM_GET_SUPPORTED_CPUID, buf, True)
            except OSError as e:
                # E2BIG: the kernel has more entries than we made room for.
                if e.errno == errno.E2BIG and nent < 4096:
                    nent *= 2
                    continue
                raise KvmError(f"KVM_GET_SUPPORTED_CPUID failed: {e.strerror}", errno_of(e)) from e
            return unpack_cpuid2(buf)
    finally:
        os.close(fd)


def probe_smm(path: str = KVM_PATH) -> bool:
    """Whether a throw-away VM has KVM_CAP_MULTI_ADDRESS_SPACE > 1 (False without ``path``).

    Asked of a VM, not the system fd: the VM's answer is the one its memslots obey.
    """
    try:
        sys_fd = open_system(path)
    except KvmUnavailableError:
        return False
    try:
        vm_fd = create_vm_fd(sys_fd)
    except KvmError:
        return False
    finally:
        os.close(sys_fd)
    try:
        return kvm_ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_MULTI_ADDRESS_SPACE, "SMM probe") > 1
    except KvmError:
        return False
    finally:
        os.close(vm_fd)


def errno_of(e: OSError) -> int:
    """The errno of a failed system call."""
    # Every failed syscall sets errno; EIO only stands in for the type checker's None case.
    return e.errno if e.errno is not None else errno.EIO


def open_system(path: str) -> int:
    """Open KVM's system fd; :class:`KvmUnavailableError` if that is impossible."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise KvmUnavailableError(f"cannot open {path}: {e.strerror}", errno_of(e)) from e


def kvm_ioctl(fd: int, request: int, arg: int, what: str) -> int:
    """An ioctl with an integer argument; failures raise :class:`KvmError` naming ``what``."""
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as e:
        raise KvmError(f"{what} failed: {e.strerror}", errno_of(e)) from e


def create_vm_fd(sys_fd: int) -> int:
    """KVM_CREATE_VM (type 0, the default x86 VM) on the system fd."""
    # KVM_CREATE_VM can be interrupted while the kernel sets up the VM; QEMU retries too.
    while True:
        try:
            return fcntl.ioctl(sys_fd, KVM_CREATE_VM, 0)
        except InterruptedError:
            continue
        except OSError as e:
            raise KvmError(f"KVM_CREATE_VM (type 0) failed: {e.strerror}", errno_of(e)) from e
