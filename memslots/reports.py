"""The report records: what ``plan --json``, the QMP ``x-query-*`` commands, the Prometheus
metrics and ``memslots info`` tell about a machine, built once and rendered by each.

* :class:`BudgetReport` (:class:`ConsumerReport` per memslot consumer, and
  :class:`DeviceMemoryReport`): ``plan --json``'s ``budget``, ``x-query-memslot-budget``, the
  ``memslots_consumer_*`` and ``memslots_device_memory_*`` metrics, ``info budget``;
* :class:`MemslotReport`: one memslot of a memory device and who maps it; ``x-query-memslots``
  and ``info memslots``;
* :class:`DevicePlan`: a memory device as decided, with what unmapping one of its memslots costs
  (:class:`UnmapCostPlan`); ``plan --json``'s ``memory_devices`` (and its ``unmap_cost_model``,
  :class:`UnmapCostModel`);
* :class:`KernelMetadataReport`: what our KVM memslots cost the kernel, the model's figure and
  (:class:`KernelMemoryReport`) what the per-VM meter measured; ``x-query-kernel-metadata`` and
  the ``memslots_kernel_metadata_*`` and ``memslots_kernel_memory_*`` metrics;
* :class:`GuestReport` (:class:`GuestDriverReport` per guest driver, :class:`VcpuReport`): the
  guest model's drivers and the checks of the memory they use; ``x-query-guest``.

:class:`Columns` lays out every table for people (the command line's and ``info``'s): one unit
per column, named in its title, and values never cut, so that the default tables fit 80 columns.

Each field has one spelling, its Python name. JSON output (``plan --json``) uses it as is, with
``null`` for an absent value; QMP spells it with dashes, as QAPI does, and leaves absent
(optional) members out; metric names contain it after a ``memslots_<record>_`` prefix.
QEMU's own QMP outputs (``query-memory-devices``, events) are the devices' and stay QEMU's.
"""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.table import Table

from memslots.devices.memory_device import MemoryDevice
from memslots.host.kmem import KmemMeter
from memslots.kvm.cost import UNMAP_COST_MEASURED
from memslots.machine.machine import Machine
from memslots.machine.vm import GuestVm
from memslots.memory.address_space import Section
from memslots.memory.consumer import MemslotConsumer
from memslots.sizes import column_unit, format_in

__all__ = [
    "BudgetReport",
    "Columns",
    "ConsumerReport",
    "DeviceKernelMetadata",
    "DeviceMemoryReport",
    "DevicePlan",
    "GuestDriverReport",
    "GuestReport",
    "KernelMemoryReport",
    "KernelMetadataPlan",
    "KernelMetadataReport",
    "MemslotReport",
    "UnmapCostModel",
    "UnmapCostPlan",
    "VcpuReport",
    "budget_report",
    "device_plan",
    "from_qmp",
    "guest_report",
    "kernel_metadata_report",
    "memslot_report",
    "to_json",
    "to_qmp",
    "unmap_cost_model",
]

#: How a report names a device: its id, or what the caller calls an anonymous one.
DeviceName = Callable[[MemoryDevice], str]


def _default_name(dev: MemoryDevice) -> str:
    return dev.label


# -- rendering -------------------------------------------------------------------------------------


def _render(value: object, *, qmp: bool) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(value):
            v = getattr(value, f.name)
            if v is None and qmp:
                continue  # an absent optional member
            out[f.name.replace("_", "-") if qmp else f.name] = _render(v, qmp=qmp)
        return out
    if isinstance(value, list | tuple):
        return [_render(v, qmp=qmp) for v in value]
    return value


def to_json(record: object) -> Any:
    """The record as JSON for ``--json`` output: field names as they are, None as null."""
    return _render(record, qmp=False)


def to_qmp(record: object) -> Any:
    """The record as a QMP return value: field names with dashes, None members left out."""
    return _render(record, qmp=True)


def _fields_from_qmp(cls: type[Any], data: Mapping[str, Any]) -> dict[str, Any]:
    return {f.name: data.get(f.name.replace("_", "-")) for f in dataclasses.fields(cls) if f.init}


def from_qmp(cls: type[Any], data: Mapping[str, Any]) -> Any:
    """A record of type ``cls`` back from its QMP form (for the client side)."""
    if cls is BudgetReport:
        dm = data.get("device-memory")
        return BudgetReport(
            consumers=[from_qmp(ConsumerReport, c) for c in data.get("consumers", [])],
            device_memory=from_qmp(DeviceMemoryReport, dm) if dm is not None else None,
        )
    if cls is KernelMetadataReport:
        values = _fields_from_qmp(cls, data)
        values["devices"] = [from_qmp(DeviceKernelMetadata, d) for d in data.get("devices", [])]
        km = data.get("kernel-memory")
        values["kernel_memory"] = from_qmp(KernelMemoryReport, km) if km is not None else None
        return KernelMetadataReport(**values)
    if cls is MemslotReport:
        values = _fields_from_qmp(cls, data)
        values["vhost"] = list(data.get("vhost", []))
        return MemslotReport(**values)
    return cls(**_fields_from_qmp(cls, data))


# -- the memslot budget ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ConsumerReport:
    """One memslot consumer (KVM or a vhost back-end): its facts, ``free = max - used``."""

    name: str
    max_memslots: int
    used_memslots: int
    free_memslots: int
    #: False for a vhost-user back-end that was lost (it then maps none of our memory).
    connected: bool
    #: KVM only (None for vhost back-ends): whether KVM_X86_QUIRK_SLOT_ZAP_ALL is in effect, so
    #: that every memslot delete zaps all of the VM's shadow pages (``-accel …,slot-zap-all``).
    slot_zap_all: bool | None = None

    @classmethod
    def of(cls, consumer: MemslotConsumer, *, slot_zap_all: bool | None = None) -> ConsumerReport:
        """The consumer as it is now."""
        return cls(
            name=consumer.name,
            max_memslots=consumer.max_memslots,
            used_memslots=consumer.used_memslots,
            free_memslots=consumer.free_memslots,
            connected=consumer.connected,
            slot_zap_all=slot_zap_all,
        )


@dataclass(frozen=True)
class DeviceMemoryReport:
    """The device-memory area and QEMU's memslot counters of the memory devices in it."""

    base: int
    size: int
    #: Bytes memory devices may use in total (``maxmem - ram``) and use now.
    total_space: int
    used_space: int
    required_memslots: int
    used_memslots: int
    reserved_memslots: int
    auto_decision_active: bool


@dataclass(frozen=True)
class BudgetReport:
    """Every memslot consumer (KVM first) and the device-memory counters (None: no area)."""

    consumers: list[ConsumerReport]
    device_memory: DeviceMemoryReport | None


def budget_report(machine: Machine) -> BudgetReport:
    """The machine's memslot budget as it is now."""
    dm = machine.device_memory
    device_memory = None
    if dm is not None:
        device_memory = DeviceMemoryReport(
            base=dm.base,
            size=dm.size,
            total_space=dm.total_space,
            used_space=dm.used_region_size,
            required_memslots=dm.required_memslots,
            used_memslots=dm.used_memslots,
            reserved_memslots=dm.reserved_memslots,
            auto_decision_active=dm.auto_decision,
        )
    consumers = [
        ConsumerReport.of(machine.kvm, slot_zap_all=machine.vm.slot_zap_all),
        *(ConsumerReport.of(b) for b in machine.budget.vhost_backends),
    ]
    return BudgetReport(consumers, device_memory)


# -- the memslot map -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemslotReport:
    """One memslot of a memory device, mapped or not, and who maps it.

    ``plugged_blocks`` is None for devices without blocks, ``kvm_slot`` while unmapped;
    ``vhost`` names the back-ends that hold it.
    """

    device: str
    index: int
    address: int
    size: int
    mapped: bool
    plugged_blocks: int | None
    kvm_slot: int | None
    vhost: list[str]


def memslot_report(machine: Machine, name_of: DeviceName = _default_name) -> list[MemslotReport]:
    """Every memslot of every memory device, by address."""
    sections = {s.gpa: s for s in machine.address_space.sections}
    out: list[MemslotReport] = []
    for dev in machine.memory_devices:
        for ms in dev.memslot_map():
            section = sections.get(ms.gpa) if ms.mapped else None
            slot = None
            vhost: list[str] = []
            if section is not None:
                slot = machine.kvm.slot_of(section)
                # A mapped section is held by every back-end that takes it: a refusal would
                # have undone the whole transaction.
                vhost = [
                    b.name
                    for b in machine.budget.vhost_backends
                    if b.accepts(section) and b.connected
                ]
            out.append(
                MemslotReport(
                    device=name_of(dev),
                    index=ms.index,
                    address=ms.gpa,
                    size=ms.size,
                    mapped=ms.mapped,
                    plugged_blocks=ms.plugged_blocks,
                    kvm_slot=slot,
                    vhost=vhost,
                )
            )
    return out


# -- device plans ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelMetadataPlan:
    """Kernel metadata of a device fully plugged: as one memslot, and as decided."""

    single_memslot: int
    decided_memslots: int


@dataclass(frozen=True)
class UnmapCostPlan:
    """What deleting one memslot of a device costs the guest, per the model (milliseconds):
    the delete, the re-fault of the guest's working set after it (with SLOT_ZAP_ALL), both."""

    delete: float
    refault: float
    total: float


@dataclass(frozen=True)
class DevicePlan:
    """A memory device as decided: where it is and how it is exposed through memslots."""

    id: str | None
    type: str
    address: int
    region_size: int
    block_size: int | None
    dynamic_memslots: bool
    memslots: int
    memslot_size: int
    last_memslot_size: int
    kernel_metadata_bytes: KernelMetadataPlan
    #: For one of its memslots (``memslot_size``), for the VM's slot-zap-all setting and the
    #: guest working set of :class:`UnmapCostModel`.
    unmap_cost_ms: UnmapCostPlan


def device_plan(machine: Machine, dev: MemoryDevice) -> DevicePlan:
    """The plan of one memory device."""
    mr = dev.get_memory_region()
    single, decided = machine.device_metadata_bytes(dev)
    plan = dev.memslot_plan()
    unmap = machine.kvm.predicted_unmap_cost(plan.memslot_size)
    return DevicePlan(
        id=dev.id,
        type=dev.info_type,
        address=dev.get_addr(),
        region_size=mr.size if mr is not None else 0,
        block_size=plan.block_size,
        dynamic_memslots=plan.dynamic,
        memslots=plan.memslots,
        memslot_size=plan.memslot_size,
        last_memslot_size=plan.last_memslot_size,
        kernel_metadata_bytes=KernelMetadataPlan(single, decided),
        unmap_cost_ms=UnmapCostPlan(unmap.delete_ms, unmap.refault_ms, unmap.total_ms),
    )


@dataclass(frozen=True)
class UnmapCostModel:
    """What the unmap-cost figures assume: the guest working set (frames: 2 MiB guest pages,
    one 4 KiB page used in each), and the host the model's constants were measured on."""

    working_set_frames: int
    constants_measured_on: str


def unmap_cost_model(machine: Machine) -> UnmapCostModel:
    """The assumptions behind the machine's unmap-cost figures."""
    return UnmapCostModel(machine.kvm.working_set_frames, UNMAP_COST_MEASURED.host)


# -- kernel metadata -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceKernelMetadata:
    """What the KVM memslots of one memory device cost, as the model predicts."""

    device: str
    model_bytes: int


@dataclass(frozen=True)
class KernelMemoryReport:
    """The kernel memory this VM's process was charged, measured (see :mod:`memslots.host.kmem`).

    ``bytes`` is the rise since the meter opened: per VM from a memory cgroup of our own
    (``source`` "cgroup"), or the host's VmallocUsed where no cgroup could be used ("system",
    then ``disturbed``: other processes move it too). ``model_bytes`` is what the model predicts
    our KVM memslots cost that source; ``detail`` says where the figure is read.
    """

    bytes: int
    source: str
    disturbed: bool
    model_bytes: int
    detail: str


@dataclass(frozen=True)
class KernelMetadataReport:
    """What our KVM memslots cost the kernel: the model, and on the real kernel what the
    per-VM meter measured (None on the model, or when no meter was given)."""

    model_bytes: int
    memslots: int
    devices: list[DeviceKernelMetadata]
    real: bool
    kernel_memory: KernelMemoryReport | None


def kernel_metadata_report(
    machine: Machine, name_of: DeviceName = _default_name, *, kmem: KmemMeter | None = None
) -> KernelMetadataReport:
    """The kernel metadata of the machine's memslots; on the real kernel, with a meter, also
    what it measured, which raises :class:`~memslots.errors.MeasurementError` if it cannot be
    read."""
    devices = []
    for dev in machine.memory_devices:
        mr = dev.get_memory_region()
        assert mr is not None, "plugged memory devices have a region"
        lo, hi = dev.get_addr(), dev.get_addr() + mr.size

        def inside(s: Section, lo: int = lo, hi: int = hi) -> bool:
            return lo <= s.gpa < hi

        devices.append(
            DeviceKernelMetadata(name_of(dev), machine.kvm.predicted_metadata_bytes(inside))
        )
    real = machine.vm.is_real
    kernel_memory = None
    if real and kmem is not None:
        figure = kmem.figure(kmem.used())
        kernel_memory = KernelMemoryReport(
            bytes=figure.bytes,
            source=figure.source,
            disturbed=figure.disturbed,
            model_bytes=machine.kvm.predicted_kernel_bytes(figure.source),
            detail=kmem.describe(),
        )
    return KernelMetadataReport(
        model_bytes=machine.kvm.predicted_metadata_bytes(),
        memslots=len(machine.kvm.slots()),
        devices=devices,
        real=real,
        kernel_memory=kernel_memory,
    )


def _number(value: float) -> str:
    # Three significant digits at most, never an exponent.
    if value >= 100 or value == int(value):
        return f"{value:.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}".rstrip("0").rstrip(".")


class Columns:
    """A table for people, built column by column, with one unit per column (in its title):
    sizes in the unit their smallest non-zero value reaches, durations in ms or s."""

    def __init__(self) -> None:
        self._columns: list[tuple[str, list[str], str]] = []

    def text(self, title: str, cells: Sequence[str], *, right: bool = False) -> None:
        """A column of text (or counts, with ``right``)."""
        self._columns.append((title, list(cells), "right" if right else "left"))

    def sizes(self, title: str, values: Sequence[int | None]) -> None:
        """A column of sizes in bytes (None shows as "-")."""
        name, unit = column_unit([v for v in values if v is not None])
        cells = [format_in(v, unit) if v is not None else "-" for v in values]
        self._columns.append((f"{title} ({name})", cells, "right"))

    def durations(self, title: str, values: Sequence[float | None]) -> None:
        """A column of durations in milliseconds (None shows as "-"), in s if all reach 1 s."""
        present = [v for v in values if v]
        name, scale = ("s", 1000.0) if present and min(present) >= 1000 else ("ms", 1.0)
        cells = [_number(v / scale) if v is not None else "-" for v in values]
        self._columns.append((f"{title} ({name})", cells, "right"))

    def table(self, title: str, caption: str | None = None) -> Table:
        """The rich table, its title and caption left-aligned."""
        # No vertical rules: 80 columns hold a few more of them.
        table = Table(
            title=title,
            title_justify="left",
            caption=caption,
            caption_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        for name, cells, justify in self._columns:
            # A column is as wide as its values (never cut short); its title wraps to that.
            width = max([len(c) for c in cells] + [len(w) for w in name.split()])
            table.add_column(
                "\n".join(textwrap.wrap(name, width)),
                justify="right" if justify == "right" else "left",
                no_wrap=True,
            )
        for row in zip(*(cells for _, cells, _ in self._columns), strict=True):
            table.add_row(*row)
        return table


# -- the guest ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuestDriverReport:
    """The guest driver of one virtio-mem device (by id) and the checks of the memory it uses.

    ``state`` is "running", "broken" (the device answered ERROR), "hung" (the device never
    answered) or "stopped"; ``plugged_size`` is what the driver believes is plugged.
    ``checked`` counts the sub-blocks whose pattern was checked for this report (None when no
    check was asked for); ``violations`` counts every check that failed since the driver
    started (plugged memory that was not usable or lost its contents), the last one described
    in ``last_violation``.
    """

    device: str
    state: str
    plugged_size: int
    checked: int | None
    violations: int
    last_violation: str | None


@dataclass(frozen=True)
class VcpuReport:
    """The probe vCPU through which the guests use their memory: guest loads and stores run,
    KVM_RUN calls, and accesses that came back as MMIO (no memslot there)."""

    commands: int
    runs: int
    mmio_exits: int


@dataclass(frozen=True)
class GuestReport:
    """The guest side of a running machine: the vCPU (None: the guests use memory through the
    VMM's mapping, as on the KVM model) and each driver."""

    vcpu: VcpuReport | None
    drivers: list[GuestDriverReport]


def guest_report(guests: GuestVm, checked: Mapping[str, int] | None = None) -> GuestReport:
    """The guests as they are now; ``checked`` is what :meth:`GuestVm.verify` returned, if it
    ran for this report."""
    drivers = []
    for dev_id, guest in guests.guests.items():
        if guest.stopped:
            state = "stopped"
        elif guest.broken:
            state = "broken"
        elif guest.hung:
            state = "hung"
        else:
            state = "running"
        drivers.append(
            GuestDriverReport(
                device=dev_id,
                state=state,
                plugged_size=guest.plugged_size if guest.probed else 0,
                checked=None if checked is None else checked.get(dev_id, 0),
                violations=len(guest.violations),
                last_violation=guest.violations[-1] if guest.violations else None,
            )
        )
    vcpu = None
    if guests.vcpu is not None:
        stats = guests.vcpu.stats
        vcpu = VcpuReport(stats.commands, stats.runs, stats.mmio_exits)
    return GuestReport(vcpu, drivers)
