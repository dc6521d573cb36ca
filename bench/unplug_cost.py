"""Benchmark: what one memslot delete costs the guest, KVM's SLOT_ZAP_ALL quirk on and off.

For each setting of the quirk (``-accel kvm,slot-zap-all=on|off``), each memslot size (a
virtio-mem device with ``memslot-size`` = its size: 1 GiB, 4 GiB, and a single 1 TiB memslot)
and each guest working set (frames the probe vCPU keeps using in boot RAM, *outside* the
deleted memslot), on the real kernel:

1. the guest plugs one block through the device (the memslot is created) and writes into it;
2. the vCPU passes over its working set twice (warm), then three times more: the baseline;
3. the guest unplugs the block: the device deletes the memslot. ``delete_ms`` is the time of
   that KVM_SET_USER_MEMORY_REGION ioctl;
4. the vCPU passes over its working set again. ``refault_ms`` is that pass minus the baseline
   (guest time inside KVM_RUN only): with the quirk on, every frame faults back in.

Times are the thread's CPU time (``time.thread_time``) inside the ioctls: on an idle host that
is the wall-clock stall, and unlike wall-clock time it does not double while other jobs keep a
shared host's two CPUs busy (seen here: wall-clock runs 1.0x-2.2x the CPU time, CPU time
within a few percent from run to run). ``total_wall_ms`` gives the wall-clock total too.

KVM's own counters say why: ``shadow_pages_zapped`` (the VM's ``mmu_shadow_zapped`` during the
delete) and ``refault_faults`` (the vCPU's ``pf_fixed`` in that pass beyond a usual pass).

``total_ms = delete_ms + refault_ms`` is the guest's stall for the unplug; medians over
``--repeat`` repetitions (``--repeat-1t`` for the 1 TiB memslot). ``model_total_ms`` is
:func:`memslots.kvm.cost.unmap_cost` with the constants in ``memslots/kvm/cost.py``;
``"fit"`` is the formula's constants fitted to *this* run (weighted least squares on relative
errors), which is where those constants come from (re-run on your host: hosts differ).

A frame is a 2 MiB guest page of which the vCPU uses one 4 KiB page. Boot RAM is mapped
without transparent huge pages (MADV_NOHUGEPAGE), so every frame costs one shadow page and
one SPTE, as a guest using 4 KiB pages does, and 4 KiB of host memory.

Each working set gets two VMs of its own (quirk on, quirk off), so a VM has exactly that many
shadow pages when the memslot is deleted (with the quirk off, nothing else would ever zap them);
their repetitions alternate, so both settings see the same load of a shared host. The report
records the load average: on a busy host every figure grows (up to 2x seen here), the ratios
much less.

    .venv/bin/python bench/unplug_cost.py [--json] [--sizes 1G,4G,1T]
        [--working-sets 0,2048,16384] [--repeat 5] [--repeat-1t 2]

Writes bench/results/unplug_cost.{json,md} (unless --no-write). The 1 TiB memslot costs about
2.5 GiB of kernel memory while it exists; it is created and deleted once per repetition.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memslots.devices.virtio_mem.device import VirtioMem
from memslots.guest.inorder import drive_to
from memslots.kvm.cost import UNMAP_COST_MEASURED, UnmapCostConstants, unmap_cost
from memslots.kvm.host import host_info
from memslots.kvm.vcpu import FRAME_SIZE, ProbeVcpu
from memslots.kvm.vm import KvmVm
from memslots.machine.machine import Machine
from memslots.memory.address_space import GuestMemory
from memslots.options import parse_machine_config
from memslots.sizes import GiB, MiB, TiB, align_up, format_size, parse_size

RESULTS = Path(__file__).parent / "results"
#: Working-set frames start here, in boot RAM above 4 GiB.
WS_BASE = 4 * GiB
BASELINE_PASSES = 3

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


@dataclass
class Row:
    """One cell of the grid: medians over the repetitions."""

    quirk: str
    memslot_size: int
    working_set_frames: int
    delete_ms: float
    refault_ms: float
    total_ms: float
    model_total_ms: float
    baseline_pass_ms: float
    total_wall_ms: float
    shadow_pages_zapped: int
    refault_faults: int
    repeats: int

    def to_json(self) -> dict[str, object]:
        """The row as ``--json`` prints it (the issue's keys first)."""
        return {
            "quirk": self.quirk,
            "memslot_size": self.memslot_size,
            "working_set_frames": self.working_set_frames,
            "delete_ms": round(self.delete_ms, 4),
            "refault_ms": round(self.refault_ms, 4),
            "total_ms": round(self.total_ms, 4),
            "model_total_ms": round(self.model_total_ms, 4),
            "baseline_pass_ms": round(self.baseline_pass_ms, 4),
            "total_wall_ms": round(self.total_wall_ms, 4),
            "shadow_pages_zapped": self.shadow_pages_zapped,
            "refault_faults": self.refault_faults,
            "repeats": self.repeats,
        }


def _no_thp(addr: int, length: int) -> None:
    if _libc.madvise(addr, length, mmap.MADV_NOHUGEPAGE) != 0:
        raise OSError(ctypes.get_errno(), "madvise(MADV_NOHUGEPAGE)")


def _machine(quirk_on: bool, sizes: Sequence[int], frames: int) -> tuple[Machine, KvmVm]:
    """Boot RAM big enough for the working set, one virtio-mem device per memslot size."""
    ram = align_up(WS_BASE + frames * FRAME_SIZE, GiB) - GiB  # 3 GiB below 4 GiB, rest above
    objects = [
        f"memory-backend-ram,id=m{i},size={size},reserve=off" for i, size in enumerate(sizes)
    ]
    devices = [
        f"virtio-mem,id=d{i},memdev=m{i},memslot-size={size}" for i, size in enumerate(sizes)
    ]
    maxmem = ram + sum(sizes) + len(sizes) * GiB
    config = parse_machine_config(
        f"{ram // MiB}M,maxmem={maxmem // MiB}M",
        objects,
        devices,
        accel=f"kvm,slot-zap-all={'on' if quirk_on else 'off'}",
    )
    vm = KvmVm(slot_zap_all=quirk_on)
    machine = Machine(config, vm=vm)
    try:
        assert machine.boot_ram is not None
        boot = machine.boot_ram.memory
        _no_thp(boot.host_addr, boot.size)
        for i in range(len(sizes)):
            mem = machine.virtio_mem(f"d{i}").memdev
            assert mem is not None
            _no_thp(mem.memory.host_addr, mem.memory.size)
    except BaseException:
        machine.close()
        raise
    return machine, vm


def _pass(vcpu: ProbeVcpu, gpas: Sequence[int]) -> tuple[float, float, int]:
    """One read pass over ``gpas``: the guest's time inside KVM_RUN in ms (CPU, wall) and the
    page faults KVM fixed."""
    if not gpas:
        return 0.0, 0.0, 0
    before, faults = vcpu.stats, vcpu.kvm_stats()["pf_fixed"]
    values = vcpu.read64_many(gpas)
    if any(v is None for v in values):
        raise RuntimeError("a working-set frame came back as MMIO")
    after = vcpu.stats
    return (
        (after.run_cpu_seconds - before.run_cpu_seconds) * 1e3,
        (after.run_seconds - before.run_seconds) * 1e3,
        vcpu.kvm_stats()["pf_fixed"] - faults,
    )


@dataclass(frozen=True)
class Unplug:
    """One measured unplug: CPU times (ms), wall-clock times (ms), KVM's counters."""

    delete_ms: float
    refault_ms: float
    baseline_ms: float
    delete_wall_ms: float
    refault_wall_ms: float
    #: Shadow pages the delete zapped (KVM's mmu_shadow_zapped).
    zapped: int
    #: Page faults of the pass after the delete, beyond the baseline pass's (pf_fixed).
    refaults: int


def _one_unplug(machine: Machine, vcpu: ProbeVcpu, dev: VirtioMem, ws: Sequence[int]) -> Unplug:
    """Plug a block, use it, warm up, unplug it (the memslot is deleted), pass again."""
    drive_to(dev, dev.block_size)
    if not vcpu.write64_many([(dev.addr + 8, 0x5A5A)]):
        raise RuntimeError("the plugged block came back as MMIO")
    for _ in range(2):
        _pass(vcpu, ws)
    baseline = [_pass(vcpu, ws) for _ in range(BASELINE_PASSES)]
    assert isinstance(machine.vm, KvmVm)
    kvm = machine.kvm
    deletes, wall, cpu = kvm.deletes, kvm.delete_seconds, kvm.delete_cpu_seconds
    zapped = machine.vm.stats()["mmu_shadow_zapped"]
    drive_to(dev, 0)
    if kvm.deletes != deletes + 1:
        raise RuntimeError(f"unplugging the block deleted {kvm.deletes - deletes} memslots")
    zapped = machine.vm.stats()["mmu_shadow_zapped"] - zapped
    after_cpu, after_wall, after_faults = _pass(vcpu, ws)
    return Unplug(
        delete_ms=(kvm.delete_cpu_seconds - cpu) * 1e3,
        refault_ms=after_cpu - statistics.median(b[0] for b in baseline) if ws else 0.0,
        baseline_ms=statistics.median(b[0] for b in baseline),
        delete_wall_ms=(kvm.delete_seconds - wall) * 1e3,
        refault_wall_ms=after_wall - statistics.median(b[1] for b in baseline) if ws else 0.0,
        zapped=zapped,
        refaults=round(after_faults - statistics.median(b[2] for b in baseline)),
    )


def _row(
    quirk_on: bool, size: int, frames: int, runs: Sequence[Unplug], constants: UnmapCostConstants
) -> Row:
    model = unmap_cost(size, slot_zap_all=quirk_on, working_set_frames=frames, constants=constants)
    return Row(
        quirk="on" if quirk_on else "off",
        memslot_size=size,
        working_set_frames=frames,
        delete_ms=statistics.median(r.delete_ms for r in runs),
        refault_ms=statistics.median(r.refault_ms for r in runs),
        total_ms=statistics.median(r.delete_ms + r.refault_ms for r in runs),
        model_total_ms=model.total_ms,
        baseline_pass_ms=statistics.median(r.baseline_ms for r in runs),
        total_wall_ms=statistics.median(r.delete_wall_ms + r.refault_wall_ms for r in runs),
        shadow_pages_zapped=round(statistics.median(r.zapped for r in runs)),
        refault_faults=round(statistics.median(r.refaults for r in runs)),
        repeats=len(runs),
    )


def measure(
    sizes: Sequence[int],
    working_sets: Sequence[int],
    *,
    repeat: int = 5,
    repeat_1t: int = 2,
    constants: UnmapCostConstants = UNMAP_COST_MEASURED,
    progress: Callable[[str], None] | None = None,
) -> list[Row]:
    """The whole grid on the real kernel: per working set, one VM with the quirk and one
    without, whose repetitions alternate (on, off, on, off, ...) so that both settings see the
    same load of a shared host."""
    rows: list[Row] = []
    for frames in working_sets:
        setups: list[tuple[bool, Machine, KvmVm]] = []
        vcpus: list[ProbeVcpu] = []
        try:
            for quirk_on in (True, False):
                machine, vm = _machine(quirk_on, sizes, frames)
                setups.append((quirk_on, machine, vm))
                if vm.slot_zap_all != quirk_on:
                    raise RuntimeError("this kernel cannot disable KVM_X86_QUIRK_SLOT_ZAP_ALL")
                vcpus.append(ProbeVcpu(vm, GuestMemory(machine.address_space)))
            ws = [WS_BASE + i * FRAME_SIZE for i in range(frames)]
            for (_, machine, _), vcpu in zip(setups, vcpus, strict=True):
                if ws and not vcpu.write64_many([(g, g | 1) for g in ws]):
                    raise RuntimeError("a working-set frame came back as MMIO")
                # One unrecorded cycle: the first delete of a VM pays one-off costs.
                _one_unplug(machine, vcpu, machine.virtio_mem("d0"), ws)
            for i, size in enumerate(sizes):
                if progress:
                    progress(f"{format_size(size)} memslot, {frames} frames")
                runs: dict[bool, list[Unplug]] = {True: [], False: []}
                for _ in range(repeat_1t if size >= TiB else repeat):
                    for (quirk_on, machine, _), vcpu in zip(setups, vcpus, strict=True):
                        dev = machine.virtio_mem(f"d{i}")
                        runs[quirk_on].append(_one_unplug(machine, vcpu, dev, ws))
                for quirk_on in (True, False):
                    rows.append(_row(quirk_on, size, frames, runs[quirk_on], constants))
        finally:
            for vcpu in vcpus:
                vcpu.close()
            for _, machine, _ in setups:
                machine.close()
    rows.sort(key=lambda r: (r.quirk != "on", r.working_set_frames, r.memslot_size))
    return rows


# -- fitting the constants ---------------------------------------------------------------------


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve the small square system ``a x = b`` (Gaussian elimination, partial pivoting)."""
    n = len(b)
    m = [[*row, rhs] for row, rhs in zip(a, b, strict=True)]
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        if m[col][col] == 0:
            raise ValueError("singular system: the grid does not determine every constant")
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col], strict=True)]
    return [m[i][n] / m[i][i] for i in range(n)]


def _relative_fit(xs: list[list[float]], ys: list[float]) -> list[float]:
    """Least squares of ``y ~ x . c`` minimising relative errors ((y - x.c) / y)^2."""
    k = len(xs[0])
    w = [1.0 / (y * y) for y in ys]
    a = [
        [sum(wi * x[i] * x[j] for wi, x in zip(w, xs, strict=True)) for j in range(k)]
        for i in range(k)
    ]
    b = [sum(wi * x[i] * y for wi, x, y in zip(w, xs, ys, strict=True)) for i in range(k)]
    return _solve(a, b)


def fit(rows: Sequence[Row], host: str) -> UnmapCostConstants:
    """The formula's constants from a grid (see memslots.kvm.cost)."""
    on = [r for r in rows if r.quirk == "on"]
    off = [r for r in rows if r.quirk == "off"]
    gib = 1 << 30
    base_on, per_frame_on, per_gib_on = _relative_fit(
        [[1.0, r.working_set_frames, r.memslot_size / gib] for r in on], [r.delete_ms for r in on]
    )
    base_off, per_gib_off, per_gib_frame_off, per_gib_frame2_off = _relative_fit(
        [
            [1.0, s, s * r.working_set_frames, s * r.working_set_frames**2]
            for r in off
            for s in [r.memslot_size / gib]
        ],
        [r.delete_ms for r in off],
    )
    refault = [r for r in on if r.working_set_frames and r.refault_ms > 0]
    (per_frame_refault,) = _relative_fit(
        [[float(r.working_set_frames)] for r in refault], [r.refault_ms for r in refault]
    )
    return UnmapCostConstants(
        host=host,
        source="bench/unplug_cost.py (this run)",
        zap_all_base_ms=base_on,
        zap_all_per_frame_ms=per_frame_on,
        free_per_gib_ms=per_gib_on,
        zap_slot_base_ms=base_off,
        zap_slot_per_gib_ms=per_gib_off,
        zap_slot_per_gib_frame_ms=per_gib_frame_off,
        zap_slot_per_gib_frame2_ms=per_gib_frame2_off,
        refault_per_frame_ms=per_frame_refault,
    )


def acceptance(rows: Sequence[Row], frames: int = 2048) -> list[dict[str, object]]:
    """Per memslot size, at ``frames``: total stall quirk off / quirk on, and model errors."""
    out: list[dict[str, object]] = []
    for size in sorted({r.memslot_size for r in rows}):
        cell = {
            r.quirk: r for r in rows if r.memslot_size == size and r.working_set_frames == frames
        }
        if set(cell) != {"on", "off"}:
            continue
        on, off = cell["on"], cell["off"]
        out.append(
            {
                "memslot_size": size,
                "working_set_frames": frames,
                "off_over_on": off.total_ms / on.total_ms,
                "model_error_on": on.model_total_ms / on.total_ms - 1,
                "model_error_off": off.model_total_ms / off.total_ms - 1,
            }
        )
    return out


def host_description() -> str:
    """The host, as the constants' ``host`` field records it."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}; kernel {platform.release()}; {host_info().mmu.describe()}"


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def _ms(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def markdown(report: dict[str, Any], rows: Sequence[Row]) -> str:
    """bench/results/unplug_cost.md."""
    lines = [
        "# What one memslot delete costs the guest: KVM_X86_QUIRK_SLOT_ZAP_ALL on vs off",
        "",
        f"Host: {report['host']}. Load average (1, 5, 15 min) at the start "
        f"{report['loadavg']['start']}, at the end {report['loadavg']['end']}.",
        "Medians of CPU time; delete = the KVM_SET_USER_MEMORY_REGION ioctl that deletes the "
        "memslot when the guest unplugs its last block; re-fault = the vCPU's next pass over its "
        "working set (other memory, in boot RAM) minus its usual pass; model = "
        "`memslots.kvm.cost.unmap_cost` with the constants committed in memslots/kvm/cost.py; "
        "wall = the total in wall-clock time; zapped / re-faults: KVM's counters.",
        "",
        "| quirk | memslot | working set (frames) | delete ms | re-fault ms | total ms "
        "| model total ms | model / measured | wall ms | shadow pages zapped | re-faults |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r.model_total_ms / r.total_ms:.2f}" if r.total_ms > 0 else "-"
        lines.append(
            f"| {r.quirk} | {format_size(r.memslot_size)} | {r.working_set_frames} "
            f"| {_ms(r.delete_ms)} | {_ms(r.refault_ms)} | {_ms(r.total_ms)} "
            f"| {_ms(r.model_total_ms)} | {ratio} | {_ms(r.total_wall_ms)} "
            f"| {r.shadow_pages_zapped} | {r.refault_faults} |"
        )
    lines += ["", "Quirk off / quirk on, total stall with 2048 frames in use elsewhere:", ""]
    acc = report["acceptance"]
    assert isinstance(acc, list)
    for a in acc:
        lines.append(
            f"- {format_size(a['memslot_size'])} memslot: {a['off_over_on']:.3f} "
            f"(model error: quirk on {a['model_error_on']:+.0%}, off {a['model_error_off']:+.0%})"
        )
    fitted = report["fit"]
    assert isinstance(fitted, dict)
    lines += [
        "",
        "Constants fitted to this run (ms; `memslots/kvm/cost.py` documents the formula):",
        "",
        *(f"- {k}: {v:.6g}" for k, v in fitted.items() if isinstance(v, float)),
        "",
        f"Command: `.venv/bin/python {report['command']}` ({report['seconds']:.0f} s)",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default="1G,4G,1T")
    parser.add_argument("--working-sets", default="0,2048,16384")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--repeat-1t", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    parser.add_argument("--no-write", action="store_true", help="Do not write bench/results.")
    args = parser.parse_args(argv)
    if not host_info().kvm:
        print("unplug_cost: /dev/kvm is not available; nothing to measure", file=sys.stderr)
        return 2
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    working_sets = [int(w) for w in args.working_sets.split(",")]
    t0 = time.perf_counter()
    load_start = _loadavg()
    rows = measure(
        sizes,
        working_sets,
        repeat=args.repeat,
        repeat_1t=args.repeat_1t,
        progress=lambda what: print(f"unplug_cost: {what}", file=sys.stderr),
    )
    host = host_description()
    report: dict[str, object] = {
        "rows": [r.to_json() for r in rows],
        "host": host,
        "loadavg": {"start": load_start, "end": _loadavg()},
        "command": " ".join(
            ["bench/unplug_cost.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "seconds": time.perf_counter() - t0,
        "acceptance": acceptance(rows),
        "model_constants": UNMAP_COST_MEASURED.to_json(),
    }
    try:
        report["fit"] = fit(rows, host).to_json()
    except (ValueError, ZeroDivisionError) as exc:
        report["fit"] = {"error": str(exc)}
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "unplug_cost.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / "unplug_cost.md").write_text(markdown(report, rows))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(markdown(report, rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
