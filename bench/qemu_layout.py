"""Compare ``memslots plan`` with real QEMU: device addresses, sizes, block sizes, refusals.

Each configuration in ``bench/qemu_layout_configs.json`` (``[name, [QEMU-style args]]``) is
started with Debian's QEMU (``-S``, no guest, KVM with ``-cpu host,-arch-capabilities``) and its
``query-memory-devices`` (or its start-up error) is compared with ``memslots plan --json``.
Debian 12 ships QEMU 7.2, which predates ``dynamic-memslots``, so memslot counts are not
compared; addresses, sizes, block sizes and whether the configuration is accepted are.

    .venv/bin/python bench/qemu_layout.py      (needs qemu-system-x86)

Writes bench/results/qemu_layout.{json,md}.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
RESULTS = HERE / "results"
QEMU = ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host,-arch-capabilities",
        "-nographic", "-nodefaults", "-S"]  # fmt: skip
MEMSLOTS = str(Path(sys.executable).parent / "memslots")


def _qmp(conn: socket.socket, command: str) -> dict[str, Any]:
    conn.sendall((json.dumps({"execute": command}) + "\n").encode())
    buf = b""
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("QEMU closed the monitor")
        buf += chunk
        for line in buf.split(b"\n"):
            if line.strip():
                msg: dict[str, Any] = json.loads(line)
                if "return" in msg or "error" in msg:
                    return msg


def run_qemu(args: list[str]) -> dict[str, Any]:
    """Start QEMU paused; its memory devices, or the error it exits with."""
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "qmp.sock")
        proc = subprocess.Popen(
            [*QEMU, "-qmp", f"unix:{sock},server=on,wait=off", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None:
                    assert proc.stderr is not None
                    return {"error": proc.stderr.read().decode().strip()}
                if os.path.exists(sock):
                    try:
                        conn = socket.socket(socket.AF_UNIX)
                        conn.connect(sock)
                        break
                    except OSError:
                        pass
                if time.monotonic() > deadline:
                    return {"error": "timeout"}
                time.sleep(0.05)
            try:
                conn.recv(65536)  # greeting
                _qmp(conn, "qmp_capabilities")
                reply = _qmp(conn, "query-memory-devices")
            except OSError:
                # QEMU opened the monitor, then refused the configuration and exited.
                proc.wait(10)
                assert proc.stderr is not None
                return {"error": proc.stderr.read().decode().strip()}
            finally:
                conn.close()
            return {"devices": [_qemu_device(d) for d in reply["return"]]}
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _qemu_device(d: dict[str, Any]) -> dict[str, Any]:
    data = d["data"]
    return {
        "id": data.get("id"),
        "type": d["type"],
        "addr": data.get("memaddr", data.get("addr")),
        "size": data.get("max-size", data.get("size")),
        "block": data.get("block-size"),
    }


def run_memslots(args: list[str]) -> dict[str, Any]:
    """``memslots plan --json``: its memory devices, or its refusal."""
    r = subprocess.run([MEMSLOTS, "plan", "--json", *args], capture_output=True, text=True)
    if r.returncode:
        return {"error": r.stderr.strip()}
    return {
        "devices": [
            {
                "id": d["id"],
                "type": d["type"],
                "addr": d["address"],
                "size": d["region_size"],
                "block": d["block_size"],
            }
            for d in json.loads(r.stdout)["memory_devices"]
        ]
    }


def compare_all() -> list[dict[str, Any]]:
    """Run every configuration through QEMU and memslots; one row per configuration."""
    configs = json.loads((HERE / "qemu_layout_configs.json").read_text())
    rows = []
    for name, args in configs:
        q, m = run_qemu(args), run_memslots(args)
        match = ("error" in q) == ("error" in m) and q.get("devices") == m.get("devices")
        rows.append({"name": name, "args": args, "qemu": q, "memslots": m, "match": match})
        print(f"{'match   ' if match else 'MISMATCH'} {name}", file=sys.stderr)
    return rows


def main() -> int:
    if shutil.which(QEMU[0]) is None:
        print("qemu_layout: qemu-system-x86_64 is not installed", file=sys.stderr)
        return 2
    rows = compare_all()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "qemu_layout.json").write_text(json.dumps(rows, indent=2) + "\n")
    version = subprocess.run([QEMU[0], "--version"], capture_output=True, text=True).stdout
    lines = [
        "# memslots plan vs real QEMU: addresses, sizes, block sizes, refusals",
        "",
        f"{version.splitlines()[0]}; command: `.venv/bin/python bench/qemu_layout.py`.",
        f"{sum(r['match'] for r in rows)} of {len(rows)} configurations match "
        "(same devices at the same addresses, or both refuse).",
        "",
        "| configuration | QEMU | memslots | match |",
        "|---|---|---|---|",
    ]
    for r in rows:

        def show(res: dict[str, Any]) -> str:
            if "error" in res:
                last: str = res["error"].splitlines()[-1]
                return "refused: " + last[:90]
            return ", ".join(f"{d['id']}@{d['addr']:#x}" for d in res["devices"]) or "-"

        lines.append(f"| {r['name']} | {show(r['qemu'])} | {show(r['memslots'])} | "
                     f"{'yes' if r['match'] else '**no**'} |")  # fmt: skip
    (RESULTS / "qemu_layout.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:4]))
    return 0 if all(r["match"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
