"""vhost-user devices in ``plan`` and at run time alike: a back-end is charged the regions of
fd-backed (memfd, file) memory, whether that memory is mapped or only planned."""

from __future__ import annotations

from pathlib import Path

import pytest
from backends import FakeBackend
from conftest import PlanFactory

from memslots.errors import OptionError, VhostLimitError
from memslots.kvm.model import KvmModel
from memslots.machine.machine import Machine
from memslots.options import parse_machine_config
from memslots.vhost.user.consumer import ConnectionState, VhostUserConsumer
from memslots.vhost.user.wire import ProtocolFeature

MEMORY = "4G,slots=4,maxmem=16G"
#: Three memfd DIMMs (3 regions) and six virtio-mem devices of 1 GiB, each deciding one
#: memslot (no auto decision, so the 509 rule does not apply) that stays unmapped: reserved.
OBJECTS = [
    *(f"memory-backend-memfd,id=d{i},size=1G" for i in range(3)),
    *(f"memory-backend-memfd,id=v{i},size=1G" for i in range(6)),
]
DEVICES = [
    *(f"pc-dimm,id=dimm{i},memdev=d{i}" for i in range(3)),
    *(f"virtio-mem,id=vm{i},memdev=v{i},dynamic-memslots=on" for i in range(6)),
]
#: QEMU's refusal for this machine and a back-end without CONFIGURE_MEM_SLOTS (8 regions).
REFUSAL = (
    "vhost backend memory slots limit (8) is less than current number of used (3) and "
    "reserved (6) memory slots for memory devices."
)


def test_plan_counts_planned_fd_backed_memory(plan_machine: PlanFactory) -> None:
    vhost = ["vhost-user-fs,id=fs0,chardev=c0,tag=t"]
    chardevs = ["socket,id=c0,path=/nonexistent/plan-connects-to-nothing.sock"]
    with pytest.raises(VhostLimitError) as info:
        plan_machine(MEMORY, OBJECTS, [*DEVICES, *vhost], chardevs=chardevs, vhost_user_limit=8)
    assert str(info.value).startswith(REFUSAL)
    # One more region and it fits: the planned back-end holds the DIMMs' three regions.
    m = plan_machine(MEMORY, OBJECTS, [*DEVICES, *vhost], chardevs=chardevs, vhost_user_limit=9)
    (consumer,) = m.budget.vhost_backends
    assert isinstance(consumer, VhostUserConsumer)
    assert consumer.state is ConnectionState.PLANNED
    assert (consumer.used_memslots, consumer.free_memslots) == (3, 6)
    # Anonymous memory costs a vhost-user back-end nothing, planned or not (QEMU's accounting
    # still charges it every reserved memslot).
    anon = [o.replace("memfd", "ram") for o in OBJECTS]
    m = plan_machine(MEMORY, anon, [*DEVICES, *vhost], chardevs=chardevs, vhost_user_limit=6)
    assert m.budget.vhost_backends[0].used_memslots == 0


def test_plan_needs_the_back_ends_limit(plan_machine: PlanFactory) -> None:
    with pytest.raises(OptionError, match="--vhost-user-max-memslots N"):
        plan_machine(
            MEMORY,
            OBJECTS[:1],
            ["vhost-user-fs,id=fs0,chardev=c0,tag=t"],
            chardevs=["socket,id=c0,path=/nonexistent.sock"],
        )


def test_run_time_refuses_the_same_machine(tmp_path: Path) -> None:
    """The same command line with memory mapped and a real connection: the same refusal."""
    fake = FakeBackend(
        str(tmp_path / "fake.sock"), protocol_features=1 << ProtocolFeature.REPLY_ACK
    )
    try:
        config = parse_machine_config(
            MEMORY,
            [o.replace(",size=", ",reserve=off,size=") for o in OBJECTS],
            [*DEVICES, "vhost-user-fs,id=fs0,chardev=c0,tag=t"],
            accel="sim",
            chardevs=[f"socket,id=c0,path={fake.path}"],
        )
        with pytest.raises(VhostLimitError) as info:
            Machine(config, vm=KvmModel()).close()
        assert str(info.value).startswith(REFUSAL)
    finally:
        fake.close()
