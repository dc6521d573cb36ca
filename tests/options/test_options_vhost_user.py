"""Options of vhost-user devices: -chardev socket and -device vhost-user-blk|fs."""

from __future__ import annotations

import pytest

from memslots.errors import OptionError
from memslots.options import (
    ChardevOptions,
    VhostUserDeviceOptions,
    parse_chardev,
    parse_vhost_user_device,
)


def test_parse_chardev() -> None:
    assert parse_chardev("socket,id=c0,path=/run/x.sock") == ChardevOptions("c0", "/run/x.sock")
    assert parse_chardev("socket,path=/a,,b,id=c1,server=off") == ChardevOptions("c1", "/a,b")


@pytest.mark.parametrize(
    "text,message",
    [
        ("file,id=c0,path=/x", "unsupported chardev backend 'file' (supported: socket)"),
        ("socket,path=/x", "parameter 'id' is missing"),
        ("socket,id=c0,host=::1,port=4444", "only Unix sockets are supported"),
        ("socket,id=c0", "parameter 'path' is missing"),
        ("socket,id=c0,path=/x,server=on", "'server=on' is not supported"),
        ("socket,id=c0,path=/x,server=maybe", "parameter 'server' expects 'on' or 'off'"),
        ("socket,id=c0,path=/x,wait=off", "unknown parameter 'wait'"),
        ("socket,id=c0,id=c1,path=/x", "parameter 'id' given twice"),
    ],
)
def test_parse_chardev_errors(text: str, message: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_chardev(text)
    assert str(info.value).startswith(f"-chardev {text}: {message}")


def test_parse_vhost_user_device() -> None:
    blk = parse_vhost_user_device("vhost-user-blk-pci,id=blk0,chardev=c0")
    assert blk == VhostUserDeviceOptions("vhost-user-blk-pci", "blk0", "c0")
    assert blk.is_blk and not blk.precise
    fs = parse_vhost_user_device(
        f"vhost-user-fs,chardev=c1,tag={'t' * 36},memslot-accounting=precise"
    )
    assert (fs.id, fs.tag, fs.is_blk, fs.precise) == (None, "t" * 36, False, True)


@pytest.mark.parametrize(
    "text,message",
    [
        ("virtio-blk,chardev=c0", "unsupported device 'virtio-blk'"),
        ("vhost-user-blk,id=b", "chardev is mandatory"),
        ("vhost-user-fs-pci,tag=t", "missing chardev"),
        ("vhost-user-fs,chardev=c0", "missing tag property"),
        ("vhost-user-fs,chardev=c0,tag=", "tag property must not be empty"),
        ("vhost-user-fs,chardev=c0,tag=" + "é" * 19, "tag property must be 36 bytes or less"),
        ("vhost-user-blk,chardev=c0,tag=t", "unknown parameter 'tag'"),
        (
            "vhost-user-blk,chardev=c0,memslot-accounting=exact",
            "parameter 'memslot-accounting' expects one of 'qemu', 'precise'",
        ),
    ],
)
def test_parse_vhost_user_device_errors(text: str, message: str) -> None:
    with pytest.raises(OptionError) as info:
        parse_vhost_user_device(text)
    assert str(info.value).startswith(f"-device {text}: {message}")
