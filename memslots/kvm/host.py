"""The host, described once: CPU vendor, physical address bits, KVM's MMU mode and memslot limit,
page, THP and huge page sizes, and vhost-kernel's limit.

Everything memslots decides that depends on the host (the pc layout, the default block size,
planned huge page backends, the kernel's metadata per memslot, the memslot
budget, whether ``-accel auto`` gets the kernel) reads it from one frozen :class:`HostInfo`,
detected once per process by :func:`host_info` and passed down as plain values: no other module
probes the host. A user can describe another host (``plan --cpu-vendor intel --phys-bits 46``)
with :meth:`HostInfo.override`; every field records where its value came from.

Sources, in order of preference:

* CPU vendor and physical address bits: CPUID leaves 0 and 0x80000008 as KVM reports them
  (``KVM_GET_SUPPORTED_CPUID``) where ``/dev/kvm`` is usable, else ``/proc/cpuinfo``. QEMU's
  ``-cpu host`` takes both from the host's CPUID, which these agree with.
* MMU mode: the ``kvm_intel``/``kvm_amd``/``kvm`` module parameters in sysfs, SMM from
  ``KVM_CAP_MULTI_ADDRESS_SPACE`` (see :func:`detect_host_mmu`).
* KVM's memslot limit: ``KVM_CAP_NR_MEMSLOTS`` (32764, x86's value since Linux 5.12, without KVM).
* THP size: ``/sys/kernel/mm/transparent_hugepage/hpage_pmd_size`` as QEMU probes it; the
  default huge page size: ``Hugepagesize`` in ``/proc/meminfo``.
* vhost-kernel: ``/sys/module/vhost/parameters/max_mem_regions`` as QEMU reads it (64 without),
  and whether ``/dev/vhost-net`` exists.

:func:`open_vm_meter` opens the per-VM kernel-memory meter (:mod:`memslots.host.kmem`) after
the host is probed, so that the probe's throw-away VM is not measured.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import struct
from dataclasses import dataclass
from typing import Any

from memslots.errors import KvmError, OptionError
from memslots.host.kmem import KmemMeter, open_meter
from memslots.host.pages import (
    HostPages,
    host_page_size,
    probe_thp_size,
    read_default_huge_page_size,
)
from memslots.host.vhost import VHOST_NET_PATH, vhost_kernel_memslots_limit
from memslots.kvm.abi import X86_USER_MEM_SLOTS
from memslots.kvm.mmu import MmuConfig, read_host_mmu
from memslots.kvm.system import (
    KVM_PATH,
    kvm_available,
    probe_smm,
    read_max_memslots,
    supported_cpuid,
)
from memslots.sizes import MiB

#: Vendors QEMU tells apart for the pc layout: only AMD vCPUs move RAM above 1 TiB.
CPU_VENDORS = ("amd", "intel", "other")
_VENDOR_IDS = {"AuthenticAMD": "amd", "GenuineIntel": "intel"}
#: QEMU's host_cpu_phys_bits() when CPUID has no leaf 0x80000008.
_DEFAULT_PHYS_BITS = 36
#: The architectural range of MAXPHYADDR on x86-64.
MIN_PHYS_BITS, MAX_PHYS_BITS = 32, 52
#: The kernel's default huge page size on x86-64, when /proc/meminfo does not say.
_DEFAULT_HUGE_PAGE_SIZE = 2 * MiB


@dataclass(frozen=True)
class HostInfo:
    """What memslots needs to know about the host it runs on (or plans for).

    ``sources`` maps each field name to where its value came from ("kvm-cpuid",
    "/proc/cpuinfo", "sysfs", "override", "default", ...).
    """

    cpu_vendor: str
    phys_bits: int
    mmu: MmuConfig
    kvm: bool
    kvm_max_memslots: int
    thp_size: int
    page_size: int
    huge_page_size: int
    #: The vhost module's ``max_mem_regions`` as QEMU reads it (vhost-kernel's memslot limit).
    vhost_kernel_max_mem_regions: int
    #: Whether ``/dev/vhost-net`` exists (else vhost-kernel is modelled).
    vhost_net: bool
    sources: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.cpu_vendor not in CPU_VENDORS:
            raise OptionError(
                f"unknown CPU vendor '{self.cpu_vendor}' (expected one of {', '.join(CPU_VENDORS)})"
            )
        if not MIN_PHYS_BITS <= self.phys_bits <= MAX_PHYS_BITS:
            raise OptionError(
                f"physical address bits {self.phys_bits} outside x86-64's range "
                f"{MIN_PHYS_BITS}..{MAX_PHYS_BITS}"
            )

    @property
    def pages(self) -> HostPages:
        """The page sizes memory backends and virtio-mem need."""
        return HostPages(self.page_size, self.thp_size, self.huge_page_size)

    def source(self, field: str) -> str:
        """Where ``field``'s value came from."""
        return dict(self.sources).get(field, "default")

    def override(self, **values: Any) -> HostInfo:
        """A copy with the given fields replaced (None values are ignored), marked "override"."""
        given = {k: v for k, v in values.items() if v is not None}
        if not given:
            return self
        sources = dict(self.sources)
        sources.update((k, "override") for k in given)
        return dataclasses.replace(self, **given, sources=tuple(sorted(sources.items())))

    def to_json(self) -> dict[str, Any]:
        """The host as ``plan --json`` states it: each value with its source."""
        return {
            "cpu_vendor": self.cpu_vendor,
            "phys_bits": self.phys_bits,
            "mmu": self.mmu.describe(),
            "smm": self.mmu.smm,
            "kvm": self.kvm,
            "kvm_max_memslots": self.kvm_max_memslots,
            "thp_size": self.thp_size,
            "page_size": self.page_size,
            "huge_page_size": self.huge_page_size,
            "vhost_kernel_max_mem_regions": self.vhost_kernel_max_mem_regions,
            "vhost_net": self.vhost_net,
            "sources": dict(self.sources),
        }

    def describe(self) -> str:
        """One line for people, e.g. ``intel CPU, 48 physical address bits, shadow paging``."""
        return (
            f"{self.cpu_vendor} CPU, {self.phys_bits} physical address bits, {self.mmu.describe()}"
        )


def detect_host_mmu(
    *,
    sysfs_root: str = "/sys/module",
    kvm_path: str = KVM_PATH,
    smm: bool | None = None,
    boot_config: str | None = None,
) -> MmuConfig:
    """The host's MMU configuration (:func:`memslots.kvm.mmu.read_host_mmu`); ``smm=None``
    asks a throw-away VM for KVM_CAP_MULTI_ADDRESS_SPACE > 1 (False without ``/dev/kvm``)."""
    if smm is None:
        smm = probe_smm(kvm_path)
    return read_host_mmu(smm=smm, sysfs_root=sysfs_root, boot_config=boot_config)


def _cpuinfo(path: str) -> tuple[str | None, int | None]:
    """``vendor_id`` and the physical bits of ``address sizes`` from ``/proc/cpuinfo``."""
    vendor = bits = None
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "vendor_id" and vendor is None:
                    vendor = _VENDOR_IDS.get(value, "other")
                elif key == "address sizes" and bits is None:
                    word = value.split(" ", 1)[0]
                    bits = int(word) if word.isdigit() else None
                if vendor is not None and bits is not None:
                    break
    except OSError:
        pass
    return vendor, bits


def _kvm_cpuid(kvm_path: str) -> tuple[str | None, int | None]:
    """Vendor and MAXPHYADDR from the CPUID KVM reports (leaves 0 and 0x80000008)."""
    try:
        entries = supported_cpuid(kvm_path)
    except KvmError:
        return None, None
    leaves = {e.function: e for e in entries if e.index == 0}
    vendor = bits = None
    if 0 in leaves:
        e = leaves[0]
        vendor_id = struct.pack("<III", e.ebx, e.edx, e.ecx).decode("ascii", "replace")
        vendor = _VENDOR_IDS.get(vendor_id, "other")
    if 0x80000008 in leaves:
        bits = leaves[0x80000008].eax & 0xFF or None
    elif 0x80000000 in leaves:
        bits = _DEFAULT_PHYS_BITS
    return vendor, bits


def detect_host(
    *,
    kvm_path: str = KVM_PATH,
    cpuinfo: str = "/proc/cpuinfo",
    sysfs_root: str = "/sys",
    meminfo: str = "/proc/meminfo",
    vhost_net_path: str = VHOST_NET_PATH,
) -> HostInfo:
    """Probe the host (see the module docstring for the sources). Never raises for a missing
    source: it falls back to the next one, and finally to x86-64 defaults marked "default"."""
    sources: dict[str, str] = {}
    kvm = kvm_available(kvm_path)
    vendor = bits = None
    if kvm:
        vendor, bits = _kvm_cpuid(kvm_path)
        if vendor is not None:
            sources["cpu_vendor"] = "kvm-cpuid"
        if bits is not None:
            sources["phys_bits"] = "kvm-cpuid"
    if vendor is None or bits is None:
        info_vendor, info_bits = _cpuinfo(cpuinfo)
        if vendor is None and info_vendor is not None:
            vendor, sources["cpu_vendor"] = info_vendor, cpuinfo
        if bits is None and info_bits is not None:
            bits, sources["phys_bits"] = info_bits, cpuinfo
    max_memslots = X86_USER_MEM_SLOTS
    if kvm:
        try:
            max_memslots = read_max_memslots(kvm_path)
            sources["kvm_max_memslots"] = "KVM_CAP_NR_MEMSLOTS"
        except KvmError:
            pass
    huge_page_size = read_default_huge_page_size(meminfo)
    if huge_page_size is not None:
        sources["huge_page_size"] = meminfo
    sources["mmu"] = "sysfs"
    sources["thp_size"] = "sysfs"
    sources["page_size"] = "mmap.PAGESIZE"
    max_mem_regions = os.path.join(sysfs_root, "module", "vhost", "parameters", "max_mem_regions")
    if os.path.exists(max_mem_regions):
        sources["vhost_kernel_max_mem_regions"] = "sysfs"
    sources["vhost_net"] = vhost_net_path
    return HostInfo(
        cpu_vendor=vendor or "other",
        phys_bits=bits or _DEFAULT_PHYS_BITS,
        mmu=detect_host_mmu(sysfs_root=os.path.join(sysfs_root, "module"), kvm_path=kvm_path),
        kvm=kvm,
        kvm_max_memslots=max_memslots,
        thp_size=probe_thp_size(sysfs_root),
        page_size=host_page_size(),
        huge_page_size=huge_page_size or _DEFAULT_HUGE_PAGE_SIZE,
        vhost_kernel_max_mem_regions=vhost_kernel_memslots_limit(max_mem_regions),
        vhost_net=os.path.exists(vhost_net_path),
        sources=tuple(sorted(sources.items())),
    )


@functools.cache
def host_info() -> HostInfo:
    """This host, detected once per process."""
    return detect_host()


def open_vm_meter() -> KmemMeter:
    """A kernel-memory meter for a VM about to be created (see :func:`open_meter`).

    The host is probed first, outside the meter: the probe creates and closes a throw-away VM,
    and the kernel frees part of a closed VM some milliseconds later (after an RCU grace
    period), which would otherwise land in the first measurement.
    """
    host_info()
    return open_meter()
