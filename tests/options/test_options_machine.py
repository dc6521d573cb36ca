"""QEMU-style option strings: parsing and the one-error-per-rule validation."""

from __future__ import annotations

import pytest

from memslots.errors import OptionError
from memslots.options import (
    DimmOptions,
    VirtioMemOptions,
    parse_backend,
    parse_device,
    parse_machine_config,
    parse_machine_memory,
    split_option_string,
)
from memslots.sizes import GiB, MiB, TiB


def test_split_with_implied_key_and_escaped_comma() -> None:
    assert split_option_string("4G,maxmem=8G", "size") == [("size", "4G"), ("maxmem", "8G")]
    assert split_option_string("memory-backend-file,mem-path=/a,,b", "qom-type") == [
        ("qom-type", "memory-backend-file"),
        ("mem-path", "/a,b"),
    ]


@pytest.mark.parametrize("text", ["a,b", "=1", "x=1,", "", "x=1,,,y"])
def test_split_rejects_malformed(text: str) -> None:
    with pytest.raises(OptionError):
        split_option_string(text, "size")


def test_split_without_implied_key() -> None:
    with pytest.raises(OptionError, match="not of the form key=value"):
        split_option_string("a", None)


def test_machine_memory() -> None:
    m = parse_machine_memory("4G,slots=2,maxmem=1028G")
    assert (m.ram_size, m.maxmem, m.slots, m.device_memory_size) == (
        4 * GiB,
        1028 * GiB,
        2,
        1024 * GiB,
    )
    assert parse_machine_memory("512").ram_size == 512 * MiB
    assert parse_machine_memory("1G").maxmem == GiB
    assert parse_machine_memory("0").ram_size == 128 * MiB  # 0 means the default
    assert parse_machine_memory("1.33G").ram_size == 0x551EC000  # rounded up to 8 KiB


@pytest.mark.parametrize(
    "text,match",
    [
        (
            "4G,maxmem=2G",
            r"maximum memory size \(0x80000000\) must be at least the initial memory size "
            r"\(0x100000000\)",
        ),
        (
            "4G,slots=2,maxmem=4G",
            r"memory slots were specified but maximum memory size \(0x100000000\) is equal to "
            r"the initial memory size",
        ),
        ("4G,slots=0", "slots specified but no max-size"),
        ("4G,foo=1", "unknown parameter 'foo' \\(allowed: size, slots, maxmem\\)"),
        ("4X", "invalid memory size '4X'"),
        ("4G,slots=-1", "slots specified but no max-size"),
        ("4G,slots=two", "Parameter 'slots' expects a number"),
        ("4G,maxmem=8G,maxmem=9G", "given twice"),
    ],
)
def test_machine_memory_errors(text: str, match: str) -> None:
    with pytest.raises(OptionError, match=match):
        parse_machine_memory(text)


def test_backends() -> None:
    b = parse_backend("memory-backend-ram,id=mem0,size=1T,reserve=off")
    assert (b.id, b.size, b.share, b.reserve) == ("mem0", TiB, False, False)
    assert parse_backend("memory-backend-memfd,id=m,size=1G").share is True
    f = parse_backend("memory-backend-file,id=f,size=1G,mem-path=/dev/shm,share=on")
    assert (f.mem_path, f.share) == ("/dev/shm", True)


@pytest.mark.parametrize(
    "text,match",
    [
        ("memory-backend-foo,id=a,size=1G", "unsupported object type 'memory-backend-foo'"),
        ("memory-backend-ram,size=1G", "parameter 'id' is missing"),
        ("memory-backend-ram,id=a", "parameter 'size' is missing"),
        ("memory-backend-ram,id=a,size=0", "must not be zero"),
        ("memory-backend-ram,id=a,size=1G,share=maybe", "'share' expects 'on' or 'off'"),
        ("memory-backend-ram,id=m/x,size=1G", "Parameter 'id' expects an identifier"),
        ("memory-backend-ram,id=a,size=1G,mem-path=/x", "unknown parameter 'mem-path'"),
        ("memory-backend-file,id=a,size=1G", "parameter 'mem-path' is missing"),
        ("memory-backend-ram,id=a,size=1G,reserve=off,prealloc=on", "incompatible"),
        ("memory-backend-memfd,id=a,size=1G,hugetlbsize=2M", "needs 'hugetlb=on'"),
    ],
)
def test_backend_errors(text: str, match: str) -> None:
    with pytest.raises(OptionError, match=match):
        parse_backend(text)


def test_devices() -> None:
    v = parse_device(
        "virtio-mem-pci,id=vmem0,memdev=mem0,requested-size=1G,block-size=2M,"
        "dynamic-memslots=on,unplugged-inaccessible=on"
    )
    assert isinstance(v, VirtioMemOptions)
    assert (v.id, v.memdev, v.requested_size, v.block_size, v.dynamic_memslots) == (
        "vmem0",
        "mem0",
        GiB,
        2 * MiB,
        True,
    )
    d = parse_device("pc-dimm,id=d,memdev=m,addr=010")
    assert isinstance(d, DimmOptions) and d.memdev == "m" and d.addr == 8  # octal, as strtoull
    v2 = parse_device("virtio-mem,id=v,memaddr=0x140000000")
    assert isinstance(v2, VirtioMemOptions) and v2.memaddr == 0x1_4000_0000


@pytest.mark.parametrize(
    "text,match",
    [
        ("virtio-foo,id=a", "unsupported device 'virtio-foo'"),
        ("virtio-mem,id=a,dynamic-memslots=yesplease", "'dynamic-memslots' expects 'on' or 'off'"),
        ("virtio-mem,id=a,unplugged-inaccessible=maybe", "expects one of 'on', 'off', 'auto'"),
        ("virtio-mem,id=a,requested-size=lots", "invalid 'requested-size'"),
        ("virtio-mem,id=a,colour=blue", "unknown parameter 'colour'"),
        ("pc-dimm,id=a,block-size=2M", "unknown parameter 'block-size'"),
        ("virtio-mem,id=a,memaddr=6G", "Parameter 'memaddr' expects uint64"),
        ("virtio-mem,id=v/0", "Parameter 'id' expects an identifier"),
        ("pc-dimm,id=1dimm", "Parameter 'id' expects an identifier"),
        ("pc-dimm,id=a,addr=0x1g", "Parameter 'addr' expects uint64"),
    ],
)
def test_device_errors(text: str, match: str) -> None:
    with pytest.raises(OptionError, match=match):
        parse_device(text)


# What QEMU 7.2 answers for these (qemu-system-x86_64 -device ..., checked by hand): integers
# are ASCII (strtoull, base 0), no wider than the property, and a NUMA check follows.
@pytest.mark.parametrize(
    "text,match",
    [
        ("virtio-mem,id=a,node=99999999999999999999", "Parameter 'node' expects integer$"),
        ("virtio-mem,id=a,node=4294967296", "Parameter 'node' expects uint32_t"),
        ("virtio-mem,id=a,node=-1", "Parameter 'node' expects uint32_t"),
        ("virtio-mem,id=a,node=\u0664", "Parameter 'node' expects integer$"),
        ("virtio-mem,id=a,node=1_0", "Parameter 'node' expects integer$"),
        ("pc-dimm,id=a,node=\uff14", "Parameter 'node' expects integer$"),
        ("pc-dimm,id=a,slot=2147483648", "Parameter 'slot' expects int32_t"),
        ("pc-dimm,id=a,slot=99999999999999999999", "Parameter 'slot' expects integer$"),
        ("pc-dimm,id=a,addr=\u0664", "Parameter 'addr' expects uint64"),
        ("virtio-mem,id=a,memaddr=" + "1" * 5000, "Parameter 'memaddr' expects uint64"),
        ("virtio-mem,id=a,requested-size=\u0664G", "invalid 'requested-size'"),
        ("virtio-mem,id=a,requested-size=" + "1" * 5000, "value too large"),
    ],
    ids=lambda v: v[:40],
)
def test_device_integers_are_qemus(text: str, match: str) -> None:
    with pytest.raises(OptionError, match=match):
        parse_device(text)


def test_device_integers_take_c_bases() -> None:
    v = parse_device("virtio-mem,id=a,node=0x10")
    assert isinstance(v, VirtioMemOptions) and v.node == 16  # QEMU: "property has value '16'"
    d = parse_device("pc-dimm,id=a,node=4294967295,slot=-1")
    assert isinstance(d, DimmOptions) and (d.node, d.slot) == (4294967295, None)


@pytest.mark.parametrize(
    "text,match",
    [
        (
            "4G,maxmem=8G,slots=99999999999999999999",
            "Value '99999999999999999999' is too large for parameter 'slots'",
        ),
        ("4G,maxmem=8G,slots=\u0664", "Parameter 'slots' expects a number"),
        ("\u0664G", "invalid memory size"),
        ("4G,maxmem=" + "1" * 5000, "value too large"),
        ("4G,maxmem=1." + "0" * 5000 + "G", "must be at least the initial memory size"),
    ],
    ids=lambda v: v[:40],
)
def test_machine_memory_numbers_are_qemus(text: str, match: str) -> None:
    with pytest.raises(OptionError, match=match):
        parse_machine_memory(text)


def test_machine_memory_slots_wrap_as_in_c() -> None:
    # QEMU then refuses "unsupported amount of memory slots: 18446744073709551615".
    assert parse_machine_memory("4G,maxmem=8G,slots=-1").slots == (1 << 64) - 1


def test_duplicate_ids() -> None:
    with pytest.raises(OptionError, match="duplicate id 'a'"):
        parse_machine_config("1G", ["memory-backend-ram,id=a,size=1G"] * 2)
    with pytest.raises(OptionError, match="duplicate ID 'v'"):
        parse_machine_config("1G", [], ["virtio-mem,id=v", "virtio-mem,id=v"])
    with pytest.raises(OptionError, match="-accel tcg"):
        parse_machine_config("1G", accel="tcg")


def test_refusals_repeat_sizes_in_human_units_after_qemus_text() -> None:
    with pytest.raises(OptionError) as info:
        parse_machine_memory("8G,maxmem=4G")
    assert str(info.value).endswith(
        "maximum memory size (0x100000000) must be at least the initial memory size "
        "(0x200000000) (maxmem 4 GiB, RAM 8 GiB)"
    )
