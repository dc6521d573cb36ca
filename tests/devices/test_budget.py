"""The memslot budget is one module: change a limit there and every consumer path follows.

The numbers are derived from QEMU's rules (docs/reference/memslot-decision.md §3a, §5) with the
changed limit, not from the code.
"""

from __future__ import annotations

import pytest
from conftest import PlanFactory

from memslots.devices import budget
from memslots.devices.budget import PreciseAccounting
from memslots.errors import NotEnoughMemslotsError, VhostLimitError
from memslots.guest.inorder import drive_to
from memslots.options import MEMSLOT_ACCOUNTING, parse_device
from memslots.sizes import GiB
from memslots.vhost.backend import VhostModel

ONE_TIB = ("4G,maxmem=1028G", ["memory-backend-ram,id=mem0,size=1T,reserve=off"])
AUTO = "virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on"


def test_defaults_are_qemus() -> None:
    assert (budget.SOFT_MEMSLOT_LIMIT, budget.SAFE_MAX_MEMSLOTS) == (256, 509)
    # every memslot-accounting= value the options accept has a strategy, and no other
    assert set(budget.ACCOUNTINGS) == set(MEMSLOT_ACCOUNTING)


@pytest.mark.parametrize("vhost", [None, (600, None, "kernel"), (600, None, "user")])
def test_soft_limit_in_one_place(
    plan_machine: PlanFactory,
    monkeypatch: pytest.MonkeyPatch,
    vhost: tuple[int, int | None, str] | None,
) -> None:
    monkeypatch.setattr(budget, "SOFT_MEMSLOT_LIMIT", 64)
    # KVM alone, or KVM and a vhost back-end with plenty of slots: the device spans the whole
    # area, so it gets every memslot the soft limit leaves: 64 of 16 GiB.
    m = plan_machine(*ONE_TIB, [AUTO], vhost=vhost)
    dev = m.virtio_mem("vmem0")
    assert (dev.nb_memslots, dev.memslot_size) == (64, 16 * GiB)
    # The soft limit is used up: the next device decides on one memslot.
    assert m.budget.decision_limit(4 * GiB) == 1


def test_soft_limit_bounds_a_precise_back_end_too(
    plan_machine: PlanFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(budget, "SOFT_MEMSLOT_LIMIT", 10)
    m = plan_machine(*ONE_TIB)
    small = VhostModel("small", 32, kind="user")
    m.budget.attach_vhost(small, PreciseAccounting())
    dev = m.add_device(parse_device(AUTO))
    assert dev.get_memslots() == 10  # min(soft 10, 32 free) over the whole area


def test_safe_limit_in_one_place(
    plan_machine: PlanFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(budget, "SAFE_MAX_MEMSLOTS", 600)
    # KVM with 550 memslots is now "too few": the decision gives one memslot.
    m = plan_machine(*ONE_TIB, [AUTO], kvm_max=550)
    assert m.virtio_mem("vmem0").nb_memslots == 1
    # The same for a vhost back-end with 550.
    m = plan_machine(*ONE_TIB, [AUTO], vhost=(550, None, "kernel"))
    assert m.virtio_mem("vmem0").nb_memslots == 1
    # And vhost_dev_init refuses a 550-slot back-end after an auto decision.
    m = plan_machine(*ONE_TIB, [AUTO])
    assert m.virtio_mem("vmem0").nb_memslots == 256
    with pytest.raises(VhostLimitError, match=r"supports 550 memory slots, fewer than 600"):
        m.budget.attach_vhost(VhostModel("vhost1", 550))
    # Precise accounting is outside the rule, whatever its value.
    m.budget.attach_vhost(VhostModel("vhost2", 550, kind="user"), PreciseAccounting())


def test_free_is_always_max_minus_used(plan_machine: PlanFactory) -> None:
    # A precise back-end is charged only fd-backed reservations; the budget gives the others
    # back to the decision, but the back-end itself still reports max - used.
    m = plan_machine("1G,maxmem=9G", ["memory-backend-ram,id=mem0,size=8G"])
    m.add_device(parse_device("virtio-mem,id=vmem0,memdev=mem0,memslot-size=128M"))
    small = VhostModel("small", 32, kind="user")
    m.budget.attach_vhost(small, PreciseAccounting())
    assert small.free_memslots == small.max_memslots - small.used_memslots == 32
    assert m.budget.vhost_free_memslots() == 32 + 64
    drive_to(m.virtio_mem("vmem0"), 5 * GiB)
    assert small.free_memslots == 32 and small.used_memslots == 0  # anonymous memory


def test_refusals_name_the_consumer(plan_machine: PlanFactory) -> None:
    m = plan_machine(*ONE_TIB, kvm_free=3)
    with pytest.raises(NotEnoughMemslotsError) as info:
        m.add_device(parse_device("virtio-mem,id=v1,memdev=mem0,memslot-size=256G"))
    # 1 TiB in 256 GiB memslots needs 4.
    assert info.value.consumer == "kvm" and (info.value.needed, info.value.free) == (4, 3)
    m.budget.attach_vhost(VhostModel("vhost1", 3))
    with pytest.raises(NotEnoughMemslotsError) as info:
        m.add_device(parse_device("virtio-mem,id=v2,memdev=mem0,memslot-size=512G"))
    assert info.value.consumer == "vhost1" and (info.value.needed, info.value.free) == (2, 1)
