"""The report records: one spelling per field, rendered as JSON, QMP and back."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import PlanFactory

from memslots.guest.inorder import drive_to
from memslots.host.kmem import SystemMeter
from memslots.reports import (
    BudgetReport,
    KernelMemoryReport,
    KernelMetadataReport,
    MemslotReport,
    budget_report,
    device_plan,
    from_qmp,
    kernel_metadata_report,
    memslot_report,
    to_json,
    to_qmp,
)
from memslots.sizes import GiB

MACHINE = (
    "4G,slots=1,maxmem=13G",
    ["memory-backend-ram,id=mem0,size=8G", "memory-backend-memfd,id=d0,size=1G"],
    ["virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on", "pc-dimm,id=dimm0,memdev=d0"],
)


def _dashes(obj: object) -> object:
    if isinstance(obj, dict):
        return {k.replace("_", "-"): _dashes(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_dashes(v) for v in obj]
    return obj


def test_json_and_qmp_spell_the_same_fields(plan_machine: PlanFactory) -> None:
    m = plan_machine(*MACHINE, vhost=(600, None, "user"))
    drive_to(m.virtio_mem("vmem0"), 3 * GiB)
    for record in (
        budget_report(m),
        *memslot_report(m),
        kernel_metadata_report(m),
        *(device_plan(m, d) for d in m.memory_devices),
    ):
        assert to_qmp(record) == _dashes(to_json(record))


def test_qmp_form_reads_back(plan_machine: PlanFactory) -> None:
    m = plan_machine(*MACHINE, vhost=(600, None, "kernel"))
    drive_to(m.virtio_mem("vmem0"), 3 * GiB)
    budget = budget_report(m)
    assert from_qmp(BudgetReport, to_qmp(budget)) == budget
    assert [c.name for c in budget.consumers] == ["kvm", "vhost0"]
    assert budget.device_memory is not None and budget.device_memory.required_memslots == 9
    for slot in memslot_report(m):
        assert from_qmp(MemslotReport, to_qmp(slot)) == slot
    meta = kernel_metadata_report(m)
    assert from_qmp(KernelMetadataReport, to_qmp(meta)) == meta
    assert meta.kernel_memory is None and not meta.real


def test_kernel_memory_is_measured_on_the_kernel_only(
    plan_machine: PlanFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A meter's figure, source and the model for that source reach the report (and from it
    QMP and JSON) on the real kernel; on the model there is nothing measured to report."""
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("VmallocUsed:  1000 kB\n")
    meter = SystemMeter("a test", meminfo=str(meminfo), register=False)
    m = plan_machine(*MACHINE)
    drive_to(m.virtio_mem("vmem0"), 3 * GiB)
    assert kernel_metadata_report(m, kmem=meter).kernel_memory is None
    monkeypatch.setattr(type(m.vm), "is_real", True)
    meminfo.write_text("VmallocUsed:  1012 kB\n")
    meta = kernel_metadata_report(m, kmem=meter)
    assert meta.kernel_memory == KernelMemoryReport(
        bytes=12 * 1024,
        source="system",
        disturbed=True,
        model_bytes=m.kvm.predicted_metadata_bytes(),
        detail=meter.describe(),
    )
    qmp = to_qmp(meta)
    assert set(qmp["kernel-memory"]) == {"bytes", "source", "disturbed", "model-bytes", "detail"}
    assert from_qmp(KernelMetadataReport, qmp) == meta
    assert to_json(meta)["kernel_memory"]["model_bytes"] == m.kvm.predicted_metadata_bytes()


def test_free_is_max_minus_used_in_every_report(plan_machine: PlanFactory) -> None:
    m = plan_machine(*MACHINE, vhost=(600, 590, "kernel"))
    for c in budget_report(m).consumers:
        assert c.free_memslots == c.max_memslots - c.used_memslots
