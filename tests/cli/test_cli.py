"""The memslots command line: plan (acceptance shape and refusals), measure, demo."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import AMD_HOST, requires_kvm, requires_memcg
from kmem_support import STOCK_TOLERANCE, VCPU_MMU_ALLOWANCE, Stressor
from machines import ACCEPTANCE

from memslots import demo as demo_module
from memslots.cli import main as cli
from memslots.cli import plan as cli_plan
from memslots.errors import (
    EXIT_BAD_INPUT,
    EXIT_CODES,
    EXIT_HOST_MISSING,
    EXIT_OK,
    KvmUnavailableError,
)
from memslots.kvm.abi import VmBackend
from memslots.kvm.cost import unmap_cost
from memslots.sizes import GiB, TiB


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
    dm = data["budget"]["device_memory"]
    assert (dm["required_memslots"], dm["used_memslots"]) == (256, 0)
    assert [c["name"] for c in data["budget"]["consumers"]] == ["kvm"]
    md = dev["kernel_metadata_bytes"]
    # one 1 TiB memslot, shadow paging: 658183 vmalloc pages (docs/reference/kvm-memslot-cost.md A5)
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
    kvm, *vhost = data["budget"]["consumers"]
    assert kvm["name"] == "kvm" and kvm["slot_zap_all"] is quirk
    assert all(v["slot_zap_all"] is None for v in vhost)
    assert data["unmap_cost_model"]["working_set_frames"] == 16384
    (dev,) = data["memory_devices"]
    expected = unmap_cost(4 * GiB, slot_zap_all=quirk, working_set_frames=16384)
    assert dev["unmap_cost_ms"] == {
        "delete": expected.delete_ms,
        "refault": expected.refault_ms,
        "total": expected.total_ms,
    }
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
    monkeypatch.setattr(cli_plan, "host_info", lambda: AMD_HOST)  # a host without KVM
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
@requires_memcg
def test_demo_on_the_kernel_matches_the_model(memslot_stressor: Stressor) -> None:
    code, out, _ = run(["demo", "-accel", "kvm", "--json"])
    assert code == 0
    data = json.loads(out)
    assert data["source"] == "cgroup"
    for step in data["steps"]:
        model, measured = step["kernel_metadata_source_model"], step["kernel_metadata_measured"]
        assert step["kernel_metadata_source"] == "cgroup"
        # The memcg model of the mapped memslots, plus what the vCPU's MMU holds.
        assert -STOCK_TOLERANCE < measured - model <= VCPU_MMU_ALLOWANCE, step


def test_exit_statuses_come_from_one_table() -> None:
    code, out, _ = run(["--help"])
    assert code == EXIT_OK
    for status, meaning in EXIT_CODES.items():
        assert f"{status}  {meaning}" in out
    # click's usage errors are bad input too (click alone would exit 2)
    code, _, err = run(["plan", "--no-such-option"])
    assert code == EXIT_BAD_INPUT and "No such option" in err
    code, _, err = run(["measure", "--device-size", "lots"])
    assert code == EXIT_BAD_INPUT and "invalid size 'lots'" in err
    code, _, err = run(["plan", "-m", "4G,maxmem=2G"])
    assert code == EXIT_BAD_INPUT and err.startswith("memslots: -m 4G,maxmem=2G: invalid value")


def test_missing_kvm_is_something_missing_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_kvm() -> VmBackend:
        raise KvmUnavailableError("cannot open /dev/kvm: No such file or directory")

    monkeypatch.setattr(demo_module, "Machine", lambda *a, **k: no_kvm())
    code, _, err = run(["demo", "-accel", "kvm"])
    assert code == EXIT_HOST_MISSING == KvmUnavailableError.exit_code
    assert err == "memslots: cannot open /dev/kvm: No such file or directory\n"


@requires_kvm
@requires_memcg
def test_measure_json_on_the_kernel(memslot_stressor: Stressor) -> None:
    code, out, _ = run(
        ["measure", "--device-size", "4G", "--plugged", "0", "--repeats", "2", "--json"]
    )
    assert code == 0
    data = json.loads(out)
    assert data["source"] == "cgroup" and data["disturbed"] is False
    assert data["order"] == ["single", "dynamic", "dynamic", "single"]
    single = data["single"]
    assert len(single["runs"]) == 2 and single["source"] == "cgroup"
    model = data["model"]["single"]["kernel_metadata_bytes"]
    assert model == data["model"]["single"]["memcg_charged_bytes"]
    for r in single["runs"]:
        assert abs(r["kernel_metadata_bytes"] - model) < STOCK_TOLERANCE
    assert data["dynamic"]["kernel_metadata_bytes_min"] < STOCK_TOLERANCE
