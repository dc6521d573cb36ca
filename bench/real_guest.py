"""Compare the Linux guest model's virtio-mem request streams with a real Linux guest.

Boots a stock Debian 6.1 kernel (never installed on the host; extracted into a work directory)
under QEMU with a virtio-mem device, drives ``requested-size`` over QMP, records every request
with QEMU's ``virtio_mem_*`` trace events, and compares each step's stream with
``memslots simulate -accel sim --request-log`` for the same machine and trace.

Rerun:  .venv/bin/python bench/real_guest.py [--workdir /tmp/rg] [--accel auto|kvm|tcg]
Needs:  root, Debian apt (qemu-system-x86, busybox-static, cpio), network to the Debian mirror.
Writes: bench/results/real_guest.json and bench/results/real_guest.md.  Nothing else in the repo.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
MEMSLOTS = REPO / ".venv" / "bin" / "memslots"
MODULES = [
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_mem",
]
MiB = 1 << 20
GiB = 1 << 30
RESP = {0: "ack", 1: "nack", 2: "busy", 3: "error"}

# name -> (extra -device options, sizes in MiB (the first is the boot requested-size)
#          [, auto-online policy])
SEQUENCES: dict[str, tuple[Any, ...]] = {
    "sbm-worked-example": ("", [512, 900, 700]),
    "sbm-mixed": ("", [512, 1024, 300, 0, 1536]),
    "sbm-odd": ("", [0, 130, 386, 258, 2, 1000, 1002, 0]),
    "bbm-128M": (",block-size=128M", [512, 1024, 384, 0, 1536]),
    "bbm-1G": (",block-size=1G", [1024, 2048, 1024, 0, 2048]),
    "sbm-offline": ("", [512, 1536, 900, 0], "offline"),
    "sbm-kernel": ("", [512, 900, 700, 0], "online"),
}
ONLINE_FLAG = {"online_movable": "movable", "online": "kernel", "offline": "offline"}

INIT = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {mods}; do insmod /lib/modules/$m.ko; done
echo "RG: modules loaded; block_size=$(cat /sys/devices/system/memory/block_size_bytes)"
while true; do sleep 3600; done
"""


def sh(cmd: str, **kw: Any) -> str:
    out: str = subprocess.run(
        cmd, shell=True, check=True, capture_output=True, text=True, **kw
    ).stdout
    return out


def prepare(work: Path) -> dict[str, Any]:
    """Kernel + initramfs in WORK (cached)."""
    work.mkdir(parents=True, exist_ok=True)
    if (
        not shutil.which("qemu-system-x86_64")
        or not Path("/bin/busybox").exists()
        or not shutil.which("cpio")
    ):
        sh("apt-get install -y --no-install-recommends qemu-system-x86 busybox-static cpio")
    debs = sorted(work.glob("linux-image-6.1.*-amd64_*.deb"))
    if not debs:
        dep = sh("apt-cache depends linux-image-amd64")
        found = re.search(r"Depends: (linux-image-6\.1\.\S+-amd64)\b", dep)
        assert found is not None, "no Debian 6.1 kernel package"
        pkg = found.group(1)
        sh(f"apt-get download {pkg}", cwd=work)
        debs = sorted(work.glob("linux-image-6.1.*-amd64_*.deb"))
    kdir = work / "k"
    if not kdir.exists():
        sh(f"dpkg -x {debs[-1]} {kdir}")
    vmlinuz = sorted(kdir.glob("boot/vmlinuz-*"))[-1]
    kver = vmlinuz.name[len("vmlinuz-") :]
    config = (kdir / "boot" / f"config-{kver}").read_text()
    initrd = work / "initrd.gz"
    if not initrd.exists():
        ir = work / "ir"
        shutil.rmtree(ir, ignore_errors=True)
        for d in ("bin", "proc", "sys", "dev", "lib/modules"):
            (ir / d).mkdir(parents=True)
        shutil.copy("/bin/busybox", ir / "bin" / "busybox")
        for a in ("sh", "mount", "sleep", "insmod", "cat", "echo"):
            (ir / "bin" / a).symlink_to("busybox")
        mdir = kdir / "lib" / "modules" / kver / "kernel" / "drivers" / "virtio"
        for m in MODULES:
            shutil.copy(mdir / f"{m}.ko", ir / "lib" / "modules" / f"{m}.ko")
        (ir / "init").write_text(INIT.format(mods=" ".join(MODULES)))
        (ir / "init").chmod(0o755)
        cpio = subprocess.run(
            "find . | cpio -o -H newc", shell=True, cwd=ir, check=True, capture_output=True
        ).stdout
        initrd.write_bytes(gzip.compress(cpio))
    return {
        "kernel_package": debs[-1].name,
        "kernel": kver,
        "config": {
            k: v
            for k, v in re.findall(
                r"^(CONFIG_(?:VIRTIO|VIRTIO_PCI|VIRTIO_MEM|MEMORY_HOTPLUG"
                r"|MEMORY_HOTREMOVE|MHP_MEMMAP_ON_MEMORY))=(\S+)",
                config,
                re.M,
            )
        },
        "vmlinuz": str(vmlinuz),
        "initrd": str(initrd),
    }


class Qmp:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        deadline = time.time() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args: Any) -> Any:
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            msg = json.loads(self.f.readline())
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise RuntimeError(f"{name}: {msg['error']}")

    def close(self) -> None:
        self.s.close()


class Guest:
    """One QEMU process with a virtio-mem device and a trace file."""

    def __init__(
        self,
        work: Path,
        art: dict[str, Any],
        accel: str,
        devopts: str,
        boot_mib: int,
        tag: str,
        online: str = "online_movable",
    ):
        self.work = work
        self.trace = work / f"trace-{tag}.log"
        self.serial = work / f"serial-{tag}.log"
        self.qmp_path = str(work / f"qmp-{tag}.sock")
        for p in (self.trace, self.serial, Path(self.qmp_path)):
            p.unlink(missing_ok=True)
        cpu = (
            ["-accel", "kvm", "-cpu", "host,-arch-capabilities"]
            if accel == "kvm"
            else ["-accel", "tcg"]
        )
        self.argv = [
            "qemu-system-x86_64",
            *cpu,
            "-m",
            "4G,maxmem=8G",
            "-object",
            "memory-backend-ram,id=mem0,size=2G",
            "-device",
            f"virtio-mem-pci,id=vmem0,memdev=mem0,requested-size={boot_mib}M{devopts}",
            "-kernel",
            art["vmlinuz"],
            "-initrd",
            art["initrd"],
            "-append",
            f"console=ttyS0 memhp_default_state={online}",
            "-display",
            "none",
            "-nodefaults",
            "-serial",
            f"file:{self.serial}",
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
            "-trace",
            f"virtio_mem_*,file={self.trace}",
        ]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.qmp = Qmp(self.qmp_path)

    def booted(self, timeout: float) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.serial.exists() and "RG: modules loaded" in self.serial.read_text(
                errors="replace"
            ):
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.2)
        return False

    def get(self, prop: str) -> int:
        value: int = self.qmp.cmd("qom-get", path="/machine/peripheral/vmem0", property=prop)
        return value

    def lines(self) -> list[str]:
        return self.trace.read_text(errors="replace").splitlines() if self.trace.exists() else []

    def settle(self, target: int, timeout: float, quiet: float = 1.5) -> tuple[str, float]:
        """Wait for size == target and a quiet trace; return (outcome, seconds)."""
        t0 = time.time()
        last_n, last_change = -1, time.time()
        while True:
            n = len(self.lines())
            if n != last_n:
                last_n, last_change = n, time.time()
            size = self.get("size")
            now = time.time()
            if size == target and now - last_change >= quiet:
                return "reached", round(last_change - t0, 2)
            if now - t0 > timeout:
                return f"stuck at {size // MiB}M", round(now - t0, 2)
            time.sleep(0.2)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.qmp.cmd("quit")
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.qmp.close()


TRACE_RE = re.compile(r"virtio_mem_(plug|unplug|state)_request addr=0x([0-9a-f]+) nb_blocks=(\d+)")


def parse(lines: list[str], base: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for ln in lines:
        m = TRACE_RE.search(ln)
        if m:
            out.append(
                {
                    "type": m.group(1),
                    "offset": int(m.group(2), 16) - base,
                    "nb_blocks": int(m.group(3)),
                    "response": None,
                }
            )
        elif "virtio_mem_unplug_all_request" in ln:
            out.append({"type": "unplug_all", "offset": None, "nb_blocks": None, "response": None})
        elif (
            (m := re.search(r"virtio_mem_send_response type=(\d+)", ln))
            and out
            and out[-1]["response"] is None
        ):
            out[-1]["response"] = RESP.get(int(m.group(1)), m.group(1))
    return out


def run_real(
    work: Path,
    art: dict[str, Any],
    accel: str,
    name: str,
    devopts: str,
    sizes: list[int],
    timeout: float,
    online: str = "online_movable",
) -> dict[str, Any]:
    g = Guest(work, art, accel, devopts, sizes[0], name, online)
    try:
        if not g.booted(120):
            raise RuntimeError(
                f"{name}: guest did not boot ({g.serial.read_text(errors='replace')[-500:]!r})"
            )
        dev = g.qmp.cmd("query-memory-devices")[0]["data"]
        base = dev["memaddr"]
        steps = []
        cut = 0
        t_boot = time.time()
        for i, mib in enumerate(sizes):
            t_step = 0.0 if i == 0 else round(time.time() - t_boot, 1)
            if i:
                g.qmp.cmd(
                    "qom-set",
                    path="/machine/peripheral/vmem0",
                    property="requested-size",
                    value=mib * MiB,
                )
            outcome, secs = g.settle(mib * MiB, timeout)
            lines = g.lines()
            steps.append(
                {
                    "time": t_step,
                    "requested_mib": mib,
                    "size_mib": g.get("size") // MiB,
                    "outcome": outcome,
                    "seconds": secs,
                    "requests": parse(lines[cut:], base),
                }
            )
            cut = len(lines)
        serial = g.serial.read_text(errors="replace")
        warn = [ln.strip() for ln in serial.splitlines() if "virtio_mem" in ln]
        return {
            "address": base,
            "block_size": dev["block-size"],
            "region_size": dev["max-size"],
            "steps": steps,
            "guest_log": warn,
            "qemu_argv": g.argv,
        }
    finally:
        g.stop()


def memslots_cli(argv: list[str]) -> dict[str, Any]:
    """Run ``memslots ARGV`` (this checkout's CLI) and return the JSON it prints."""
    out = subprocess.run([str(MEMSLOTS), *argv], check=True, capture_output=True, text=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def run_model(
    work: Path,
    name: str,
    devopts: str,
    sizes: list[int],
    times: list[float],
    online: str = "online_movable",
    *,
    memslots: Callable[[list[str]], dict[str, Any]] = memslots_cli,
) -> dict[str, Any]:
    """The model on the same trace; step times are the real run's, so retry timers see the
    same gaps. ``memslots`` runs the command line (the golden test runs it in-process)."""
    csv = work / f"model-{name}.csv"
    csv.write_text(
        "time,requested-size\n" + "".join(f"{t},{m}M\n" for t, m in zip(times, sizes, strict=False))
    )
    argv = [
        "simulate",
        "-accel",
        "sim",
        "-m",
        "4G,maxmem=8G",
        "-object",
        "memory-backend-ram,id=mem0,size=2G",
        "-device",
        f"virtio-mem,id=vmem0,memdev=mem0{devopts}",
        "--trace",
        str(csv),
        "--request-log",
        "--json",
        "--guest-online",
        ONLINE_FLAG[online],
    ]
    res = memslots(argv)
    steps = [
        {
            "requested_mib": s["requested"] // MiB,
            "size_mib": s["plugged"] // MiB,
            "outcome": s["outcome"],
            "requests": [
                {k: r.get(k) for k in ("type", "offset", "nb_blocks", "response")}
                for r in s.get("request_log", [])
            ],
        }
        for s in res["steps"]
    ]
    return {
        "address": res["device"]["address"],
        "block_size": res["device"]["block_size"],
        "steps": steps,
        "argv": argv,
    }


def key(r: dict[str, Any]) -> tuple[Any, ...]:
    return (r["type"], r["offset"], r["nb_blocks"], r["response"])


def fmt(r: dict[str, Any]) -> str:
    if r["offset"] is None:
        return f"{r['type']}->{r['response']}"
    return f"{r['type']}(+{r['offset'] // MiB}M, {r['nb_blocks']})->{r['response']}"


def compare(real: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"match": True, "steps": []}
    for i, (rs, ms) in enumerate(zip(real["steps"], model["steps"], strict=False)):
        a, b = rs["requests"], ms["requests"]
        first = next(
            (
                j
                for j in range(max(len(a), len(b)))
                if j >= len(a) or j >= len(b) or key(a[j]) != key(b[j])
            ),
            None,
        )
        st = {
            "step": i,
            "requested_mib": rs["requested_mib"],
            "real_n": len(a),
            "model_n": len(b),
            "real_size_mib": rs["size_mib"],
            "model_size_mib": ms["size_mib"],
            "match": first is None and rs["size_mib"] == ms["size_mib"],
        }
        if first is not None:
            lo, hi = max(0, first - 3), first + 4
            st["first_diff"] = first
            st["real_context"] = [f"#{lo + k} {fmt(r)}" for k, r in enumerate(a[lo:hi])]
            st["model_context"] = [f"#{lo + k} {fmt(r)}" for k, r in enumerate(b[lo:hi])]
        out["match"] &= st["match"]
        out["steps"].append(st)
    if real["address"] != model["address"]:
        out["match"] = False
        out["address_mismatch"] = [real["address"], model["address"]]
    return out


def pick_accel(work: Path, art: dict[str, Any], want: str) -> tuple[str, str]:
    if want != "auto":
        return want, "requested"
    if not os.path.exists("/dev/kvm"):
        return "tcg", "no /dev/kvm"
    g = Guest(work, art, "kvm", "", 0, "kvmprobe")
    try:
        ok = g.booted(25)
        tail = g.serial.read_text(errors="replace")[-200:] if g.serial.exists() else ""
    finally:
        g.stop()
    if ok:
        return "kvm", "stock kernel boots under KVM"
    return (
        "tcg",
        f"stock kernel does not boot under this host's KVM (serial ends {tail.strip()!r}); "
        "using TCG",
    )


def write_md(doc: dict[str, Any]) -> str:
    L = [
        "# Real Linux guest vs the guest model: virtio-mem request streams",
        "",
        f"Kernel `{doc['env']['kernel']}` ({doc['env']['kernel_package']}), "
        f"QEMU `{doc['env']['qemu']}`, "
        f"accel `{doc['env']['accel']}` ({doc['env']['accel_reason']}). "
        "Guest: busybox initramfs, `memhp_default_state` as listed, idle. "
        "Machine: `-m 4G,maxmem=8G`, 2G memory-backend-ram, virtio-mem-pci. "
        "Generated by `bench/real_guest.py`.",
        "",
    ]
    L += [
        "| sequence | auto-online | device | sizes (MiB) | real requests | model requests "
        "| match |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in doc["sequences"].items():
        L.append(
            f"| {name} | {s['online']} | `{s['devopts'] or 'defaults'}` "
            f"| {' → '.join(map(str, s['sizes']))} | "
            f"{sum(len(x['requests']) for x in s['real']['steps'])} | "
            f"{sum(len(x['requests']) for x in s['model']['steps'])} | "
            f"{'yes' if s['compare']['match'] else '**no**'} |"
        )
    for name, s in doc["sequences"].items():
        L += ["", f"## {name}", ""]
        for st, rs in zip(s["compare"]["steps"], s["real"]["steps"], strict=False):
            L.append(
                f"- step {st['step']} → {st['requested_mib']}M: real {st['real_n']} requests "
                f"(size {st['real_size_mib']}M, {rs['outcome']}, {rs.get('seconds')} s), "
                f"model {st['model_n']} (size {st['model_size_mib']}M): "
                + ("match" if st["match"] else f"**differ at request #{st.get('first_diff')}**")
            )
            if "first_diff" in st:
                L += ["", "  | real | model |", "  |---|---|"]
                for k in range(max(len(st["real_context"]), len(st["model_context"]))):
                    a = st["real_context"][k] if k < len(st["real_context"]) else ""
                    b = st["model_context"][k] if k < len(st["model_context"]) else ""
                    L.append(f"  | {a} | {b} |")
                L.append("")
        if s["compare"].get("address_mismatch"):
            L.append(f"- device address differs: real/model = {s['compare']['address_mismatch']}")
    return "\n".join(L) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workdir", default="/tmp/rg")
    ap.add_argument("--accel", choices=["auto", "kvm", "tcg"], default="auto")
    ap.add_argument(
        "--timeout", type=float, default=90.0, help="seconds to wait for each step to settle"
    )
    ap.add_argument("--only", nargs="*", help="sequence names to run")
    a = ap.parse_args()
    work = Path(a.workdir)
    art = prepare(work)
    accel, reason = pick_accel(work, art, a.accel)
    print(f"accel={accel}: {reason}", file=sys.stderr)
    qemu_ver = sh("qemu-system-x86_64 --version").splitlines()[0]
    doc: dict[str, Any] = {
        "env": {
            **{k: art[k] for k in ("kernel", "kernel_package", "config")},
            "qemu": qemu_ver,
            "accel": accel,
            "accel_reason": reason,
        },
        "sequences": {},
    }
    for name, (devopts, sizes, *rest) in SEQUENCES.items():
        online = rest[0] if rest else "online_movable"
        if a.only and name not in a.only:
            continue
        print(f"== {name}", file=sys.stderr)
        real = run_real(work, art, accel, name, devopts, sizes, a.timeout, online)
        model = run_model(work, name, devopts, sizes, [st["time"] for st in real["steps"]], online)
        cmp_ = compare(real, model)
        print(f"   match={cmp_['match']}", file=sys.stderr)
        doc["sequences"][name] = {
            "online": online,
            "devopts": devopts,
            "sizes": sizes,
            "real": real,
            "model": model,
            "compare": cmp_,
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "real_guest.json").write_text(json.dumps(doc, indent=1) + "\n")
    (RESULTS / "real_guest.md").write_text(write_md(doc))
    return 0 if all(s["compare"]["match"] for s in doc["sequences"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
