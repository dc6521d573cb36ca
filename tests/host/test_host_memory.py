"""Tests for memslots.host.memory: real mappings and real discards."""

from __future__ import annotations

import fcntl
import mmap
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from memslots.devices.virtio_mem.device import default_block_size
from memslots.errors import HostMemoryError
from memslots.host import libc
from memslots.host.memory import (
    QEMU_VMALLOC_ALIGN,
    FileBackend,
    HostMemory,
    MemfdBackend,
    RamBackend,
)
from memslots.host.pages import HostPages, host_page_size, hugetlbfs_page_size
from memslots.sizes import GiB, KiB, MiB, TiB

PAGE = host_page_size()
#: Huge page backends' default block size does not depend on the THP size.
PAGES = HostPages(PAGE, 2 * MiB, 2 * MiB)
SIZE = 8 * MiB
PATTERN = bytes(range(256)) * (4 * MiB // 256)
LOGGER = "memslots.host.memory"


def _vm_size() -> int:
    """This process' virtual address space size in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * KiB
    raise AssertionError("no VmSize in /proc/self/status")


def _overcommit_always() -> bool:
    with open("/proc/sys/vm/overcommit_memory") as f:
        return f.read().strip() == "1"


def _free_huge_pages() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("HugePages_Free:"):
                return int(line.split()[1])
    return 0


BACKENDS: dict[str, Callable[[Path], HostMemory]] = {
    "ram": lambda d: RamBackend("ram0", SIZE),
    "ram-shared": lambda d: RamBackend("ram1", SIZE, share=True),
    "memfd": lambda d: MemfdBackend("memfd0", SIZE),
    "memfd-private": lambda d: MemfdBackend("memfd1", SIZE, share=False),
    "file-shared": lambda d: FileBackend("file0", SIZE, d, share=True),
    "file-private-tmp": lambda d: FileBackend("file1", SIZE, d),
}
EXPECTED = {  # name: (kind, shared, has fd, writes allocate in the fd)
    "ram": ("ram", False, False, False),
    "ram-shared": ("ram", True, False, False),
    "memfd": ("memfd", True, True, True),
    "memfd-private": ("memfd", False, True, True),
    "file-shared": ("file", True, True, True),
    "file-private-tmp": ("file", False, True, False),
}


@pytest.mark.parametrize("name", list(BACKENDS))
def test_backend_roundtrip_and_discard_releases_memory(name: str, tmp_path: Path) -> None:
    kind, shared, has_fd, allocates = EXPECTED[name]
    with BACKENDS[name](tmp_path) as mem:
        assert (mem.kind, mem.shared, mem.size, mem.page_size) == (kind, shared, SIZE, PAGE)
        assert (mem.fd is not None) == has_fd
        assert mem.fd_offset == 0
        assert mem.host_addr % QEMU_VMALLOC_ALIGN == 0
        assert mem.resident_bytes() == 0

        mem.write(0, b"head")
        mem.write(SIZE - 4, b"tail")
        # The file system may allocate whole large folios around head and tail.
        baseline = mem.allocated_bytes() if has_fd else 0
        mem.write(2 * MiB, PATTERN)
        assert mem.read(2 * MiB, len(PATTERN)) == PATTERN
        assert mem.resident_bytes(2 * MiB, 4 * MiB) == 4 * MiB
        if allocates:
            assert mem.allocated_bytes() >= baseline + 4 * MiB

        mem.discard(2 * MiB, 4 * MiB)

        assert mem.resident_bytes(2 * MiB, 4 * MiB) == 0
        if has_fd:
            assert mem.allocated_bytes() == baseline
        else:
            with pytest.raises(HostMemoryError, match="without an fd"):
                mem.allocated_bytes()
        assert mem.read(2 * MiB, 4 * MiB) == bytes(4 * MiB)
        assert mem.read(0, 4) == b"head"
        assert mem.read(SIZE - 4, 4) == b"tail"
    assert mem.closed


def test_host_addr_is_huge_page_aligned_for_odd_sizes(tmp_path: Path) -> None:
    # The kernel PMD-aligns only mappings whose length is a PMD multiple; the rest is ours
    # (QEMU's QEMU_VMALLOC_ALIGN, whatever the host's THP size).
    size = 2 * MiB + PAGE
    backends = [
        RamBackend("r", size),
        RamBackend("rs", size, share=True),
        MemfdBackend("m", size),
        FileBackend("f", size, tmp_path),
    ]
    try:
        assert [b.host_addr % QEMU_VMALLOC_ALIGN for b in backends] == [0, 0, 0, 0]
    finally:
        for b in backends:
            b.close()


def test_shared_memfd_is_visible_through_fd_before_and_after_discard() -> None:
    with MemfdBackend("vhost-mem", SIZE) as mem:
        assert mem.fd is not None
        # A second mapping of the fd is what a vhost-user back-end sees.
        with mmap.mmap(mem.fd, SIZE) as peer:
            mem.write(MiB, b"guest data")
            assert peer[MiB : MiB + 10] == b"guest data"
            mem.discard(MiB, MiB)
            assert peer[MiB : MiB + 10] == bytes(10)


def test_private_memfd_writes_do_not_reach_the_fd() -> None:
    with MemfdBackend("priv", SIZE, share=False) as mem:
        assert mem.fd is not None
        mem.write(0, b"secret")
        assert os.pread(mem.fd, 6, 0) == bytes(6)


def test_memfd_is_sealed_like_qemu() -> None:
    with MemfdBackend("sealed", SIZE) as mem:
        assert mem.fd is not None
        seals = fcntl.fcntl(mem.fd, fcntl.F_GET_SEALS)
        assert seals == fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
        with pytest.raises(PermissionError):
            os.ftruncate(mem.fd, 2 * SIZE)
    with MemfdBackend("unsealed", SIZE, seal=False) as mem:
        assert mem.fd is not None
        # Without MFD_ALLOW_SEALING the kernel itself forbids adding seals.
        assert fcntl.fcntl(mem.fd, fcntl.F_GET_SEALS) == fcntl.F_SEAL_SEAL
        os.ftruncate(mem.fd, 2 * SIZE)


@pytest.mark.parametrize(
    ("op", "needle"),
    [
        (lambda m: m.discard(1, PAGE), "must start and end on a 0x1000 page boundary"),
        (lambda m: m.discard(0, PAGE + 1), "must start and end on a 0x1000 page boundary"),
        (lambda m: m.discard(SIZE - PAGE, 2 * PAGE), "is not inside the backend"),
        (lambda m: m.discard(-PAGE, PAGE), "is not inside the backend"),
        (lambda m: m.read(SIZE - 2, 4), "is not inside the backend"),
        (lambda m: m.read(0, -1), "is not inside the backend"),
        (lambda m: m.write(SIZE - 1, b"ab"), "is not inside the backend"),
        (lambda m: m.resident_bytes(1), "page boundary"),
        (lambda m: m.resident_bytes(0, SIZE + PAGE), "is not inside the backend"),
    ],
)
def test_bad_ranges_raise(op: Callable[[HostMemory], object], needle: str) -> None:
    with RamBackend("bad", SIZE) as mem:
        with pytest.raises(HostMemoryError, match=needle) as info:
            op(mem)
        assert "memory backend 'bad' (8 MiB)" in str(info.value)


def test_discard_error_names_the_range() -> None:
    with RamBackend("r", SIZE) as mem:
        with pytest.raises(HostMemoryError, match=r"discard range \[0x7ff000, 0x801000\)"):
            mem.discard(SIZE - PAGE, 2 * PAGE)
        mem.discard(0, 0)  # an empty range is valid and frees nothing


@pytest.mark.parametrize("size", [0, PAGE + 1, -PAGE])
def test_bad_sizes_raise(size: int) -> None:
    with pytest.raises(HostMemoryError, match=r"'odd'.*positive multiple of the backend page size"):
        RamBackend("odd", size)


def test_close_is_idempotent_and_closes_the_fd() -> None:
    mem = MemfdBackend("m", SIZE)
    fd = mem.fd
    assert fd is not None
    mem.close()
    mem.close()
    assert mem.closed
    with pytest.raises(OSError):
        os.fstat(fd)
    for op in (
        lambda: mem.host_addr,
        lambda: mem.fd,
        lambda: mem.read(0, 1),
        lambda: mem.discard(0, PAGE),
    ):
        with pytest.raises(HostMemoryError, match=r"'m' .* is closed"):
            op()


@pytest.mark.parametrize("share", [False, True])
def test_one_tib_noreserve_ram(share: bool) -> None:
    vm_before = _vm_size()
    with RamBackend("big", TiB, share=share, reserve=False) as mem:
        assert _vm_size() - vm_before >= TiB
        mem.write(TiB - 8, b"lastword")
        assert mem.read(TiB - 8, 8) == b"lastword"
        assert 0 < mem.resident_bytes(TiB - 2 * MiB, 2 * MiB) <= 2 * MiB
        mem.discard(TiB - 2 * MiB, 2 * MiB)
        assert mem.resident_bytes(TiB - 2 * MiB, 2 * MiB) == 0
    assert _vm_size() - vm_before < GiB


@pytest.mark.parametrize("reserve", [True, False])
def test_one_tib_memfd(reserve: bool) -> None:
    with MemfdBackend("bigfd", TiB, reserve=reserve) as mem:
        assert mem.allocated_bytes() == 0
        mem.write(TiB - PAGE, b"x")
        assert 0 < mem.allocated_bytes() <= 2 * MiB
        mem.discard(TiB - 2 * MiB, 2 * MiB)
        assert mem.allocated_bytes() == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: RamBackend("huge", TiB),
        lambda: RamBackend("huge", TiB, share=True),
        lambda: MemfdBackend("huge", TiB, share=False),  # private writable: accounted
    ],
)
def test_one_tib_with_reserve_fails_cleanly(make: Callable[[], HostMemory]) -> None:
    if _overcommit_always():
        pytest.skip("vm.overcommit_memory=1 grants any reservation")
    vm_before = _vm_size()
    with pytest.raises(HostMemoryError) as info:
        make()
    msg = str(info.value)
    for part in ("'huge'", "1 TiB", "can't reserve", "Cannot allocate memory", "reserve=off"):
        assert part in msg
    assert _vm_size() - vm_before < GiB  # the address space reservation was given back


def test_file_backend_in_directory_uses_unlinked_temp_file(tmp_path: Path) -> None:
    with FileBackend("f", SIZE, tmp_path, share=True) as mem:
        assert mem.fd is not None
        st = os.fstat(mem.fd)
        assert (st.st_nlink, st.st_size) == (0, SIZE)
        assert list(tmp_path.iterdir()) == []


def test_file_backend_on_named_file_persists_shared_writes(tmp_path: Path) -> None:
    path = tmp_path / "guest.ram"
    with FileBackend("f", SIZE, path, share=True) as mem:
        mem.write(PAGE, b"persist")
    assert path.stat().st_size == SIZE
    with open(path, "rb") as f:
        f.seek(PAGE)
        assert f.read(7) == b"persist"


def _file_state(path: Path) -> tuple[bytes, int, int, int]:
    """What a refused backend must leave as it was: contents, size, mode and mtime."""
    st = path.stat()
    return path.read_bytes(), st.st_size, st.st_mode, st.st_mtime_ns


@pytest.mark.parametrize("share", [False, True])
def test_file_backend_refuses_a_smaller_non_empty_file_and_leaves_it(
    tmp_path: Path, share: bool
) -> None:
    """QEMU's rule: a non-empty file smaller than size is refused, never padded (it padded a
    1500-byte file with NULs before)."""
    small = tmp_path / "small"
    small.write_bytes(os.urandom(1500))
    small.chmod(0o640)
    before = _file_state(small)
    with pytest.raises(
        HostMemoryError, match="backing store size 0x5dc does not match 'size' option 0x800000"
    ):
        FileBackend("f", SIZE, small, share=share)
    assert _file_state(small) == before


@pytest.mark.parametrize("share", [False, True])
def test_file_backend_grows_only_an_empty_file_and_maps_the_start_of_a_larger_one(
    tmp_path: Path, share: bool
) -> None:
    empty = tmp_path / "empty"
    empty.touch()
    with FileBackend("f", SIZE, empty, share=share):
        pass
    assert empty.stat().st_size == SIZE

    large = tmp_path / "large"
    contents = os.urandom(SIZE + 12345)
    large.write_bytes(contents)
    with FileBackend("f", SIZE, large, share=share) as mem:
        assert mem.read(0, 4096) == contents[:4096]
        assert mem.read(SIZE - 4096, 4096) == contents[SIZE - 4096 : SIZE]
    assert large.read_bytes() == contents


def test_file_backend_failing_late_leaves_the_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mapping that fails after the empty file was grown: it is empty again, with its mtime;
    a file created for the backend is removed."""
    empty = tmp_path / "empty"
    empty.touch()
    os.utime(empty, ns=(1_000_000_000, 2_000_000_000))
    before = _file_state(empty)

    def refuse(*args: object) -> int:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(libc, "map_aligned", refuse)
    with pytest.raises(HostMemoryError, match="cannot map"):
        FileBackend("f", SIZE, empty, share=True)
    assert _file_state(empty) == before
    with pytest.raises(HostMemoryError, match="cannot map"):
        FileBackend("f", SIZE, tmp_path / "new", share=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_file_backend_revert_undoes_what_creating_it_did(tmp_path: Path) -> None:
    """For a backend whose object is thrown away (the machine could not start)."""
    empty = tmp_path / "empty"
    empty.touch()
    os.utime(empty, ns=(1_000_000_000, 2_000_000_000))
    before = _file_state(empty)
    FileBackend("f", SIZE, empty, share=True).revert()
    assert _file_state(empty) == before
    FileBackend("f", SIZE, tmp_path / "new").revert()
    large = tmp_path / "large"
    large.write_bytes(b"\x5a" * SIZE)
    FileBackend("f", SIZE, large, share=True).revert()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "large"]
    assert large.read_bytes() == b"\x5a" * SIZE


def _fifo(d: Path) -> Path:
    os.mkfifo(d / "fifo")
    return d / "fifo"


def _socket(d: Path) -> Path:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "sock"))
    sock.close()
    return d / "sock"


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (_fifo, "is a FIFO"),
        (_socket, "is a socket"),
        (lambda d: Path("/dev/null"), "is a character device"),
        (lambda d: Path("/proc/self/comm"), "is on proc"),
        (lambda d: Path("/sys/kernel/mm/transparent_hugepage/enabled"), "is on sysfs"),
    ],
)
def test_file_backend_refuses_what_is_not_a_file_or_directory(
    tmp_path: Path, make: Callable[[Path], Path], what: str
) -> None:
    path = make(tmp_path)
    if not path.exists():
        pytest.skip(f"{path} does not exist here")
    before = path.lstat()
    contents = path.read_bytes() if path.is_file() else None
    with pytest.raises(HostMemoryError, match=f"mem-path '{path}' {what}"):
        FileBackend("f", SIZE, path, share=True)
    after = path.lstat()
    assert (after.st_size, after.st_mode, after.st_mtime_ns) == (
        before.st_size,
        before.st_mode,
        before.st_mtime_ns,
    )
    if contents is not None:
        assert path.read_bytes() == contents


def test_file_backend_refuses_a_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "missing")
    with pytest.raises(HostMemoryError, match="dangling symbolic link"):
        FileBackend("f", SIZE, link)
    assert not (tmp_path / "missing").exists()


def test_private_named_file_discard_reverts_to_file_contents(tmp_path: Path) -> None:
    path = tmp_path / "image"
    path.write_bytes(b"\xaa" * SIZE)
    with FileBackend("f", SIZE, path) as mem:
        mem.write(2 * MiB, PATTERN)
        mem.discard(2 * MiB, 4 * MiB)
        assert mem.read(2 * MiB, 4 * MiB) == b"\xaa" * (4 * MiB)
    assert path.read_bytes() == b"\xaa" * SIZE


def test_file_backend_discard_data_punches_file_on_close(tmp_path: Path) -> None:
    path = tmp_path / "scratch"
    with FileBackend("f", SIZE, path, share=True, discard_data=True) as mem:
        mem.write(0, PATTERN)
    st = path.stat()
    assert (st.st_size, st.st_blocks) == (SIZE, 0)


def test_file_backend_bad_path(tmp_path: Path) -> None:
    with pytest.raises(HostMemoryError, match=r"'f' .*cannot open mem-path .*nodir"):
        FileBackend("f", SIZE, tmp_path / "nodir" / "file")


def _hugetlb_memfd(id: str, size: int, hugetlbsize: int) -> MemfdBackend:
    """A hugetlb memfd without reservation: works even with an empty huge page pool."""
    try:
        return MemfdBackend(id, size, hugetlb=True, hugetlbsize=hugetlbsize, reserve=False)
    except HostMemoryError as exc:
        if "cannot create memfd" in str(exc):
            pytest.skip(f"host lacks this hugetlb size: {exc}")
        raise


def test_hugetlb_memfd_page_size_and_block_size() -> None:
    with _hugetlb_memfd("h2m", 4 * MiB, hugetlbsize=2 * MiB) as mem:
        assert mem.hugetlb
        assert mem.page_size == 2 * MiB
        assert mem.host_addr % (2 * MiB) == 0
        assert default_block_size(mem, PAGES) == 2 * MiB
        with pytest.raises(HostMemoryError, match="0x200000 page boundary"):
            mem.discard(0, PAGE)


def test_hugetlbfs_detection_on_paths_and_file_backend(tmp_path: Path) -> None:
    assert hugetlbfs_page_size(tmp_path) is None
    assert hugetlbfs_page_size(tmp_path / "missing" / "file") is None
    with MemfdBackend("shm", SIZE) as shm:
        assert hugetlbfs_page_size(f"/proc/self/fd/{shm.fd}") is None
    # A hugetlb memfd lives on the kernel's internal hugetlbfs mount; /proc/self/fd reaches it.
    with _hugetlb_memfd("h", 4 * MiB, hugetlbsize=2 * MiB) as huge:
        path = f"/proc/self/fd/{huge.fd}"
        assert hugetlbfs_page_size(path) == 2 * MiB
        with FileBackend("f", 4 * MiB, path, share=True, reserve=False) as file:
            assert file.page_size == 2 * MiB
            assert default_block_size(file, PAGES) == 2 * MiB


def test_populate_preallocates(tmp_path: Path) -> None:
    with RamBackend("r", SIZE) as ram, MemfdBackend("m", SIZE) as memfd:
        ram.populate(2 * MiB, 4 * MiB)
        assert ram.resident_bytes(2 * MiB, 4 * MiB) == 4 * MiB
        assert ram.resident_bytes(6 * MiB, 2 * MiB) == 0
        memfd.populate(0, 4 * MiB)
        assert memfd.allocated_bytes() == 4 * MiB
        with pytest.raises(HostMemoryError, match=r"populate range .* page boundary"):
            ram.populate(PAGE // 2, PAGE)


def test_populate_without_huge_pages_fails_instead_of_sigbus() -> None:
    if _free_huge_pages():
        pytest.skip("host has free huge pages")
    needle = r"'h' .*cannot preallocate \[0x0, 0x200000\): the host could not supply"
    with _hugetlb_memfd("h", 4 * MiB, hugetlbsize=2 * MiB) as mem:
        with pytest.raises(HostMemoryError, match=needle):
            mem.populate(0, 2 * MiB)
        assert mem.allocated_bytes() == 0


def test_hugetlb_memfd_1g_block_size() -> None:
    if not os.path.isdir("/sys/kernel/mm/hugepages/hugepages-1048576kB"):
        pytest.skip("no 1 GiB huge pages on this host")
    with _hugetlb_memfd("h1g", 2 * GiB, hugetlbsize=GiB) as mem:
        assert mem.page_size == GiB
        assert default_block_size(mem, PAGES) == GiB


def test_hugetlb_memfd_size_must_be_huge_page_multiple() -> None:
    with pytest.raises(HostMemoryError, match=r"size 0x300000 .* page size 0x200000"):
        _hugetlb_memfd("h", 3 * MiB, hugetlbsize=2 * MiB)


def test_hugetlb_reserve_without_free_pages_fails() -> None:
    if _free_huge_pages():
        pytest.skip("host has free huge pages")
    with pytest.raises(HostMemoryError, match=r"can't reserve .*reserve=off"):
        MemfdBackend("h", 2 * MiB, hugetlb=True)


def test_hugetlbsize_validation() -> None:
    with pytest.raises(HostMemoryError, match="hugetlbsize requires hugetlb=on"):
        MemfdBackend("m", SIZE, hugetlbsize=2 * MiB)
    with pytest.raises(HostMemoryError, match="hugetlbsize 0x300000 is not a power of two"):
        MemfdBackend("m", SIZE, hugetlb=True, hugetlbsize=3 * MiB)
