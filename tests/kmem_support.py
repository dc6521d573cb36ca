"""A memslot stressor: another process on the host that creates and deletes 64 GiB memslots.

Kernel-measurement tests run beside it to show that their figures do not depend on what other
VMs on the host do: a 64 GiB shadow-paging memslot moves the host's VmallocUsed by 160 MiB, every
few tens of milliseconds, but is charged to the stressor's memory cgroup, not to ours.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

#: The stressor's loop. It runs in its own process on its own VM; SIGTERM ends the loop, and
#: the VM is closed (which frees its memslot) before the process exits.
STRESSOR = r"""
import ctypes, mmap, os, signal, sys, time
from memslots.kvm.vm import KvmVm

count_path, size = sys.argv[1], int(sys.argv[2])
stop = False

def on_term(signum, frame):
    global stop
    stop = True

signal.signal(signal.SIGTERM, on_term)
buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x4000)  # NORESERVE
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
vm = KvmVm()
n = 0
try:
    while not stop:
        vm.set_memory_region(0, 1 << 32, size, addr)
        time.sleep(0.002)
        vm.delete_memory_region(0)
        n += 1
        tmp = count_path + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(n))
        os.replace(tmp, count_path)
        time.sleep(0.002)
finally:
    vm.close()
"""

STRESSOR_SLOT_SIZE = 64 << 30


class Stressor:
    """The running stressor: its process and how many create/delete cycles it has done."""

    def __init__(self, proc: subprocess.Popen[bytes], count_path: Path) -> None:
        self.proc = proc
        self.count_path = count_path

    def cycles(self) -> int:
        """Create/delete cycles done so far."""
        try:
            return int(self.count_path.read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def wait_cycles(self, n: int, timeout: float = 30.0) -> None:
        """Wait until ``n`` more cycles have been done (the stressor is really running)."""
        target = self.cycles() + n
        deadline = time.monotonic() + timeout
        while self.cycles() < target:
            if self.proc.poll() is not None:
                raise AssertionError(f"the memslot stressor exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the memslot stressor did {self.cycles()} cycles only")
            time.sleep(0.01)


def run_stressor() -> Iterator[Stressor]:
    """Start the stressor, wait for its first cycles, yield it; always stop it afterwards."""
    tmp = Path(tempfile.mkdtemp(prefix="memslots-stressor-"))
    count_path = tmp / "cycles"
    proc = subprocess.Popen(
        [sys.executable, "-c", STRESSOR, str(count_path), str(STRESSOR_SLOT_SIZE)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    stressor = Stressor(proc, count_path)
    try:
        stressor.wait_cycles(2)
        yield stressor
        # It must still have been running when the test ended, or the test was not stressed.
        assert proc.poll() is None, f"the memslot stressor died: {proc.returncode}"
        stressor.wait_cycles(1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()  # the kernel closes its VM with the process
                proc.wait(timeout=20)
        if proc.stderr is not None:
            proc.stderr.close()
        for p in tmp.iterdir():
            p.unlink()
        os.rmdir(tmp)


#: What a running vCPU adds to a per-VM figure beyond memslot metadata: KVM's shadow MMU for the
#: guest's touches (the memory caches topped up before each fault -- shadow pages, page headers,
#: rmap descriptors -- and the shadow pages themselves; every memslot delete zaps them). Our own
#: page tables, which grow with every page the guest touches, are not in the figure (the meter
#: subtracts VmPTE). Measured here with the guest model's real vCPU: 38 to 96 pages.
VCPU_MMU_ALLOWANCE = 128 * 4096

#: How far a per-VM (cgroup v1) figure may be from the byte-exact model: slab objects are charged
#: from a per-CPU stock of whole pages, less than a page per CPU, plus a remainder of less than one.
STOCK_TOLERANCE = ((os.cpu_count() or 1) + 1) * 4096


def memory_cgroup_of(pid: int | str = "self") -> str:
    """The memory cgroup path of a process (cgroup v1's memory hierarchy, else v2's)."""
    v2 = None
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            num, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                return path
            if num == "0" and not controllers:
                v2 = path
    assert v2 is not None, f"process {pid} is in no memory cgroup"
    return v2


if __name__ == "__main__":
    # Run the stressor in the foreground (for running a whole suite beside it); SIGTERM stops it.
    with tempfile.TemporaryDirectory(prefix="memslots-stressor-") as tmp:
        sys.argv = ["stressor", os.path.join(tmp, "cycles"), str(STRESSOR_SLOT_SIZE)]
        exec(STRESSOR)
