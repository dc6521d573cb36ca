"""``memslots plan`` where it goes beyond what QEMU decides (memslot-size past 256 memslots) and
where it cannot ask the host (vhost-user back-ends that are not running)."""

from __future__ import annotations

import json
import logging

import pytest
from click.testing import CliRunner

from memslots.cli import main as cli
from memslots.errors import EXIT_BAD_INPUT, EXIT_OK

FIXED = [
    "-m",
    "4G,maxmem=68G",
    "-object",
    "memory-backend-memfd,id=mem0,size=64G",
    "-device",
    "virtio-mem,id=vmem0,memdev=mem0,memslot-size=128M",
]


def run(args: list[str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli.main, args)
    return result.exit_code, result.stdout, result.stderr


def test_memslot_size_past_256_memslots_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="memslots")
    code, out, err = run(["plan", *FIXED, "--json"])
    assert code == EXIT_OK, err
    data = json.loads(out)
    (dev,) = data["memory_devices"]
    assert dev["memslots"] == 512
    (warning,) = data["warnings"]
    assert "'vmem0' uses 512 memslot(s)" in warning and "more than the 256" in warning
    # Logged as it happens (the command prints it as "memslots: warning: ...").
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [warning]
    # QEMU's own decisions never get there: no warning.
    code, out, _ = run(["plan", *FIXED[:-1], "virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on"])
    assert code == EXIT_OK and "warning" not in out


def test_the_budget_still_holds_past_256() -> None:
    code, _, err = run(["plan", *FIXED, "--kvm-free-memslots", "511"])
    assert code == EXIT_BAD_INPUT
    assert "hypervisor has not enough free memory slots left" in err
    assert "needs 512 memslot(s)" in err and "only 511 of" in err
    code, _, err = run(
        ["plan", *FIXED, "--vhost-max-memslots", "600", "--vhost-free-memslots", "500"]
    )
    assert code == EXIT_BAD_INPUT
    assert "a used vhost backend has not enough free memory slots left" in err


def test_vhost_user_device_needs_its_limit() -> None:
    vhost = [
        "-chardev",
        "socket,id=c0,path=/nonexistent.sock",
        "-device",
        "vhost-user-blk,chardev=c0",
    ]
    code, _, err = run(["plan", *FIXED, *vhost])
    assert code == EXIT_BAD_INPUT and "--vhost-user-max-memslots N" in err
    # memslot-size raised the auto-decision flag: a back-end with fewer than 509 is refused.
    code, _, err = run(["plan", *FIXED, *vhost, "--vhost-user-max-memslots", "32"])
    assert code == EXIT_BAD_INPUT and "supports 32 memory slots, fewer than 509" in err
    # Plugged first, the back-end's limit bounds the decision; its regions are the memfd's.
    code, out, err = run(
        [
            "plan",
            *FIXED[:4],
            *vhost,
            "--vhost-user-max-memslots",
            "512",
            "-device",
            "virtio-mem,id=vmem0,memdev=mem0,dynamic-memslots=on",
            "--json",
        ]
    )
    assert code == EXIT_OK, err
    data = json.loads(out)
    kvm, blk = data["budget"]["consumers"]
    assert kvm["name"] == "kvm"
    assert blk["name"] == "vhost-user-blk@c0" and blk["max_memslots"] == 512
    assert data["memory_devices"][0]["memslots"] == 64  # 1 GiB each, the minimum
