"""A machine with the Linux guest on the virtqueue: streams, the real vCPU, simulate end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import requires_kvm, requires_memcg, slow
from hypothesis import given, settings
from hypothesis import strategies as st
from kmem_support import STOCK_TOLERANCE, VCPU_MMU_ALLOWANCE, Stressor
from machines import check_invariants

from memslots.cli import main as cli
from memslots.devices.virtio_mem.wire import Request, Response
from memslots.kvm.cost import unmap_cost
from memslots.kvm.model import KvmModel
from memslots.kvm.vm import KvmVm
from memslots.machine.machine import Machine
from memslots.machine.vm import GuestVm
from memslots.options import parse_machine_config
from memslots.simulate.run import run_simulation, scenario
from memslots.sizes import GiB, MiB


def test_worked_streams_through_the_virtqueue() -> None:
    cfg = parse_machine_config(
        "4G,maxmem=8G",
        ["memory-backend-ram,id=mem0,size=2G"],
        ["virtio-mem,id=vmem0,memdev=mem0,requested-size=512M,dynamic-memslots=on"],
        accel="sim",
    )
    with Machine(cfg, vm=KvmModel()) as m, GuestVm(m) as vm:
        vm.settle()
        guest = vm.guests["vmem0"]
        assert [(r.type, r.offset // MiB, r.nb_blocks) for r in guest.log] == [
            ("plug", 0, 64),
            ("plug", 128, 64),
            ("plug", 256, 64),
            ("plug", 384, 64),
        ]
        assert vm.resize("vmem0", 900 * MiB).wait(10).ok
        n = len(guest.log)
        assert vm.resize("vmem0", 700 * MiB).wait(10).ok
        assert len(guest.log) - n == 37
        assert guest.violations == [] and guest.verify() > 0


@requires_kvm
def test_vcpu_confirms_every_step_of_a_random_trace() -> None:
    cfg = parse_machine_config(
        "1G,maxmem=17G",
        ["memory-backend-memfd,id=mem0,size=16G"],
        ["virtio-mem,id=vmem0,memdev=mem0,memslot-size=1G"],
        accel="kvm",
    )
    rng = random.Random(7)
    with Machine(cfg, vm=KvmVm()) as m, GuestVm(m) as vm:
        assert vm.vcpu is not None
        dev = m.virtio_mem("vmem0")
        guest = vm.guests["vmem0"]
        vm.settle()
        for _ in range(12):
            target = rng.randrange(0, 16 * GiB // (128 * MiB) + 1) * 128 * MiB
            assert vm.resize("vmem0", target).wait(60).ok
            assert guest.verify() > 0 or target == 0
            assert guest.violations == []
            bs = dev.block_size
            for slot in dev.memslot_map():
                # From inside the guest: a plugged block of a mapped memslot is RAM, unmapped
                # memslots are MMIO (unplugged blocks of mapped ones are out of reach).
                first = (slot.gpa - dev.addr) // bs
                plugged = dev.bitmap.find(1, first, first + slot.size // bs)
                probe = slot.gpa + slot.size - 8 if plugged < 0 else dev.addr + plugged * bs
                assert vm.vcpu.is_ram(probe) == slot.mapped
                assert slot.mapped == bool(slot.plugged_blocks)


@requires_kvm
@requires_memcg
def test_simulate_on_real_kvm_matches_the_model(memslot_stressor: Stressor) -> None:
    """Per step, the VM's kernel memory (its own cgroup) is the memcg model of its memslots plus
    what the vCPU's MMU holds (``VCPU_MMU_ALLOWANCE``), whatever the stressor does."""
    cfg = parse_machine_config(
        "4G,maxmem=68G",
        ["memory-backend-ram,id=mem0,size=64G,reserve=off"],
        ["virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on"],
        accel="kvm",
    )
    trace = scenario("sawtooth", 32 * GiB, 2 * MiB, steps=4)
    result = run_simulation(cfg, trace, strategy="dynamic", request_log=True, memslot_maps=True)
    assert result.real_kvm and result.violations == []
    for step in result.steps:
        assert step.plugged == step.requested
        measured, model = step.kernel_metadata_measured, step.kernel_metadata_source_model
        assert step.kernel_metadata_source == "cgroup"
        assert measured is not None and model is not None
        # Below: the slab stocks; above: the vCPU's MMU.
        assert -STOCK_TOLERANCE < measured - model <= VCPU_MMU_ALLOWANCE, step
        assert step.memslot_map is not None
        assert step.memslots_mapped == sum(step.memslot_map)


SIM_MACHINE = [
    "simulate",
    "-accel",
    "sim",
    "-m",
    "4G,maxmem=20G",
    "-object",
    "memory-backend-ram,id=mem0,size=16G,reserve=off",
]


def test_simulate_cli_json_csv_and_plots(tmp_path: Path) -> None:
    out = tmp_path
    args = [
        *SIM_MACHINE,
        "-device",
        "virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on",
        "--scenario",
        "burst",
        "--max-size",
        "8G",
        "--request-log",
        "--json",
        "--csv",
        str(out / "steps.csv"),
        "--plots",
        str(out / "plots"),
    ]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    steps = data["steps"]
    assert [s["requested"] for s in steps][:3] == [512 * MiB, 512 * MiB, 8 * GiB]
    for s in steps:
        assert s["plugged"] == s["requested"]
        assert set(s["requests"]) <= {"plug", "unplug", "unplug_all", "state"}
        log = s["request_log"]
        assert sum(s["requests"].values()) == len(log)
        for r in log:
            assert set(r) == {"type", "offset", "nb_blocks", "response"} and r["response"] == "ack"
    assert (out / "steps.csv").read_text().count("\n") == len(steps) + 1
    names = sorted(p.name for p in (out / "plots").iterdir())
    assert names == sorted(
        f"simulate-{k}.{e}" for k in ("sizes", "memslots", "metadata") for e in ("png", "svg")
    )


def test_simulate_compare_strategies() -> None:
    args = [
        *SIM_MACHINE,
        "-device",
        "virtio-mem,id=vmem0,memdev=mem0",
        "--scenario",
        "ramp-up",
        "--steps",
        "2",
        "--max-size",
        "8G",
        "--compare",
        "single,dynamic,fixed:512M",
        "--json",
    ]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.stderr
    by = {r["strategy"]: r for r in json.loads(result.stdout)["strategies"]}
    last = {k: v["steps"][-1] for k, v in by.items()}
    assert last["single"]["memslots_mapped"] == 1
    assert last["fixed:512M"]["memslots_mapped"] == 16
    # fewer, larger memslots cost more metadata than small ones covering the same memory
    assert last["fixed:512M"]["kernel_metadata_bytes"] < last["single"]["kernel_metadata_bytes"]
    assert last["dynamic"]["memslots_mapped"] == 8  # 16 memslots of 1 GiB, half plugged
    # Each step's memslot map only when asked for (it would be most of a long run's output).
    assert all("memslot_map" not in s for r in by.values() for s in r["steps"])
    result = CliRunner().invoke(cli.main, [*args, "--memslot-map"])
    assert result.exit_code == 0, result.stderr
    by = {r["strategy"]: r for r in json.loads(result.stdout)["strategies"]}
    for r in by.values():
        assert all(s["memslots_mapped"] == sum(s["memslot_map"]) for s in r["steps"])
    assert len(by["fixed:512M"]["steps"][-1]["memslot_map"]) == 32


@slow
@settings(max_examples=15, deadline=None)
@given(
    targets=st.lists(st.integers(min_value=0, max_value=32), min_size=1, max_size=8),
    strategy=st.sampled_from([",dynamic-memslots=on", "", ",memslot-size=512M"]),
    busy_every=st.integers(min_value=0, max_value=5),
)
def test_random_traces_keep_the_invariants_after_every_request(
    targets: list[int], strategy: str, busy_every: int
) -> None:
    """The guest drives random resizes (with BUSY phases) through the virtqueue; after every
    single request the device's invariants hold, and each resize ends where it should."""
    cfg = parse_machine_config(
        "1G,maxmem=9G",
        ["memory-backend-ram,id=mem0,size=8G,reserve=off"],
        [f"virtio-mem,id=vmem0,memdev=mem0{strategy}"],
        accel="sim",
    )
    with Machine(cfg, vm=KvmModel()) as m, GuestVm(m) as vm:
        dev = m.virtio_mem("vmem0")
        checked = []

        def after(req: Request, resp: Response) -> None:
            check_invariants(m, dev)
            checked.append(resp.type)

        vm.transports["vmem0"].request_listeners.append(after)
        vm.settle()
        for n, t in enumerate(targets):
            dev.busy = bool(busy_every) and n % busy_every == 0
            res = vm.resize("vmem0", t * 256 * MiB).wait(1000)
            dev.busy = False
            if not res.ok:
                assert res.outcome.value == "backoff"
                assert vm.resize("vmem0", t * 256 * MiB).wait(1000).ok
            assert dev.size == t * 256 * MiB
        assert vm.guests["vmem0"].violations == []
        assert len(checked) == len(vm.guests["vmem0"].log)


@pytest.mark.parametrize("quirk", ["off", "on"])
def test_simulate_compare_shows_metadata_and_unmap_cost(quirk: str) -> None:
    """The memslot size trades kernel metadata against the cost of unmapping: both are shown."""
    args = [
        "simulate",
        *SIM_MACHINE[3:],
        "-accel",
        f"sim,slot-zap-all={quirk}",
        "-device",
        "virtio-mem,id=vmem0,memdev=mem0",
        "--scenario",
        "sawtooth",
        "--steps",
        "4",
        "--max-size",
        "8G",
        "--working-set",
        "4096",
        "--compare",
        "single,dynamic,fixed:512M",
    ]
    result = CliRunner().invoke(cli.main, [*args, "--json"])
    assert result.exit_code == 0, result.stderr
    by = {r["strategy"]: r["summary"] for r in json.loads(result.stdout)["strategies"]}
    assert all(s["slot_zap_all"] is (quirk == "on") for s in by.values())
    assert all(s["working_set_frames"] == 4096 for s in by.values())
    single, dynamic, fixed = by["single"], by["dynamic"], by["fixed:512M"]
    # One memslot: never deleted, most metadata; smaller memslots: more deletes, less metadata
    # (here the trace's sizes are whole GiB, so 512 MiB memslots save nothing over 1 GiB ones).
    assert single["memslot_deletes"] == 0 and single["unmap_cost_ms"] == 0
    assert fixed["memslot_deletes"] > dynamic["memslot_deletes"] > 0
    meta = "kernel_metadata_byte_seconds"
    assert max(fixed[meta], dynamic[meta]) < single[meta] / 2
    per_delete = {
        k: unmap_cost(size, slot_zap_all=quirk == "on", working_set_frames=4096).total_ms
        for k, size in (("dynamic", GiB), ("fixed:512M", 512 * MiB))
    }
    for k in per_delete:
        assert by[k]["unmap_cost_ms"] == pytest.approx(by[k]["memslot_deletes"] * per_delete[k])
    if quirk == "on":  # every delete re-faults the guest: more memslots, more stall
        assert fixed["unmap_cost_ms"] > dynamic["unmap_cost_ms"]
    table = CliRunner().invoke(cli.main, args)
    assert table.exit_code == 0, table.stderr
    words = " ".join(table.stdout.split())  # titles wrap to the table's width
    assert "Kernel metadata vs unmap cost (model;" in words and "(GiB*s)" in words
    assert f"slot-zap-all {quirk}" in words
