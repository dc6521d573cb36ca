"""Measurements on the real kernel, per VM: kernel memory against the model, single vs dynamic.

The real-kernel tests run beside a memslot stressor (another process creating and deleting
64 GiB memslots) and still agree with the model to the page: each run is measured in a memory
cgroup of its own. The tolerance is the meter's: the slab object of each memslot is charged from
a per-CPU stock of whole pages, so a reading is within a page per CPU (plus one) of the model.
"""

from __future__ import annotations

from conftest import requires_kvm, requires_memcg
from kmem_support import Stressor

from memslots.host.kmem import KmemMeter
from memslots.kvm.host import open_vm_meter
from memslots.kvm.model import KvmModel
from memslots.measure import Comparison, Run, compare, measurement_order
from memslots.sizes import GiB, TiB


def test_order_alternates_which_layout_goes_first() -> None:
    assert measurement_order(1) == [False, True]
    assert measurement_order(3) == [False, True, True, False, False, True]


class ScriptedMeter(KmemMeter):
    """A meter whose readings are given: each run reads ``before`` then ``after``."""

    source = "cgroup"
    detail = summary = "scripted"
    tolerance = 0

    def __init__(self, readings: list[int]) -> None:
        super().__init__()
        self.readings = readings

    def read(self) -> int:
        return self.readings.pop(0)

    def close(self) -> None:
        self.closed = True


def test_comparison_json_keeps_its_keys_and_adds_min_median() -> None:
    # single runs rise by 100, 300, 200; dynamic runs by 5, 1, 3 (in the order measured)
    rises = iter([100, 5, 1, 300, 200, 3])
    order = measurement_order(3)

    def meter() -> KmemMeter:
        return ScriptedMeter([1000, 1000 + next(rises)])

    result = compare(64 * GiB, GiB, repeats=3, vm_factory=lambda: KvmModel(), meter_factory=meter)
    assert [r.kernel_metadata_bytes for r in result.singles] == [100, 300, 200]
    assert [r.kernel_metadata_bytes for r in result.dynamics] == [5, 1, 3]
    assert result.order == tuple("dynamic" if d else "single" for d in order)
    data = result.to_json()
    assert set(data) >= {"device_size", "plugged", "single", "dynamic", "model", "ratios"}
    assert data["source"] == "cgroup" and data["disturbed"] is False and data["repeats"] == 3
    single = data["single"]
    assert isinstance(single, dict)
    assert set(single) >= {"kernel_metadata_bytes", "seconds", "memslots_mapped", "requests"}
    assert single["kernel_metadata_bytes"] == single["kernel_metadata_bytes_median"] == 200
    assert single["kernel_metadata_bytes_min"] == 100
    assert len(single["runs"]) == 3 and single["source"] == "cgroup"
    model = data["model"]
    assert isinstance(model, dict)
    # The model figure to compare with is the one for the source: memcg-charged bytes.
    assert model["single"]["kernel_metadata_bytes"] == model["single"]["memcg_charged_bytes"]
    assert model["single"]["vmalloc_used_bytes"] > model["single"]["memcg_charged_bytes"]


def test_a_system_run_makes_the_comparison_system() -> None:
    run = Run(False, 1, 0.1, 1, 1, 1, source="cgroup")
    other = Run(True, 1, 0.1, 1, 1, 1, source="system")
    c = Comparison(GiB, GiB, (run,), (other,))
    assert c.source == "system" and c.to_json()["disturbed"] is True


def _assert_matches_model(run: Run, tolerance: int) -> None:
    assert run.source == "cgroup"
    assert abs(run.kernel_metadata_bytes - run.predicted_bytes) < tolerance, run


def _tolerance() -> int:
    with open_vm_meter() as meter:
        assert meter.tolerance is not None
        return meter.tolerance


@requires_kvm
@requires_memcg
def test_single_vs_dynamic_1t(memslot_stressor: Stressor) -> None:
    """The acceptance case. Each single run costs ~2.5 GiB of kernel memory for a second."""
    result = compare(TiB, GiB, repeats=2)
    tolerance = _tolerance()
    assert result.source == "cgroup"
    for run in (*result.singles, *result.dynamics):
        assert run.memslots_mapped == 1
        _assert_matches_model(run, tolerance)
    single, dynamic = result.single, result.dynamic
    assert dynamic.kernel_metadata_bytes * 100 <= single.kernel_metadata_bytes
    data = result.to_json()
    assert set(data) >= {"single", "dynamic", "model", "ratios", "source", "order"}
    assert data["order"] == ["single", "dynamic", "dynamic", "single"]


@requires_kvm
@requires_memcg
def test_empty_device_costs_nothing_dynamic(memslot_stressor: Stressor) -> None:
    result = compare(64 * GiB, 0, repeats=2)
    tolerance = _tolerance()
    for run in result.dynamics:
        assert run.memslots_mapped == 0 and run.predicted_bytes == 0
        _assert_matches_model(run, tolerance)
    for run in result.singles:
        assert run.memslots_mapped == 1
        _assert_matches_model(run, tolerance)
