"""Structure-aware fuzzing of virtio-mem's request queue: a hostile guest's bytes vs. the device.

:class:`QueueFuzzer` builds a small machine on the KVM model (32 MiB boot RAM, a 16 MiB DIMM
directly followed by a 32 MiB virtio-mem device with 8 MiB memslots and 2 MiB blocks) and
feeds :class:`~memslots.virtio.transport.VirtioMemTransport` one input after another. An input
is what a guest can write before a kick: a descriptor table, indirect tables, an available ring
and request bytes. It is generated from the structure (chains of out then in buffers carrying a
valid-looking PLUG / UNPLUG / STATE / UNPLUG_ALL), then mutated: random flags and next
pointers, loops, zero and huge lengths, buffers in gaps, past RAM, across memslot and backend
boundaries or on the rings themselves, indirect tables broken in every documented way, short
requests and responses, unknown types, available index jumps and bad heads, rings placed
badly. Between inputs the host resizes the device, marks it busy, or resets the system.

After every input the oracle checks:

* no exception escaped ``notify()``;
* every executed request was answered (pushed), and the device state (bitmap, sizes, mapped
  memslots, the memory map) equals the state after the last answered request: a violation
  changes nothing;
* the device needs a reset exactly when the transport says so (DEVICE_NEEDS_RESET, an error, a
  config interrupt); otherwise the queue was drained;
* ``plugged_size == popcount(bitmap) * block_size``, a memslot is mapped iff it holds a plugged
  block, and KVM's memslots are exactly the memory map;
* after a violation, a device reset brings the device back: a fresh queue answers a STATE
  request correctly.

Inputs run in sessions (reset, negotiation, queue setup, then inputs until a violation), so the
machine is built once and most inputs cost one notify.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import struct
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field

from memslots.closing import Closing
from memslots.devices.virtio_mem.device import VirtioMem
from memslots.devices.virtio_mem.wire import (
    REQUEST_SIZE,
    RESPONSE_SIZE,
    BlockState,
    ReqType,
    Request,
    Resp,
    Response,
)
from memslots.errors import MemslotsError
from memslots.machine.machine import Machine
from memslots.memory.address_space import GuestMemory
from memslots.options import parse_machine_config
from memslots.sizes import MiB
from memslots.virtio.transport import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VirtioMemTransport,
)
from memslots.virtio.virtqueue import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    DriverQueue,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)

MEMORY = "32M,slots=1,maxmem=1G"
OBJECTS = (
    "memory-backend-ram,id=d0,size=16M,reserve=off",
    "memory-backend-ram,id=mem0,size=32M,reserve=off",
)
DEVICES = (
    "pc-dimm,id=dimm0,memdev=d0",
    "virtio-mem,id=vmem0,memdev=mem0,memslot-size=8M,block-size=2M,requested-size=24M",
)
RAM_END = 32 * MiB
#: Boot RAM ends at 32 MiB; the DIMM starts at 4 GiB.
GAP_END = 0x1_0000_0000
RING_AREA = 0x1_0000
BUF_AREA = 0x10_0000
BUF_AREA_SIZE = 0x4_0000
PROBE_QUEUE = 0x20_0000
PROBE_REQ = 0x21_0000
PROBE_RESP = 0x21_0100
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_KINDS = (ReqType.PLUG, ReqType.UNPLUG, ReqType.STATE, ReqType.UNPLUG_ALL)
#: UNPLUG_ALL wipes everything: rare, so that plugged state builds up.
_KIND_WEIGHTS = (8, 8, 3, 1)
_STATUS_READY = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK

State = tuple[bytes, int, int, int, tuple[bool, ...], tuple[int, ...]]


@dataclass
class FuzzReport:
    """What a run did: inputs, what the device answered or refused, and any failures."""

    seed: int
    inputs: int = 0
    chains: int = 0
    answered: int = 0
    violations: int = 0
    seconds: float = 0.0
    #: Violation kinds (exception class names) and how often each was hit.
    errors: Counter[str] = field(default_factory=Counter)
    #: ``"plug/ack"`` and so on: the answers given.
    responses: Counter[str] = field(default_factory=Counter)
    #: Oracle failures, each naming the input index (replay with the same seed).
    failures: list[str] = field(default_factory=list)

    @property
    def inputs_per_second(self) -> float:
        """Throughput of the run."""
        return self.inputs / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        """A few lines for humans."""
        kinds = ", ".join(f"{k} {n}" for k, n in self.errors.most_common())
        answers = ", ".join(f"{k} {n}" for k, n in self.responses.most_common())
        return (
            f"seed {self.seed}: {self.inputs} inputs in {self.seconds:.1f} s "
            f"({self.inputs_per_second:.0f}/s), {self.chains} chains, {self.answered} answered, "
            f"{self.violations} violations, {len(self.failures)} failures\n"
            f"violations: {kinds}\nanswers: {answers}"
        )


class QueueFuzzer(Closing):
    """Runs generated inputs against virtio-mem's transport and checks the oracle."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        config = parse_machine_config(MEMORY, OBJECTS, DEVICES, accel="sim")
        self.machine = Machine(config)
        self.dev: VirtioMem = self.machine.virtio_mem("vmem0")
        self.memory = GuestMemory(self.machine.address_space)
        self.config_interrupts = 0
        self.transport = VirtioMemTransport(
            self.dev, self.memory, config_interrupt=self._config_interrupt
        )
        self.transport.request_listeners.append(self._answered)
        self.report = FuzzReport(seed)
        self._last_state: State = self._state()
        self._live = False
        self._probing = False
        self._num = 0
        self._desc = self._avail = self._used = 0
        self._avail_idx = 0

    def close(self) -> None:
        """Release the machine."""
        self.transport.close()
        self.machine.close()

    def _config_interrupt(self) -> None:
        self.config_interrupts += 1

    def _answered(self, req: Request, resp: Response) -> None:
        self._last_state = self._state()
        if self._probing:
            return
        self.report.answered += 1
        kind = ReqType(req.type).name.lower()
        self.report.responses[f"{kind}/{Resp(resp.type).name.lower()}"] += 1

    # -- running ---------------------------------------------------------------------------------

    def run(self, *, inputs: int | None = None, seconds: float | None = None) -> FuzzReport:
        """Run until ``inputs`` inputs or ``seconds`` passed (whichever first), or a failure."""
        log = logging.getLogger("memslots.virtio.transport")
        level = log.level
        # Every violation is logged as a warning; a fuzzer makes millions of them.
        log.setLevel(logging.ERROR)
        report = self.report
        start = time.perf_counter()
        deadline = start + seconds if seconds is not None else None
        try:
            while not report.failures:
                if inputs is not None and report.inputs >= inputs:
                    break
                # Checking the clock every input would cost more than some inputs.
                if (
                    deadline is not None
                    and report.inputs % 64 == 0
                    and time.perf_counter() > deadline
                ):
                    break
                self._one()
        finally:
            log.setLevel(level)
            report.seconds += time.perf_counter() - start
        return report

    def _fail(self, what: str) -> None:
        self.report.failures.append(f"input {self.report.inputs} (seed {self.seed}): {what}")

    def _one(self) -> None:
        rng = self.rng
        self._perturb_host()
        if not self._live:
            self._start_session()
        if rng.random() < 0.02:
            self._poke_registers()
        chains = self._write_input()
        self.report.inputs += 1
        self.report.chains += chains
        self._last_state = self._state()
        executed = sum(self.dev.requests.values())
        answered = self.report.answered
        irqs = self.config_interrupts
        t = self.transport
        # The session setup itself may have been refused (bad features or queue).
        broken_before = self.dev.needs_reset
        try:
            t.notify()
        except Exception:
            self._fail("exception escaped notify():\n" + traceback.format_exc())
            return
        if sum(self.dev.requests.values()) - executed != self.report.answered - answered:
            self._fail("a request was executed but not answered")
        if self._state() != self._last_state:
            self._fail(
                f"state changed after the last answered request (error: {t.error!r}):\n"
                f"  expected {self._last_state}\n  actual   {self._state()}"
            )
        self._check_invariants()
        needs_reset = self.dev.needs_reset
        if needs_reset != bool(t.status & STATUS_DEVICE_NEEDS_RESET):
            self._fail("device and transport disagree on DEVICE_NEEDS_RESET")
        if needs_reset:
            self.report.violations += 1
            self.report.errors[type(t.error).__name__] += 1
            if t.error is None:
                self._fail("needs reset without an error")
            live = t.status & STATUS_DRIVER_OK and not broken_before
            if live and self.config_interrupts == irqs:
                self._fail(f"needs reset without a config interrupt ({t.error!r})")
            self._recover()
        elif t.queue is not None and t.ready:
            try:
                leftover = t.queue.pop()
            except MemslotsError as exc:
                self._fail(f"notify() returned with a broken queue it did not report: {exc!r}")
                return
            if leftover is not None:
                self._fail("notify() returned with chains still available")
        if rng.random() < 0.2:
            self._live = False

    # -- sessions ----------------------------------------------------------------------------------

    def _start_session(self) -> None:
        """Reset, negotiate and set up the queue, usually as a driver should, sometimes not."""
        rng, t = self.rng, self.transport
        t.write_status(0)
        t.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        features = t.device_features
        if rng.random() < 0.05:
            features ^= 1 << rng.choice((1, 28, 32, rng.randrange(64)))
        t.write_driver_features(features)
        t.write_status(_STATUS_READY)
        roll = rng.random()
        num = 128 if roll < 0.5 else rng.choice((1, 2, 4, 8, 16, 32, 64))
        if rng.random() < 0.02:
            num = rng.choice((0, 3, 96, 256, 1 << 15))
        desc = RING_AREA
        avail = desc + desc_table_size(num)
        used = (avail + avail_ring_size(num) + 3) & ~3
        if rng.random() < 0.1:
            desc, avail, used = (self._odd_ring_place(g) for g in (desc, avail, used))
        self._num, self._desc, self._avail, self._used = num, desc, avail, used
        self._guest_write(avail, bytes(avail_ring_size(num)))
        self._guest_write(used, bytes(used_ring_size(num)))
        self._avail_idx = 0
        t.setup_queue(num, desc, avail, used)
        if rng.random() < 0.98:
            t.write_status(_STATUS_READY | STATUS_DRIVER_OK)
        self._live = True

    def _odd_ring_place(self, gpa: int) -> int:
        """A ring somewhere it may not be allowed: device memory, boundaries, gaps, misaligned."""
        rng, dev = self.rng, self.dev
        choice = rng.randrange(6)
        if choice == 0:
            return dev.addr + rng.randrange(dev.nb_blocks) * dev.block_size + 64 * rng.randrange(8)
        if choice == 1:
            return dev.addr - rng.randrange(1, 64) * 16  # across DIMM / device
        if choice == 2:
            return RAM_END - 16 * rng.randrange(1, 64)
        if choice == 3:
            return gpa + rng.randrange(1, 4)
        if choice == 4:
            return rng.randrange(RAM_END, GAP_END) & ~15
        return gpa

    def _recover(self) -> None:
        """A device reset must bring the device back: a fresh queue answers STATE correctly."""
        t, dev, memory = self.transport, self.dev, self.memory
        t.write_status(0)
        if dev.needs_reset or t.status or t.error is not None:
            self._fail("reset did not clear the error state")
        t.write_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        t.write_driver_features(t.device_features)
        t.write_status(_STATUS_READY)
        q = DriverQueue(memory, PROBE_QUEUE, 0x1000, num=8, notify=t.notify)
        t.setup_queue(q.num, q.desc_gpa, q.avail_gpa, q.used_gpa)
        t.write_status(_STATUS_READY | STATUS_DRIVER_OK)
        block = self.rng.randrange(dev.nb_blocks)
        memory.write(PROBE_REQ, Request(ReqType.STATE, dev.addr + block * dev.block_size, 1).pack())
        q.add([(PROBE_REQ, REQUEST_SIZE)], [(PROBE_RESP, RESPONSE_SIZE)])
        self._probing = True
        try:
            q.kick()
        finally:
            self._probing = False
        used = q.get_used()
        if used is None:
            self._fail(f"after a reset the device did not answer ({t.error!r})")
            return
        resp = Response.unpack(memory.read(PROBE_RESP, RESPONSE_SIZE))
        if (block + 1) * dev.block_size > dev.usable_region_size:
            expected = Response(Resp.ERROR)
        else:
            plugged = dev.bitmap[block]
            expected = Response(Resp.ACK, BlockState.PLUGGED if plugged else BlockState.UNPLUGGED)
        if resp != expected:
            self._fail(f"after a reset STATE of block {block} answered {resp}, not {expected}")
        self._live = False

    def _poke_registers(self) -> None:
        """The guest reads config anywhere and writes status, features or queue registers."""
        rng, t = self.rng, self.transport
        length = rng.randrange(-1, 10)
        data = t.read_config(rng.randrange(-4, 64), length)
        if len(data) != max(0, length):
            self._fail(f"read_config returned {len(data)} bytes for length {length}")
        roll = rng.random()
        if roll < 0.3:
            t.write_status(rng.randrange(1, 256))
        elif roll < 0.6:
            t.write_driver_features(rng.randrange(1 << 64))
        elif roll < 0.8:
            t.setup_queue(
                rng.choice((0, 1, 128, 256, rng.randrange(1 << 16))),
                rng.randrange(1 << 64),
                rng.randrange(1 << 64),
                rng.randrange(1 << 64),
            )
        else:
            t.notify()
        # Whatever that did, the next input starts a new session.
        self._live = False

    def _perturb_host(self) -> None:
        """What the host does meanwhile: resize requests, migration (busy), system reset."""
        rng, dev = self.rng, self.dev
        roll = rng.random()
        if roll < 0.03:
            dev.set_requested_size(rng.randrange(dev.nb_blocks + 1) * dev.block_size)
        elif roll < 0.04 or (dev.busy and roll < 0.3):
            dev.busy = not dev.busy  # migration runs for a few inputs
        elif roll < 0.045:
            # The machine resets: every device, the transport included; the guest boots again.
            dev.system_reset()
            self.transport.reset()
            self._live = False

    # -- the oracle ------------------------------------------------------------------------------

    def _state(self) -> State:
        dev = self.dev
        return (
            bytes(dev.bitmap),
            dev.size,
            dev.usable_region_size,
            dev.requested_size,
            tuple(r.mapped for r in dev.memslots),
            tuple(s.gpa for s in self.machine.address_space.sections),
        )

    def _check_invariants(self) -> None:
        dev, machine = self.dev, self.machine
        if dev.size != dev.bitmap.count(1) * dev.block_size:
            self._fail(f"plugged_size {dev.size} is not the bitmap's {dev.bitmap.count(1)} blocks")
        per_slot = dev.memslot_size // dev.block_size
        for slot in dev.memslot_map():
            first = slot.index * per_slot
            plugged = dev.bitmap.count(1, first, first + per_slot)
            if slot.mapped != (plugged > 0) or slot.plugged_blocks != plugged:
                self._fail(f"memslot {slot.index} mapped={slot.mapped} with {plugged} plugged")
        sections = list(machine.address_space.sections)
        if [s.section for s in machine.kvm.slots()] != sections:
            self._fail("KVM's memslots are not the memory map")
        if dev.usable_region_size < dev.requested_size:
            self._fail("usable_region_size < requested_size")

    # -- input generation ------------------------------------------------------------------------

    def _guest_write(self, gpa: int, data: bytes) -> None:
        """A guest store: lost where there is no RAM (the guest would fault or hit MMIO)."""
        with contextlib.suppress(MemslotsError):
            self.memory.write(gpa, data)

    def _write_input(self) -> int:
        """Write descriptors, requests and the available ring; returns the chains published."""
        rng = self.rng
        num = self._num if 1 <= self._num <= 128 else 1
        table = bytearray(desc_table_size(num))
        if rng.random() < 0.3:
            table[:] = rng.randbytes(len(table))
        slots = list(range(num))
        rng.shuffle(slots)
        roll = rng.random()
        count = 1 if roll < 0.5 else rng.randint(2, 4) if roll < 0.95 else rng.randint(1, num)
        heads = []
        for _ in range(count):
            heads.append(self._write_chain(table, slots, num))
        self._guest_write(self._desc, bytes(table))
        avail = self._avail
        idx = self._avail_idx
        for head in heads:
            self._guest_write(avail + 4 + 2 * (idx % num), _U16.pack(head))
            idx = (idx + 1) & 0xFFFF
        if rng.random() < 0.03:
            idx = rng.randrange(0x10000)
        self._avail_idx = idx
        flags = 0
        if rng.random() < 0.1:
            flags = AVAIL_F_NO_INTERRUPT if rng.random() < 0.7 else rng.randrange(0x10000)
        self._guest_write(avail, _U16.pack(flags) + _U16.pack(idx))
        return count

    def _write_chain(self, table: bytearray, slots: list[int], num: int) -> int:
        """One chain into ``table`` (and guest memory for its buffers); returns its head."""
        rng = self.rng
        descs = self._buffers()
        if rng.random() < 0.15:
            return self._indirect(table, slots, num, descs)
        if rng.random() < 0.02:
            return num + rng.randrange(0x10000 - num)  # a head beyond the table
        return self._link(table, slots, num, descs)

    def _link(
        self,
        table: bytearray,
        slots: list[int],
        entries: int,
        descs: list[tuple[int, int, int]],
        head: int | None = None,
    ) -> int:
        """Place ``descs`` in ``table`` chained with NEXT, starting at ``head`` (default: a free
        slot) and going on in free ``slots`` (random ones once none are left); returns the head.
        """
        rng = self.rng
        if not descs:
            return rng.randrange(entries) if head is None else head
        chosen = [] if head is None else [head]
        while len(chosen) < len(descs):
            chosen.append(slots.pop() if slots else rng.randrange(entries))
        last = len(descs) - 1
        for k, (addr, length, flags) in enumerate(descs):
            nxt = chosen[k + 1] if k < last else 0
            if k < last:
                flags |= DESC_F_NEXT
            roll = rng.random()
            if roll < 0.01:
                nxt = rng.randrange(0x10000)
            elif roll < 0.02 and k == last:
                flags |= DESC_F_NEXT
                nxt = rng.choice(chosen)  # a loop
            elif roll < 0.03:
                flags = rng.randrange(0x10000)
            _DESC.pack_into(table, 16 * chosen[k], addr, length, flags, nxt)
        return chosen[0]

    def _indirect(
        self, table: bytearray, slots: list[int], num: int, descs: list[tuple[int, int, int]]
    ) -> int:
        """Put ``descs`` in an indirect table, referenced from the head (or a direct chain)."""
        rng = self.rng
        entries = max(1, len(descs) + (rng.randrange(4) if rng.random() < 0.3 else 0))
        itable = bytearray(16 * entries)
        free = list(range(1, entries))
        rng.shuffle(free)
        # The device walks an indirect table from entry 0.
        self._link(itable, free, entries, descs, head=0)
        if rng.random() < 0.05:
            k = rng.randrange(entries)
            addr, length, flags, nxt = _DESC.unpack_from(itable, 16 * k)
            _DESC.pack_into(itable, 16 * k, addr, length, flags | DESC_F_INDIRECT, nxt)
        where = self._place(len(itable), align=16)
        self._guest_write(where, bytes(itable))
        length = len(itable)
        flags = DESC_F_INDIRECT | (rng.randrange(2) * DESC_F_WRITE)
        roll = rng.random()
        if roll < 0.03:
            length = rng.choice((0, length - 8, length + 16, rng.randrange(1 << 32)))
        elif roll < 0.05:
            flags |= DESC_F_NEXT
        pointer = [(where, length, flags)]
        if rng.random() < 0.2:
            # Direct descriptors first, the indirect one last: valid, if unusual.
            return self._link(table, slots, num, self._buffers()[:1] + pointer)
        return self._link(table, slots, num, pointer)

    def _buffers(self) -> list[tuple[int, int, int]]:
        """A request's buffers as ``(addr, len, flags)``: out pieces with the request bytes
        written into them, then in pieces; often valid, sometimes not."""
        rng = self.rng
        req = self._request_bytes()
        roll = rng.random()
        out_len = REQUEST_SIZE
        if roll < 0.04:
            out_len = rng.randrange(REQUEST_SIZE)
        elif roll < 0.1:
            out_len = REQUEST_SIZE + rng.randrange(64)
        in_len = RESPONSE_SIZE
        roll = rng.random()
        if roll < 0.04:
            in_len = rng.randrange(RESPONSE_SIZE)
        elif roll < 0.1:
            in_len = RESPONSE_SIZE + rng.randrange(64)
        descs: list[tuple[int, int, int]] = []
        for total, flags, payload in ((out_len, 0, req), (in_len, DESC_F_WRITE, b"")):
            for piece in self._split(total):
                addr = self._place(piece)
                if payload:
                    self._guest_write(addr, payload[:piece].ljust(piece, b"\0"))
                    payload = payload[piece:]
                descs.append((addr, piece, flags))
        roll = rng.random()
        if roll < 0.02 and descs:
            i = rng.randrange(len(descs))
            addr, _, flags = descs[i]
            descs[i] = (addr, rng.choice((0, 0xFFFF_FFFF, rng.randrange(1 << 32))), flags)
        elif roll < 0.04 and len(descs) > 1:
            rng.shuffle(descs)
        elif roll < 0.05 and descs:
            i = rng.randrange(len(descs))
            addr, length, flags = descs[i]
            descs[i] = (addr, length, flags ^ DESC_F_WRITE)
        return descs

    def _split(self, total: int) -> list[int]:
        """``total`` bytes as 1-3 pieces (no pieces for 0 bytes, usually)."""
        rng = self.rng
        if total == 0:
            return [0] if rng.random() < 0.5 else []
        pieces = 1 if rng.random() < 0.7 else rng.randint(2, 3)
        cuts = sorted(rng.randrange(1, total) for _ in range(pieces - 1)) if total > 1 else []
        bounds = [0, *cuts, total]
        return [b - a for a, b in itertools.pairwise(bounds) if b > a]

    def _place(self, length: int, align: int = 1) -> int:
        """Where a buffer goes: mostly the buffer area, sometimes somewhere hostile."""
        rng, dev = self.rng, self.dev
        roll = rng.random()
        if roll < 0.94:
            addr = BUF_AREA + rng.randrange(BUF_AREA_SIZE - 0x100)
        elif roll < 0.955:
            addr = dev.addr + rng.randrange(dev.nb_blocks) * dev.block_size + rng.randrange(4096)
        elif roll < 0.965:
            addr = dev.addr + rng.randint(1, 3) * dev.memslot_size - rng.randrange(1, 32)
        elif roll < 0.975:
            addr = dev.addr - rng.randrange(1, 32)  # the DIMM, then the device
        elif roll < 0.98:
            addr = RAM_END - rng.randrange(1, 64)
        elif roll < 0.99:
            addr = rng.choice((self._desc, self._avail, self._used)) + rng.randrange(64)
        else:
            addr = rng.choice(
                (rng.randrange(RAM_END, GAP_END), rng.randrange(1 << 64), (1 << 64) - 8)
            )
        return addr - addr % align

    def _request_bytes(self) -> bytes:
        """24 request bytes: usually a plausible request, sometimes an unknown type or noise."""
        rng, dev = self.rng, self.dev
        roll = rng.random()
        if roll < 0.05:
            return rng.randbytes(REQUEST_SIZE)
        unknown = roll >= 0.95
        kind = rng.randrange(4, 1 << 16) if unknown else rng.choices(_KINDS, _KIND_WEIGHTS)[0]
        pick = rng.random()
        if pick < 0.85:
            addr = dev.addr + rng.randrange(-1, dev.nb_blocks + 1) * dev.block_size
        elif pick < 0.95:
            addr = dev.addr + rng.randrange(dev.region_size) | 1
        else:
            addr = rng.randrange(1 << 64)
        pick = rng.random()
        nb = (
            rng.choice((1, 1, 1, 2, 3, 4))
            if pick < 0.8
            else rng.randrange(0, 20 if pick < 0.95 else 1 << 16)
        )
        raw = bytearray(Request(kind, addr % (1 << 64), nb).pack())
        if rng.random() < 0.1:
            raw[2:8] = rng.randbytes(6)
            raw[18:24] = rng.randbytes(6)
        return bytes(raw)
