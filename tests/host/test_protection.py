"""Host memory out of reach: ``HostMemory.protect`` against what the kernel's maps say, the
VMM's own copies refused instead of faulting, and discards that still work."""

from __future__ import annotations

import errno
import mmap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from memslots.errors import AddressSpaceError, HostMemoryError, InaccessibleMemoryError
from memslots.host import libc
from memslots.host.memory import FileBackend, HostMemory, MemfdBackend, RamBackend
from memslots.host.pages import host_page_size

PAGE = host_page_size()
PAGES = 64
SIZE = PAGES * PAGE


def none_ranges(mem: HostMemory) -> list[tuple[int, int]]:
    """The backend's ``PROT_NONE`` ranges as offsets, from /proc/self/maps (merged)."""
    lo, hi = mem.host_addr, mem.host_addr + mem.size
    out: list[tuple[int, int]] = []
    with open("/proc/self/maps") as f:
        for line in f:
            span, perms = line.split()[:2]
            start, end = (int(x, 16) for x in span.split("-"))
            if end <= lo or start >= hi or perms[:3] != "---":
                continue
            piece = (max(start, lo) - lo, min(end, hi) - lo)
            if out and out[-1][1] == piece[0]:
                out[-1] = (out[-1][0], piece[1])
            else:
                out.append(piece)
    return out


MAKERS: dict[str, Callable[[Path], HostMemory]] = {
    "ram": lambda _p: RamBackend("r", SIZE),
    "ram-shared": lambda _p: RamBackend("r", SIZE, share=True),
    "memfd": lambda _p: MemfdBackend("m", SIZE),
    "memfd-private": lambda _p: MemfdBackend("m", SIZE, share=False),
    "file": lambda p: FileBackend("f", SIZE, p, share=True),
}


@pytest.fixture(params=sorted(MAKERS))
def mem(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HostMemory]:
    with MAKERS[request.param](tmp_path) as m:
        yield m


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, PAGES - 1), st.integers(1, 8))))
def test_the_record_is_what_the_kernel_has(ops: list[tuple[bool, int, int]]) -> None:
    with RamBackend("r", SIZE) as mem:
        model = [False] * PAGES
        for protect, first, count in ops:
            count = min(count, PAGES - first)
            if protect:
                mem.protect(first * PAGE, count * PAGE)
            else:
                mem.unprotect(first * PAGE, count * PAGE)
            model[first : first + count] = [protect] * count
        expect: list[tuple[int, int]] = []
        for i, p in enumerate(model):
            if p and expect and expect[-1][1] == i * PAGE:
                expect[-1] = (expect[-1][0], (i + 1) * PAGE)
            elif p:
                expect.append((i * PAGE, (i + 1) * PAGE))
        assert none_ranges(mem) == expect
        assert mem.protected_bytes == sum(model) * PAGE
        for i in range(PAGES):
            assert mem.inaccessible(i * PAGE, PAGE) == model[i]


def test_copies_are_refused_not_faulted(mem: HostMemory) -> None:
    mem.write(2 * PAGE, b"kept")
    gen = mem.access_generation
    mem.protect(PAGE, 2 * PAGE)
    assert mem.access_generation != gen
    with pytest.raises(InaccessibleMemoryError, match=r"\[0x1ffc, 0x2004\) is inaccessible"):
        mem.write(2 * PAGE - 4, b"12345678")  # straddles: nothing is copied
    assert mem.read(PAGE - 4, 4) == bytes(4)
    with pytest.raises(InaccessibleMemoryError) as info:
        mem.read(2 * PAGE, 4)
    assert isinstance(info.value, HostMemoryError) and isinstance(info.value, AddressSpaceError)
    with pytest.raises(InaccessibleMemoryError):
        mem.populate(0, 4 * PAGE)
    mem.read(3 * PAGE, 4)  # the page after is in reach
    mem.unprotect(PAGE, 2 * PAGE)
    assert mem.read(2 * PAGE, 4) == b"kept" and none_ranges(mem) == []
    mem.close()
    assert mem.access_generation != gen


def test_discard_works_out_of_reach(mem: HostMemory) -> None:
    mem.write(PAGE, b"gone")
    mem.protect(0, 4 * PAGE)
    mem.discard(0, 4 * PAGE)
    assert none_ranges(mem) == [(0, 4 * PAGE)]
    mem.unprotect(0, 4 * PAGE)
    assert mem.read(PAGE, 4) == bytes(4)


def test_madv_remove_refused_out_of_reach_opens_the_range_for_the_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kernels that want a writable mapping for MADV_REMOVE refuse it with EACCES: the
    protected parts are opened for the call alone."""
    calls: list[bool] = []
    real = libc.madvise

    def madvise(addr: int, length: int, advice: int, name: str) -> None:
        if advice == mmap.MADV_REMOVE:
            closed = bool(none_ranges(shared))
            calls.append(closed)
            if closed:
                raise OSError(errno.EACCES, "madvise(MADV_REMOVE) failed: Permission denied")
        real(addr, length, advice, name)

    with RamBackend("r", SIZE, share=True) as shared:
        shared.write(2 * PAGE, b"gone")
        shared.protect(0, PAGE)
        shared.protect(3 * PAGE, PAGE)
        monkeypatch.setattr(libc, "madvise", madvise)
        shared.discard(0, 4 * PAGE)
        assert calls == [True, False]
        assert none_ranges(shared) == [(0, PAGE), (3 * PAGE, 4 * PAGE)]
        assert shared.read(2 * PAGE, 4) == bytes(4)


def test_a_failed_mprotect_keeps_the_range_counted_as_protected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """ENOMEM (``vm.max_map_count``) may come after part of the range changed: the record
    errs on the side of refusing copies."""

    def fail(addr: int, length: int, prot: int) -> None:
        raise OSError(errno.ENOMEM, "mprotect() failed: Cannot allocate memory")

    with RamBackend("r", SIZE) as mem:
        monkeypatch.setattr(libc, "mprotect", fail)
        with pytest.raises(HostMemoryError, match=r"cannot make .* inaccessible"):
            mem.protect(PAGE, PAGE)
        assert mem.inaccessible(PAGE, 1) and none_ranges(mem) == []
        monkeypatch.undo()
        mem.protect(PAGE, PAGE)
        monkeypatch.setattr(libc, "mprotect", fail)
        with pytest.raises(HostMemoryError, match="accessible again"):
            mem.unprotect(PAGE, PAGE)
        assert mem.inaccessible(PAGE, 1) and none_ranges(mem) == [(PAGE, 2 * PAGE)]


def test_protect_checks_its_range() -> None:
    with RamBackend("r", SIZE) as mem:
        with pytest.raises(HostMemoryError, match="page boundary"):
            mem.protect(1, PAGE)
        with pytest.raises(HostMemoryError, match="not inside the backend"):
            mem.unprotect(SIZE, PAGE)
        mem.protect(0, 0)
        assert mem.protected_bytes == 0
