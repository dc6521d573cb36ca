"""Tests for memslots.host.pages: QEMU's THP probing against fake sysfs trees."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from memslots.host.pages import probe_thp_size, read_default_huge_page_size
from memslots.sizes import KiB, MiB

LOGGER = "memslots.host.pages"


def _sysfs(tmp_path: Path, content: bytes | None, *, thp_dir: bool = True) -> str:
    root = tmp_path / "sys"
    thp = root / "kernel" / "mm" / "transparent_hugepage"
    if thp_dir:
        thp.mkdir(parents=True)
    if content is not None:
        (thp / "hpage_pmd_size").write_bytes(content)
    return str(root)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


FALLBACK_2M = "Could not detect THP size, falling back to 2  MiB."


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"2097152\n", 2 * MiB),
        (b"2097152", 2 * MiB),
        (b"0x200000\n", 2 * MiB),
        (b" +4194304\n", 4 * MiB),
        (b"020000000\n", 4 * MiB),  # octal, as strtoull with base 0 reads it
        (b"536870912\n", 512 * MiB),
    ],
)
def test_thp_probe_valid(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, expected: int
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert probe_thp_size(_sysfs(tmp_path, content), machine="x86_64") == expected
    assert _warnings(caplog) == []


@pytest.mark.parametrize(
    ("content", "shown"),
    [
        (b"0\n", "0"),
        (b"3000000\n", "2dc6c0"),
        (b"0x300000", "300000"),
        (b"-1\n", "ffffffffffffffff"),  # strtoull wraps a minus sign
    ],
)
def test_thp_probe_unsupported_value_warns_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, shown: str
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert probe_thp_size(_sysfs(tmp_path, content), machine="x86_64") == 2 * MiB
    assert _warnings(caplog) == [f"Read unsupported THP size: {shown}", FALLBACK_2M]


@pytest.mark.parametrize(
    "content",
    [
        None,  # directory without hpage_pmd_size
        b"",
        b"\n",
        b"abc\n",
        b"2097152 kB\n",
        b"2097152\n\n",
        b"0x\n",
        b"08\n",
        b"99999999999999999999999\n",  # ERANGE
        b"0x100000000\n",  # power of two, but QEMU's uint32_t truncates it to 0
    ],
)
def test_thp_probe_garbage_falls_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes | None
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert probe_thp_size(_sysfs(tmp_path, content), machine="x86_64") == 2 * MiB
    assert _warnings(caplog) == [FALLBACK_2M]


def test_thp_probe_without_thp_dir_is_1m_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    assert probe_thp_size(_sysfs(tmp_path, None, thp_dir=False), machine="x86_64") == MiB
    assert _warnings(caplog) == []


@pytest.mark.parametrize(
    ("machine", "page_size", "expected", "shown"),
    [
        ("x86_64", 4 * KiB, 2 * MiB, "2"),
        ("armv7l", 4 * KiB, 2 * MiB, "2"),
        ("ppc64le", 64 * KiB, 2 * MiB, "2"),
        ("aarch64", 4 * KiB, 2 * MiB, "2"),
        ("aarch64", 16 * KiB, 32 * MiB, "20"),
        ("aarch64", 64 * KiB, 512 * MiB, "200"),
        ("aarch64", 8 * KiB, MiB, "1"),
        ("s390x", 4 * KiB, MiB, "1"),
        ("riscv64", 4 * KiB, MiB, "1"),
    ],
)
def test_thp_fallback_by_arch(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    machine: str,
    page_size: int,
    expected: int,
    shown: str,
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    root = _sysfs(tmp_path, b"garbage\n")
    assert probe_thp_size(root, machine=machine, page_size=page_size) == expected
    assert _warnings(caplog) == [f"Could not detect THP size, falling back to {shown}  MiB."]


def test_default_huge_page_size_from_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    assert read_default_huge_page_size(str(meminfo)) is None
    meminfo.write_text("MemTotal:       24576000 kB\nHugepagesize:    1048576 kB\n")
    assert read_default_huge_page_size(str(meminfo)) == 1024 * MiB
    meminfo.write_text("Hugepagesize:\n")
    assert read_default_huge_page_size(str(meminfo)) is None
