"""Kernel memory measured per VM: a memory cgroup of our own, with VmallocUsed as the fallback.

KVM allocates a memslot's metadata with ``GFP_KERNEL_ACCOUNT``, which charges it to the memory
cgroup of the task that makes the allocation: the process that issues
``KVM_SET_USER_MEMORY_REGION``. A :class:`KmemMeter` therefore creates a child of this process's
memory cgroup, moves the process (the whole thread group) into it, and reads the child's kernel
memory counter: ``memory.kmem.usage_in_bytes`` on cgroup v1, the ``kernel`` line of
``memory.stat`` on cgroup v2. Only what this process (and processes it starts while the meter is
open) allocates lands there, so other VMs on the host cannot move the figure. On close the
process moves back and the child is removed; a child left behind by a process that was killed
is removed by the next meter opened under the same parent.

What the cgroup figure holds: every page charged with ``__GFP_ACCOUNT`` by our tasks while they
live in the child -- the data pages of every ``__vcalloc`` (memslot metadata), slab objects
such as ``struct kvm_memory_slot`` (byte-exact, but taken from a per-CPU stock one page at a
time), KVM's shadow page tables, MMU caches and vCPU structures, file and socket objects -- less
the page tables of our own address space (``VmPTE``, subtracted: they map the VMM's memory,
which has them with or without KVM, and they grow with every page the guest touches). What it
does not hold: vmalloc's own bookkeeping (the nested ``struct page *`` arrays, ``vm_struct``),
the kernel page tables of vmalloc mappings, and anything charged before the process moved in
(it stays with the cgroup that was charged, also when it is freed later). See
:func:`memslots.kvm.cost.slot_memcg_bytes` for the model of the memslot part.

Where no cgroup can be created (no permission, no memory controller, a cgroup v2 parent that
holds other processes, a read-only cgroupfs in a container) the meter falls back to
``VmallocUsed`` from ``/proc/meminfo``, which is system-wide: every figure carries its
:data:`source` (``"cgroup"`` or ``"system"``), and system figures may include other processes.

Meters nest (an inner meter's child lives inside the outer one's, and the kernel charges
parents too) and must be closed in the reverse order of opening, as ``with`` blocks do.
:func:`current_meter` is the innermost open meter of this process.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import statistics
import time
from dataclasses import dataclass
from typing import Literal

from memslots.closing import Closing
from memslots.errors import MeasurementError

log = logging.getLogger("memslots.host.kmem")

Source = Literal["cgroup", "system"]
CGROUP: Source = "cgroup"
SYSTEM: Source = "system"
#: What a system-wide figure is marked with, wherever it is shown.
SYSTEM_CAVEAT = "system-wide VmallocUsed: other processes on the host move it too"

PAGE_SIZE = 4096
MEMINFO = "/proc/meminfo"
#: Children we create are named ``memslots-<pid>-<n>``.
CHILD_PREFIX = "memslots-"
_CHILD_RE = re.compile(r"^memslots-(\d+)-\d+$")
#: cgroup v2 flushes memory.stat only after MEMCG_CHARGE_BATCH updates per online CPU.
_MEMCG_CHARGE_BATCH = 64
#: Kernel-memory items of cgroup v2's memory.stat, summed where there is no ``kernel`` line.
_V2_KERNEL_ITEMS = ("kernel_stack", "pagetables", "sec_pagetables", "percpu", "slab", "vmalloc")

_seq = itertools.count(1)
_open: list[KmemMeter] = []


class CgroupUnavailable(MeasurementError):
    """No memory cgroup of our own can be used here; the message says why."""


# -- figures -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelFigure:
    """A measured amount of kernel memory and where it comes from."""

    bytes: int
    source: Source

    @property
    def disturbed(self) -> bool:
        """Whether other processes can move this figure (system-wide sources)."""
        return self.source == SYSTEM


def source_label(source: str | None) -> str:
    """How tables and plots name a source: ``cgroup``, or ``system*`` (may be disturbed)."""
    if source is None:
        return "-"
    return f"{source}*" if source == SYSTEM else source


def source_footnote(source: str | None) -> str | None:
    """The footnote that goes with :func:`source_label`'s star, if any."""
    return f"* {SYSTEM_CAVEAT}" if source == SYSTEM else None


# -- where our memory cgroup is ------------------------------------------------------------------


@dataclass(frozen=True)
class CgroupLocation:
    """This process's memory cgroup: hierarchy version and its directory in the cgroupfs."""

    version: int
    path: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as ``\\ooo``."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts(mountinfo: str) -> list[tuple[str, str, str, str]]:
    """``(root, mount point, fstype, super options)`` of every mount in ``mountinfo``."""
    out = []
    with open(mountinfo) as f:
        for line in f:
            left, sep, right = line.partition(" - ")
            if not sep:
                continue
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 3:
                continue
            out.append((_unescape(fields[3]), _unescape(fields[4]), tail[0], tail[2]))
    return out


def _join(mount_point: str, mount_root: str, cgroup_path: str) -> str:
    """The directory of ``cgroup_path`` under a mount of the hierarchy's ``mount_root``."""
    rel = cgroup_path
    if mount_root != "/" and (rel == mount_root or rel.startswith(mount_root + "/")):
        rel = rel[len(mount_root) :]
    return os.path.join(mount_point, rel.lstrip("/"))


def locate_memory_cgroup(
    proc_cgroup: str = "/proc/self/cgroup", mountinfo: str = "/proc/self/mountinfo"
) -> CgroupLocation:
    """Find this process's memory cgroup: v1 if a v1 hierarchy has the memory controller, else v2.

    Raises :class:`CgroupUnavailable` when there is none (no controller, cgroupfs not mounted).
    """
    try:
        with open(proc_cgroup) as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f if line.strip()]
        mounts = _mounts(mountinfo)
    except OSError as exc:
        raise CgroupUnavailable(f"cannot read this process's cgroups: {exc}") from exc
    v1 = [p[2] for p in lines if len(p) == 3 and "memory" in p[1].split(",")]
    if v1:
        for root, point, fstype, opts in mounts:
            if fstype == "cgroup" and "memory" in opts.split(","):
                return CgroupLocation(1, _join(point, root, v1[0]))
        raise CgroupUnavailable("the cgroup v1 memory controller is not mounted here")
    v2 = [p[2] for p in lines if len(p) == 3 and p[0] == "0" and p[1] == ""]
    if not v2:
        raise CgroupUnavailable("this process is in no memory cgroup (no memory controller)")
    for root, point, fstype, _ in mounts:
        if fstype == "cgroup2":
            path = _join(point, root, v2[0])
            try:
                with open(os.path.join(path, "cgroup.controllers")) as f:
                    controllers = f.read().split()
            except OSError as exc:
                raise CgroupUnavailable(f"cannot read {path}/cgroup.controllers: {exc}") from exc
            if "memory" not in controllers:
                raise CgroupUnavailable(
                    f"the memory controller is not enabled for cgroup v2 {v2[0]}"
                )
            return CgroupLocation(2, path)
    raise CgroupUnavailable("cgroup v2 is not mounted here")


def _kmem_accounting_off(cmdline: str = "/proc/cmdline") -> bool:
    try:
        with open(cmdline) as f:
            return "cgroup.memory=nokmem" in f.read().split()
    except OSError:
        return False


# -- reading files -------------------------------------------------------------------------------


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    # cgroupfs takes one value per write(); open without truncation semantics that matter here.
    with open(path, "w") as f:
        f.write(text)


def read_vmalloc_used(path: str = MEMINFO) -> int:
    """``VmallocUsed`` of ``/proc/meminfo`` in bytes (system-wide)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("VmallocUsed:"):
                    return int(line.split()[1]) * 1024
    except OSError as exc:
        raise MeasurementError(f"cannot read {path}: {exc}") from exc
    raise MeasurementError(f"{path} has no VmallocUsed line")


def sample_vmalloc_used(samples: int = 5, path: str = MEMINFO) -> int:
    """Median of ``samples`` back-to-back readings of VmallocUsed, in bytes."""
    return int(statistics.median(read_vmalloc_used(path) for _ in range(samples)))


def own_page_table_bytes(status: str = "/proc/self/status") -> int:
    """``VmPTE`` of this process: the page tables of its own address space, in bytes."""
    try:
        with open(status) as f:
            for line in f:
                if line.startswith("VmPTE:"):
                    return int(line.split()[1]) * 1024
    except OSError as exc:
        raise MeasurementError(f"cannot read {status}: {exc}") from exc
    return 0


def _v2_kernel_bytes(stat_path: str) -> int:
    try:
        items = dict(line.split(None, 1) for line in _read(stat_path).splitlines() if line)
    except (OSError, ValueError) as exc:
        raise MeasurementError(f"cannot read {stat_path}: {exc}") from exc
    if "kernel" in items:
        return int(items["kernel"])
    return sum(int(items.get(k, 0)) for k in _V2_KERNEL_ITEMS)


# -- meters --------------------------------------------------------------------------------------


class KmemMeter(Closing):
    """Kernel memory attributable to this process, from the moment the meter opened.

    ``read()`` is the current counter, ``used()`` its rise since the meter opened. ``source``
    says what is read, ``summary`` says it in a few words, ``detail`` says where (the cgroup's
    path or, for the system fallback, why no cgroup could be used) and ``tolerance`` how many
    bytes a difference of two readings may be off by on a quiet process (``None``: unbounded,
    other processes move it).
    """

    source: Source
    detail: str
    summary: str
    tolerance: int | None

    def __init__(self) -> None:
        self.closed = False
        self.baseline = 0

    def read(self) -> int:
        """The counter now, in bytes."""
        raise NotImplementedError

    def used(self) -> int:
        """Bytes charged since the meter opened."""
        return self.read() - self.baseline

    def figure(self, nbytes: int) -> KernelFigure:
        """``nbytes`` (a difference of readings) with this meter's source."""
        return KernelFigure(nbytes, self.source)

    def describe(self) -> str:
        """One line for people: the source, where, and the caveat for system figures."""
        if self.source == SYSTEM:
            return f"{SYSTEM_CAVEAT} ({self.detail})"
        return f"per-VM, from {self.summary}"

    def _register(self) -> None:
        _open.append(self)
        self.baseline = self.read()

    def _unregister(self) -> None:
        if self in _open:
            if _open[-1] is not self:
                log.warning("kmem: meters closed out of order (%s)", self.detail)
            _open.remove(self)


class SystemMeter(KmemMeter):
    """``VmallocUsed`` from ``/proc/meminfo``: system-wide, the median of a few samples.

    ``register=False`` keeps it out of :func:`current_meter` (nothing to close then).
    """

    source = SYSTEM
    tolerance = None

    def __init__(
        self, reason: str = "asked for", *, meminfo: str = MEMINFO, register: bool = True
    ) -> None:
        super().__init__()
        self.detail = f"no per-VM cgroup: {reason}"
        self.summary = "VmallocUsed (system-wide)"
        self.meminfo = meminfo
        if register:
            self._register()
        else:
            self.baseline = self.read()

    def read(self) -> int:
        return sample_vmalloc_used(path=self.meminfo)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._unregister()


class CgroupMeter(KmemMeter):
    """A child memory cgroup holding this process, read through its kernel-memory counter.

    ``own=True`` (cgroup v2 only) reads the process's own cgroup without creating a child, used
    when this process is alone in it but cannot delegate the memory controller to a child.
    """

    source = CGROUP

    def __init__(
        self,
        loc: CgroupLocation,
        *,
        pid: int | None = None,
        own: bool = False,
        status: str = "/proc/self/status",
    ) -> None:
        super().__init__()
        self.status = status
        self.version = loc.version
        self.parent = loc.path
        self.pid = os.getpid() if pid is None else pid
        self.own = own
        self._enabled_memory = False
        self._moved = False
        ncpu = os.cpu_count() or 1
        # v1: the kmem counter is exact in pages; slab objects come from one per-CPU stock of
        # pre-charged bytes (< 1 page each) plus a per-objcg remainder (< 1 page). Another
        # cgroup's allocation on the same CPU flushes our stock: the same bound.
        self.tolerance = (ncpu + 1) * PAGE_SIZE
        if loc.version == 2:
            # v2: memory.stat is flushed only once this many page updates are pending.
            self.tolerance += _MEMCG_CHARGE_BATCH * ncpu * PAGE_SIZE
        if own:
            self.path = loc.path
            self.counter = os.path.join(self.path, "memory.stat")
            self.detail = f"cgroup v2 {self.path} (we are its only process), memory.stat kernel"
            self.summary = "our own cgroup v2 (we are its only process), memory.stat kernel"
            self._register()
            return
        _remove_stale_children(self.parent)
        self.path = os.path.join(self.parent, f"{CHILD_PREFIX}{self.pid}-{next(_seq)}")
        if loc.version == 1:
            self.counter = os.path.join(self.path, "memory.kmem.usage_in_bytes")
            what = "memory.kmem.usage_in_bytes"
        else:
            self.counter = os.path.join(self.path, "memory.stat")
            what = "memory.stat kernel"
        self.detail = f"cgroup v{loc.version} {self.path}, {what}"
        self.summary = f"a child memory cgroup (v{loc.version}, {what})"
        try:
            os.mkdir(self.path)
        except OSError as exc:
            raise CgroupUnavailable(
                f"cannot create a memory cgroup under {self.parent}: {exc}"
            ) from exc
        try:
            if loc.version == 2:
                self._delegate_memory()
            if not os.path.exists(self.counter):
                raise CgroupUnavailable(f"{self.counter} does not exist")
            try:
                _write(os.path.join(self.path, "cgroup.procs"), str(self.pid))
                self._moved = True
            except OSError as exc:
                raise CgroupUnavailable(
                    f"cannot move process {self.pid} into {self.path}: {exc}"
                ) from exc
            self._register()
        except BaseException:
            if self._moved:
                self._move_back()
            self._remove()
            raise

    def read(self) -> int:
        """The cgroup's kernel memory less our own page tables (see the module's docstring)."""
        try:
            if self.version == 1:
                kernel = int(_read(self.counter))
            else:
                kernel = _v2_kernel_bytes(self.counter)
        except (OSError, ValueError) as exc:
            raise MeasurementError(f"cannot read {self.counter}: {exc}") from exc
        return kernel - own_page_table_bytes(self.status)

    def close(self) -> None:
        """Move the process (and any it started) back to the parent; remove the child."""
        if self.closed:
            return
        self.closed = True
        self._unregister()
        if self.own:
            return
        self._move_back()
        self._remove()

    def _delegate_memory(self) -> None:
        control = os.path.join(self.parent, "cgroup.subtree_control")
        try:
            if "memory" in _read(control).split():
                return
            _write(control, "+memory")
            self._enabled_memory = True
        except OSError as exc:
            raise CgroupUnavailable(
                f"cannot enable the memory controller for children of {self.parent}: {exc}"
            ) from exc

    def _move_back(self) -> None:
        procs = os.path.join(self.path, "cgroup.procs")
        try:
            pids = [int(p) for p in _read(procs).split()]
        except OSError:
            pids = [self.pid]
        # Our own process first, then anything we started while measuring.
        for pid in sorted(set(pids) | {self.pid}, key=lambda p: p != self.pid):
            try:
                _write(os.path.join(self.parent, "cgroup.procs"), str(pid))
            except OSError as exc:
                if exc.errno != errno.ESRCH:
                    log.warning(
                        "kmem: cannot move process %d back to %s: %s", pid, self.parent, exc
                    )

    def _remove(self) -> None:
        for attempt in range(50):
            try:
                os.rmdir(self.path)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                # A process that is exiting may still be listed for a moment.
                if exc.errno != errno.EBUSY or attempt == 49:
                    log.warning("kmem: cannot remove %s: %s", self.path, exc)
                    break
                time.sleep(0.01)
        if self._enabled_memory:
            # Fails if another child uses it by now; then it stays.
            with contextlib.suppress(OSError):
                _write(os.path.join(self.parent, "cgroup.subtree_control"), "-memory")


def _remove_stale_children(parent: str) -> None:
    """Remove children that processes which no longer exist left behind (killed meters)."""
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        m = _CHILD_RE.match(name)
        if m is None or int(m.group(1)) == os.getpid() or os.path.exists(f"/proc/{m.group(1)}"):
            continue
        try:
            os.rmdir(os.path.join(parent, name))
            log.info("kmem: removed the stale cgroup %s/%s", parent, name)
        except OSError:
            pass


def _alone_in(path: str, pid: int) -> bool:
    """Whether ``pid`` is the only process in the cgroup ``path`` and its descendants."""
    for dirpath, _, files in os.walk(path):
        if "cgroup.procs" not in files:
            continue
        try:
            pids = {int(p) for p in _read(os.path.join(dirpath, "cgroup.procs")).split()}
        except OSError:
            return False
        if pids - {pid}:
            return False
    return True


def open_meter(
    *,
    cgroup: bool = True,
    proc_cgroup: str = "/proc/self/cgroup",
    mountinfo: str = "/proc/self/mountinfo",
    meminfo: str = MEMINFO,
) -> KmemMeter:
    """The best meter available: a memory cgroup of our own, else VmallocUsed (and why).

    ``cgroup=False`` asks for the system-wide meter. The environment variable
    ``MEMSLOTS_KMEM=system`` does the same for a whole process.
    """
    if not cgroup or os.environ.get("MEMSLOTS_KMEM") == SYSTEM:
        return SystemMeter("system-wide figures were asked for", meminfo=meminfo)
    try:
        return _open_cgroup(proc_cgroup, mountinfo)
    except CgroupUnavailable as exc:
        log.info("kmem: falling back to VmallocUsed: %s", exc)
        return SystemMeter(str(exc), meminfo=meminfo)


def _open_cgroup(proc_cgroup: str, mountinfo: str) -> CgroupMeter:
    loc = locate_memory_cgroup(proc_cgroup, mountinfo)
    if _kmem_accounting_off():
        raise CgroupUnavailable("kernel memory accounting is off (cgroup.memory=nokmem)")
    try:
        return CgroupMeter(loc)
    except CgroupUnavailable as exc:
        # cgroup v2 gives a child the memory controller only if our cgroup holds no process;
        # if we are the only one, our own cgroup is just as good.
        if loc.version == 2 and _alone_in(loc.path, os.getpid()):
            return CgroupMeter(loc, own=True)
        raise exc


def current_meter() -> KmemMeter | None:
    """The innermost meter this process has open, if any."""
    return _open[-1] if _open else None


def current_or_system_meter() -> KmemMeter:
    """The innermost open meter, else a system-wide one whose baseline is now (not registered:
    it holds nothing to close)."""
    return current_meter() or SystemMeter("no meter was opened before the VM", register=False)


def cgroup_unavailable_reason() -> str | None:
    """Why no per-VM cgroup can be used here (``None``: it can), by opening and closing one."""
    try:
        _open_cgroup("/proc/self/cgroup", "/proc/self/mountinfo").close()
    except MeasurementError as exc:
        return str(exc)
    return None
