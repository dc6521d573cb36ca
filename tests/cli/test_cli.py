"""The memslots command line: plan (acceptance shape and refusals), measure, demo."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import requires_kvm

from memslots.cli import main as cli
from memslots.kvm.cost import unmap_cost
from memslots.sizes import GiB, TiB

ACCEPTANCE = [
    "-m",
    "4G,maxmem=1028G",
    "-object",
    "memory-backend-ram,id=mem0,size=1T,reserve=off",
    "-device",
    "virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on",
]


def run(args: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli.main, args)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("vendor,address", [("amd", 0x100_4000_0000), ("intel", 0x1_4000_0000)])
def test_plan_acceptance_json(vendor: str, address: int) -> None:
    code, out, _ = run(["plan", *ACCEPTANCE, "--cpu-vendor", vendor, "--phys-bits", "48", "--json"])
    assert code == 0
    data = json.loads(out)
    (dev,) = data["memory_devices"]
    assert dev["id"] == "vmem0" and dev["type"] == "virtio-mem"
    assert (dev["memslots"], dev["memslot_size"], dev["last_memslot_size"]) == (
        256,
        4 * GiB,
        4 * GiB,
    )
    assert (dev["region_size"], dev["block_size"], dev["dynamic_memslots"]) == (TiB, 2 << 20, True)
    assert dev["address"] == address
    assert data["host"]["cpu_vendor"] == vendor and data["host"]["phys_bits"] == 48
    assert data["host"]["sources"]["cpu_vendor"] == "override"
    assert (data["required_memslots"], data["used_memslots"]) == (256, 0)
    md = dev["kernel_metadata_bytes"]
    # one 1 TiB memslot under shadow paging: 658183 vmalloc pages (kvm.md A5)
    assert md["single_memslot"] == 658183 * 4096
    assert md["decided_memslots"] == 256 * 2572 * 4096  # 256 x the 4 GiB slot's 2572 pages


def test_plan_table_and_vhost_flags() -> None:
    code, out, _ = run(
        ["plan", *ACCEPTANCE, "--vhost-max-memslots", "64", "--vhost-free-memslots", "54"]
    )
    assert code == 0
    assert "vmem0" in out and "vhost-kernel: 10 used, 54 free of 64" in out
    code, out, _ = run(["plan", *ACCEPTANCE, "--vhost-max-memslots", "64", "--json"])
    assert json.loads(out)["memory_devices"][0]["memslots"] == 1  # max 64 < 509


@pytest.mark.parametrize("accel,quirk", [([], False), (["-accel", "kvm,slot-zap-all=on"], True)])
def test_plan_reports_slot_zap_all_and_unmap_cost(accel: list[str], quirk: bool) -> None:
    code, out, _ = run(["plan", *ACCEPTANCE, *accel, "--working-set", "16384", "--json"])
    assert code == 0
    data = json.loads(out)
    assert data["kvm"]["slot_zap_all"] is quirk
    assert data["kvm"]["unmap_cost_model"]["working_set_frames"] == 16384
    (dev,) = data["memory_devices"]
    expected = unmap_cost(4 * GiB, slot_zap_all=quirk, working_set_frames=16384)
    assert dev["unmap_cost_ms"] == expected.to_json()
    code, out, _ = run(["plan", *ACCEPTANCE, *accel])
    assert code == 0
    assert "unmap cost" in out and f"KVM slot-zap-all: {'on' if quirk else 'off'}" in out


def test_plan_refusal_exits_1_with_message() -> None:
    code, _, err = run(
        [
            "plan",
            "-m",
            "4G",
            "-object",
            "memory-backend-ram,id=m,size=1G",
            "-device",
            "virtio-mem,id=v,memdev=m",
        ]
    )
    assert code == 1
    assert "the configuration is not prepared for memory devices" in err
    code, _, err = run(
        [
            "plan",
            *ACCEPTANCE,
            "--kvm-max-memslots",
            "600",
            "--kvm-free-memslots",
            "100",
            "-object",
            "memory-backend-ram,id=x,size=4G",
            "-device",
            "virtio-mem,id=y,memdev=x,memslot-size=1G",
        ]
    )
    assert code == 1 and "hypervisor has not enough free memory slots left" in err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["-m", "4G,maxmem=1028G,colour=red"], "unknown parameter 'colour'"),
        (["-device", "virtio-mem,dynamic-memslots=perhaps"], "expects 'on' or 'off'"),
        (["--kvm-free-memslots", "40000"], "can have at most"),
        (["--vhost-free-memslots", "3"], "needs --vhost-max-memslots"),
        (["-accel", "kvm,slot-zap-all=sometimes"], "'slot-zap-all' expects 'on' or 'off'"),
        (["-accel", "hvf"], "-accel hvf: expects one of auto, kvm, sim"),
    ],
)
def test_plan_bad_options(args: list[str], needle: str) -> None:
    code, _, err = run(["plan", *ACCEPTANCE, *args])
    assert code == 1 and needle in err


def test_measure_without_kvm_exits_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "kvm_available", lambda: False)
    code, _, err = run(["measure", "--json"])
    assert code == 2 and "/dev/kvm is not available" in err


def test_demo_on_the_model() -> None:
    code, out, _ = run(["demo", "-accel", "sim", "--json"])
    assert code == 0
    data = json.loads(out)
    assert data["real_kvm"] is False
    for step in data["steps"]:
        assert step["plugged"] == step["requested"]
        assert step["memslots_mapped"] == -(-step["plugged"] // (4 * GiB))
        assert step["kernel_metadata_model"] == step["memslots_mapped"] * 2572 * 4096


@requires_kvm
def test_demo_on_the_kernel_matches_the_model() -> None:
    code, out, _ = run(["demo", "-accel", "kvm", "--json"])
    assert code == 0
    for step in json.loads(out)["steps"]:
        model, measured = step["kernel_metadata_model"], step["kernel_metadata_measured"]
        assert abs(measured - model) <= 0.02 * model + 64 * 4096
