"""Shared fixtures: machines on the KVM model (planned or mapped) and on the real kernel."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pytest
from kmem_support import Stressor, run_stressor

from memslots.host.kmem import cgroup_unavailable_reason
from memslots.kvm.host import HostInfo
from memslots.kvm.mmu import MmuConfig
from memslots.kvm.model import KvmModel
from memslots.kvm.vm import kvm_available
from memslots.machine.machine import Machine
from memslots.options import parse_machine_config
from memslots.vhost.backend import VhostModel

requires_kvm = pytest.mark.skipif(not kvm_available(), reason="needs /dev/kvm")

_memcg_missing = cgroup_unavailable_reason()
#: Tests that measure kernel memory per VM: they need a memory cgroup of their own.
requires_memcg = pytest.mark.skipif(
    _memcg_missing is not None, reason=f"needs a per-VM memory cgroup: {_memcg_missing}"
)


@pytest.fixture
def memslot_stressor() -> Iterator[Stressor]:
    """Another process on the host creating and deleting 64 GiB memslots in a loop, on its own
    VM, for the whole test; stopped (and its VM closed) at teardown. Needs /dev/kvm."""
    if not kvm_available():
        pytest.skip("the memslot stressor needs /dev/kvm")
    yield from run_stressor()


PlanFactory = Callable[..., Machine]

#: A fixed host for planning tests, so that they mean the same on every machine: an AMD vCPU
#: with 48 physical address bits (QEMU's rules relocate RAM above 1 TiB for it), shadow paging.
AMD_HOST = HostInfo(
    cpu_vendor="amd",
    phys_bits=48,
    mmu=MmuConfig(),
    kvm=False,
    kvm_max_memslots=32764,
    thp_size=2 << 20,
    page_size=4096,
)


@pytest.fixture
def plan_machine() -> Iterator[PlanFactory]:
    """Build planned machines (nothing mapped) on the KVM model; closes them afterwards."""
    made: list[Machine] = []

    def build(
        memory: str,
        objects: Sequence[str] = (),
        devices: Sequence[str] = (),
        *,
        kvm_max: int = 32764,
        kvm_free: int | None = None,
        vhost: tuple[int, int | None, str] | None = None,
        host: HostInfo = AMD_HOST,
    ) -> Machine:
        config = parse_machine_config(memory, objects, devices, accel="sim")
        consumers = [VhostModel("vhost0", vhost[0], kind=vhost[2])] if vhost else []

        def describe(m: Machine) -> None:
            if kvm_free is not None:
                m.set_free_memslots(m.kvm, kvm_free, "--kvm-free-memslots")
            if vhost is not None and vhost[1] is not None:
                m.set_free_memslots(consumers[0], vhost[1], "--vhost-free-memslots")

        m = Machine(
            config,
            vm=KvmModel(max_memslots=kvm_max, mmu=MmuConfig()),
            planned=True,
            vhost=list(consumers),
            before_devices=describe,
            host=host,
        )
        made.append(m)
        return m

    yield build
    for m in made:
        m.close()
