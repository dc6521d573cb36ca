"""A model of Linux's virtio_mem driver: the stream of requests a real guest sends.

It follows ``drivers/virtio/virtio_mem.c`` as ``../shared/reference/linux-guest-driver.md``
describes it: Sub-Block Mode (SBM) or Big-Block Mode (BBM) chosen at probe, plugging the lowest
addresses first with at most one memory block per request, unplugging the highest first
(offline memory before online memory, one sub-block per request in online blocks), UNPLUG_ALL
at probe when memory is still plugged, the retry timer (50 s doubling to 300 s) on BUSY or
leftover work, an immediate re-run on NACK, and "broken" on ERROR.

The driver talks to the device only through a :class:`Channel` (the virtqueue and the config
space) and runs on a :class:`~memslots.guest.sched.Scheduler`, so 300 s timers take no time in
tests.
It also *uses* the memory it onlines: through a :class:`MemoryUser` it writes a pattern into
every sub-block that becomes usable and checks it before giving the sub-block back, so memory
lost or unmapped while plugged is caught (``violations``).
"""

from __future__ import annotations

import enum
import logging
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from memslots.devices.virtio_mem.wire import Config, ReqType, Request, Resp, Response
from memslots.guest.sched import Scheduler, Timer
from memslots.sizes import GiB, MiB, format_size

log = logging.getLogger("memslots.guest.linux")

RETRY_START = 50.0
RETRY_MAX = 300.0
PAGEBLOCK_SIZE = 2 * MiB
MIN_MEMORY_BLOCK = 128 * MiB
MAX_MEMORY_BLOCK = 2 * GiB
LARGE_BLOCK_BOUNDARY = 64 * GiB
#: Immediate re-runs after NACK before the model declares a livelock (Linux would spin).
MAX_IMMEDIATE_RETRIES = 10000
_ONLINE_STAYS = "only offline memory may be unplugged (unplug_online=0): the rest is online"


class Channel(Protocol):
    """How the driver reaches the device: requests over the virtqueue, and the config space."""

    def read_config(self) -> Config:
        """Read the 56-byte config space."""
        ...

    def send(self, request: Request) -> Response | None:
        """Send one request and wait for the response; None if the device never answers."""
        ...


class MemoryUser(Protocol):
    """How the guest touches its memory (through guest RAM, or from a real vCPU)."""

    def write_pattern(self, gpa: int, length: int, seed: int) -> None:
        """Write a recognisable pattern into ``[gpa, gpa+length)``; raise if it is not RAM."""
        ...

    def check_pattern(self, gpa: int, length: int, seed: int) -> bool:
        """True if the pattern is still there."""
        ...


def memory_block_size(boot_memory_end: int, *, in_vm: bool = True) -> int:
    """Linux x86-64's memory block size for a given end of boot memory."""
    if boot_memory_end < LARGE_BLOCK_BOUNDARY:
        return MIN_MEMORY_BLOCK
    if not in_vm:
        return MAX_MEMORY_BLOCK
    size = MAX_MEMORY_BLOCK
    while size > MIN_MEMORY_BLOCK and boot_memory_end % size:
        size //= 2
    return size


class Online(enum.Enum):
    """What happens to hot-added memory: the kernel's auto-online policy."""

    MOVABLE = "online_movable"
    KERNEL = "online"
    OFFLINE = "offline"


class Mb(enum.Enum):
    """States of a memory block (SBM) or big block (BBM)."""

    UNUSED = "unused"
    PLUGGED = "plugged"  # plugged but not added (adding failed): cleaned up later
    OFFLINE = "offline"
    OFFLINE_PARTIAL = "offline_partial"
    KERNEL = "kernel"
    KERNEL_PARTIAL = "kernel_partial"
    MOVABLE = "movable"
    MOVABLE_PARTIAL = "movable_partial"


_PARTIAL = {
    Mb.OFFLINE: Mb.OFFLINE_PARTIAL,
    Mb.KERNEL: Mb.KERNEL_PARTIAL,
    Mb.MOVABLE: Mb.MOVABLE_PARTIAL,
}
_FULL = {v: k for k, v in _PARTIAL.items()}
#: Request names and the known responses with their names, by wire value (cheaper than the
#: enum's lookups, once per request).
_NAMES = {int(t): t.name.lower() for t in ReqType}
_RESPONSES = {int(r): (r, r.name.lower()) for r in Resp}
_ONLINE = {Mb.KERNEL, Mb.KERNEL_PARTIAL, Mb.MOVABLE, Mb.MOVABLE_PARTIAL}


class Rc(enum.Enum):
    """The driver's return codes that decide what the worker does next."""

    OK = 0
    ENOSPC = "ENOSPC"
    ETXTBSY = "ETXTBSY"
    EBUSY = "EBUSY"
    ENOMEM = "ENOMEM"
    EAGAIN = "EAGAIN"
    EINVAL = "EINVAL"
    EHUNG = "EHUNG"  # no response at all: the device needs a reset


@dataclass(frozen=True)
class LoggedRequest:
    """One request as it went over the wire, with its answer."""

    type: str
    offset: int
    nb_blocks: int
    response: str
    time: float

    def as_dict(self) -> dict[str, object]:
        """The ``simulate --request-log`` shape."""
        return {
            "type": self.type,
            "offset": self.offset,
            "nb_blocks": self.nb_blocks,
            "response": self.response,
        }


@dataclass
class GuestOptions:
    """Knobs of the guest model (kernel parameters and the environment)."""

    #: End of boot memory (decides the memory block size); 0: ask the machine.
    boot_memory_end: int = 4 * GiB
    #: Requests :attr:`LinuxGuest.log` keeps: at least the last this many, at most twice as
    #: many (a long-running machine); None keeps all (simulate and the demo read them back).
    request_log: int | None = None
    online: Online = Online.MOVABLE
    force_bbm: bool = False
    bbm_block_size: int = 0
    unplug_online: bool = True
    #: Kernels before ~5.19 used 4 MiB sub-blocks on x86-64.
    legacy_subblocks: bool = False
    #: Sub-blocks pinned by unmovable pages (kernel zone only), as byte offsets from the
    #: device's start address; real guests differ in which ones, so it is an input.
    pinned: frozenset[int] = field(default_factory=frozenset)
    #: The guest writes into every n-th usable sub-block only. A write into anonymous guest
    #: RAM makes the host back the whole 2 MiB huge page, so touching every block of a large
    #: device would cost the host as much memory as the guest plugged.
    use_stride: int = 1


class LinuxGuest:
    """The virtio_mem driver of one Linux guest, bound to one device."""

    def __init__(
        self,
        channel: Channel,
        scheduler: Scheduler,
        options: GuestOptions | None = None,
        *,
        memory: MemoryUser | None = None,
    ) -> None:
        self.channel = channel
        self.sched = scheduler
        self.opts = options or GuestOptions()
        self.memory = memory
        self.log: list[LoggedRequest] = []
        self.violations: list[str] = []
        self.listeners: list[Callable[[LinuxGuest], None]] = []
        self.broken = False
        self.hung = False
        #: Set by :meth:`stop`: the guest went away (the VM stopped, or a reset reboots it).
        self.stopped = False
        self.stopped_no_space = False
        #: Why the last pass left the device short of the requested size, in the driver's own
        #: terms (a memory block past the usable region, the offline threshold, pinned pages,
        #: the device's answer); None when it got there.
        self.stop_reason: str | None = None
        self._short: str | None = None
        self.retry_period = RETRY_START
        self._timer: Timer | None = None
        self._queued = False
        self._seq = 0
        self.probed = False
        #: The dirtying workload (:meth:`set_workload`): units rewritten per tick, seconds.
        self.workload_units = 0
        self.workload_period = 0.0
        self.workload_ticks = 0
        self._workload_timer: Timer | None = None

    # -- probe --------------------------------------------------------------------------------

    def probe(self) -> None:
        """Read the config, choose the mode, and queue the first run (C3)."""
        cfg = self.channel.read_config()
        self.block_size = cfg.block_size
        self.addr = cfg.addr
        self.region_size = cfg.region_size
        self.plugged_size = cfg.plugged_size
        self.requested_size = cfg.requested_size
        self.usable_region_size = cfg.usable_region_size
        self._choose_mode()
        self.next_id = self.first_id
        self.offline_size = 0
        self._reset_blocks()
        self._seeds: dict[int, int] = {}
        self.unplug_all_required = self.plugged_size != 0
        self.config_changed = True
        self.probed = True
        self._update_last_usable()
        self._queue()

    def _choose_mode(self) -> None:
        """SBM or BBM, the unit and the memory-block ids, from the config read at probe."""
        self.mb_size = memory_block_size(self.opts.boot_memory_end)
        pageblock = 4 * MiB if self.opts.legacy_subblocks else PAGEBLOCK_SIZE
        sb = max(self.block_size, pageblock)
        self.sbm = sb < self.mb_size and not self.opts.force_bbm
        if self.sbm:
            self.unit = sb
            self.per_unit = self.mb_size // sb  # sub-blocks per memory block
        else:
            bb = max(self.block_size, self.mb_size)
            if (
                self.opts.bbm_block_size >= bb
                and self.opts.bbm_block_size & (self.opts.bbm_block_size - 1) == 0
            ):
                bb = self.opts.bbm_block_size
            self.unit = bb
            self.per_unit = 1
        self.id_size = self.mb_size if self.sbm else self.unit
        self.first_id = -(-self.addr // self.id_size)
        self.offline_threshold = max(2 * self.mb_size, 1 * GiB)
        if not self.sbm:
            self.offline_threshold = max(self.offline_threshold, 2 * self.unit)

    def _reset_blocks(self) -> None:
        """No memory block yet (after :meth:`_choose_mode`)."""
        self.state: dict[int, Mb] = {}
        #: The blocks in each state (the inverse of ``state``), so that a pass looks only at
        #: the blocks of the states it works on.
        self._by_state: dict[Mb, set[int]] = {st: set() for st in Mb}
        #: SBM: which sub-blocks of a memory block are plugged, as a bitmask (bit i: sub-block
        #: i); ``_full`` has every sub-block's bit.
        self.sb_plugged: dict[int, int] = {}
        self._full = (1 << self.per_unit) - 1

    def _update_last_usable(self) -> None:
        end = self.addr + self.usable_region_size
        self.last_usable_id = end // self.id_size - 1

    # -- triggers -----------------------------------------------------------------------------

    def config_interrupt(self) -> None:
        """The device changed its config (requested size): re-read it and work (C4)."""
        self.config_changed = True
        self.stopped_no_space = False
        self._queue()

    def online_all(self) -> None:
        """User space onlines every offline block (what udev would do); may restart the worker."""
        for mid, st in sorted(self.state.items()):
            if st in (Mb.OFFLINE, Mb.OFFLINE_PARTIAL):
                self._online(mid, Online.MOVABLE)
        self.stopped_no_space = False
        self._queue()

    def stop(self) -> None:
        """The guest goes away (its VM stopped, or a system reset reboots it): the retry timer
        is cancelled and a queued run does nothing; the next guest is a new driver that probes
        the device."""
        self.stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _queue(self) -> None:
        if self.broken or self.hung or self.stopped or self._queued:
            return
        self._queued = True
        self.sched.call_soon(self._run_queued)

    def _run_queued(self) -> None:
        self._queued = False
        self.run()

    @property
    def idle(self) -> bool:
        """True when nothing is queued and no retry timer is armed."""
        return not self._queued and self._timer is None

    @property
    def timer_due(self) -> float | None:
        """When the retry timer fires, if armed."""
        return self._timer.when if self._timer else None

    # -- the worker ---------------------------------------------------------------------------

    def run(self) -> None:
        """One pass of ``virtio_mem_run_wq``."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.broken or self.hung or self.stopped:
            return
        self.stop_reason = None  # until this pass says otherwise
        for _ in range(MAX_IMMEDIATE_RETRIES):
            rc = self._run_once()
            if rc is not Rc.EAGAIN:
                break
        else:
            self.violations.append("driver livelock: the device keeps answering NACK")
            rc = Rc.ETXTBSY
        if rc is Rc.OK:
            self.retry_period = RETRY_START
        elif rc is Rc.ENOSPC:
            self.stopped_no_space = True
        elif rc in (Rc.ETXTBSY, Rc.EBUSY, Rc.ENOMEM):
            self._arm_timer()
        elif rc is Rc.EHUNG:
            self.hung = True
        else:
            self.broken = True
            log.warning("virtio_mem: device answered ERROR, the driver is now broken")
        short = self.requested_size != self.plugged_size
        self.stop_reason = (self._short or self._remainder()) if short else None
        for cb in list(self.listeners):
            cb(self)

    def _arm_timer(self, delay: float | None = None) -> None:
        """Arm the retry timer for ``delay`` seconds (default: the retry period)."""

        def expire() -> None:
            self._timer = None
            self.retry_period = min(2 * self.retry_period, RETRY_MAX)
            self.run()

        wait = self.retry_period if delay is None else delay
        self._timer = self.sched.call_at(self.sched.now() + wait, expire)

    def _run_once(self) -> Rc:
        rc = Rc.OK
        self._short = None
        if self.unplug_all_required:
            resp = self._send(ReqType.UNPLUG_ALL, 0, 0)
            if resp is None:
                return Rc.EHUNG
            if resp == Resp.ACK:
                self.plugged_size = 0
                self.unplug_all_required = False
                self.config_changed = True
            else:
                rc = Rc.ETXTBSY if resp == Resp.BUSY else Rc.ENOMEM
        if self.config_changed:
            self.config_changed = False
            cfg = self.channel.read_config()
            if cfg.plugged_size != self.plugged_size:
                log.warning(
                    "virtio_mem: plugged size 0x%x differs from the device's 0x%x; adopting it",
                    self.plugged_size,
                    cfg.plugged_size,
                )
                self.plugged_size = cfg.plugged_size
            self.usable_region_size = cfg.usable_region_size
            self.requested_size = cfg.requested_size
            self._update_last_usable()
        if rc is Rc.OK:
            rc = self._cleanup()
        if rc is Rc.OK and self.requested_size != self.plugged_size:
            if self.requested_size > self.plugged_size:
                rc = self._plug(self.requested_size - self.plugged_size)
            else:
                rc = self._unplug(self.plugged_size - self.requested_size)
        if rc is Rc.OK and self.sbm and self._waiting_removal():
            rc = Rc.EBUSY
        return rc

    # -- requests -----------------------------------------------------------------------------

    def _send(self, kind: ReqType, gpa: int, nb_blocks: int) -> Resp | int | None:
        """Send a request; its response type (an int if unknown), or None if none came."""
        # A guest stopped in the middle of a pass (its vCPU faulted) sends nothing more.
        resp = None if self.stopped else self.channel.send(Request(kind, gpa, nb_blocks))
        answer: Resp | int | None = None
        if resp is None:
            shown = "none"
            self._short = "the device did not answer a request: it needs a reset"
        elif resp.type in _RESPONSES:
            answer, shown = _RESPONSES[resp.type]
            if answer in (Resp.BUSY, Resp.ERROR):
                self._short = f"the device answered {shown.upper()} to {kind.name}" + (
                    ": the driver is broken and ignores the device" if answer is Resp.ERROR else ""
                )
        else:
            answer, shown = resp.type, f"unknown({resp.type})"
            self._short = f"the device answered an unknown response type {resp.type}"
        offset = gpa - self.addr if kind != ReqType.UNPLUG_ALL else 0
        self.log.append(LoggedRequest(_NAMES[kind], offset, nb_blocks, shown, self.sched.now()))
        keep = self.opts.request_log
        if keep is not None and len(self.log) > 2 * keep:
            del self.log[: len(self.log) - keep]  # once per `keep` requests: cheap on average
        return answer

    def _plug_request(self, gpa: int, size: int) -> Rc:
        if self.config_changed:
            return Rc.EAGAIN
        resp = self._send(ReqType.PLUG, gpa, size // self.block_size)
        if resp is None:
            return Rc.EHUNG
        if resp == Resp.ACK:
            self.plugged_size += size
            return Rc.OK
        if resp == Resp.ERROR:
            return Rc.EINVAL
        if resp == Resp.NACK:
            return Rc.EAGAIN
        # Linux starts from -ENOMEM: a response type it does not know retries on the timer.
        return Rc.ETXTBSY if resp == Resp.BUSY else Rc.ENOMEM

    def _unplug_request(self, gpa: int, size: int) -> Rc:
        if self.config_changed:
            return Rc.EAGAIN
        resp = self._send(ReqType.UNPLUG, gpa, size // self.block_size)
        if resp is None:
            return Rc.EHUNG
        if resp == Resp.ACK:
            self.plugged_size -= size
            return Rc.OK
        if resp == Resp.ERROR:
            return Rc.EINVAL
        return Rc.ETXTBSY if resp == Resp.BUSY else Rc.ENOMEM

    # -- memory use ---------------------------------------------------------------------------

    def _use(self, gpa: int) -> None:
        """A sub-block became usable by the kernel: the guest writes into it."""
        if self.memory is None or self.stopped or (gpa // self.unit) % self.opts.use_stride:
            return
        self._seq += 1
        self._seeds[gpa] = self._seq
        try:
            self.memory.write_pattern(gpa, self.unit, self._seq)
        except Exception as exc:  # the guest would crash on a non-RAM access to plugged memory
            self.violations.append(f"plugged memory at 0x{gpa:x} is not usable: {exc}")

    def _release(self, gpa: int) -> None:
        """A sub-block is about to be given back: its data must still be there."""
        seed = self._seeds.pop(gpa, None)
        if self.memory is None or seed is None:
            return
        try:
            ok = self.memory.check_pattern(gpa, self.unit, seed)
        except Exception as exc:
            ok = False
            self.violations.append(f"plugged memory at 0x{gpa:x} vanished: {exc}")
            return
        if not ok:
            self.violations.append(f"plugged memory at 0x{gpa:x} lost its contents")

    def verify(self) -> int:
        """Check the pattern of every sub-block in use; returns how many were checked."""
        if self.memory is None:
            return 0
        checked = 0
        for gpa, seed in sorted(self._seeds.items()):
            checked += 1
            try:
                ok = self.memory.check_pattern(gpa, self.unit, seed)
            except Exception as exc:
                self.violations.append(f"plugged memory at 0x{gpa:x} vanished: {exc}")
                continue
            if not ok:
                self.violations.append(f"plugged memory at 0x{gpa:x} lost its contents")
        return checked

    # -- a workload ---------------------------------------------------------------------------

    def set_workload(self, units: int, period: float) -> None:
        """Keep ``units`` usable units busy, like an application with a working set: every
        ``period`` seconds the guest rewrites the pattern of the first ``units`` units it has
        online (lowest addresses first) with a new seed, so their pages are dirty again. Each
        new seed replaces the unit's old one, so :meth:`verify` checks what was written last.
        ``units`` 0 stops it."""
        if units < 0 or (units and period <= 0):
            raise ValueError(f"workload of {units} units every {period} s")
        self.workload_units, self.workload_period = units, period
        if self._workload_timer is not None:
            self._workload_timer.cancel()
            self._workload_timer = None
        if units and self.memory is not None:
            self._workload_timer = self.sched.call_at(self.sched.now() + period, self._tick)

    def usable_units(self) -> list[int]:
        """Guest-physical addresses of the plugged units the kernel has online, in order."""
        if not self.probed:
            return []
        out: list[int] = []
        for mid, st in sorted(self.state.items()):
            if st in _ONLINE:
                out += self._plugged_units(mid)
        return out

    def unpatterned_units(self) -> list[int]:
        """The usable units the guest has written no pattern into (free for other data)."""
        return [gpa for gpa in self.usable_units() if gpa not in self._seeds]

    def _tick(self) -> None:
        self._workload_timer = None
        if self.memory is None or not self.workload_units:
            return
        self.workload_ticks += 1
        for gpa in self.usable_units()[: self.workload_units]:
            self._seq += 1
            self._seeds[gpa] = self._seq
            try:
                self.memory.write_pattern(gpa, self.unit, self._seq)
            except Exception as exc:  # as in _use: a non-RAM access to plugged memory
                self.violations.append(f"plugged memory at 0x{gpa:x} is not usable: {exc}")
        self._workload_timer = self.sched.call_at(
            self.sched.now() + self.workload_period, self._tick
        )

    # -- migration ----------------------------------------------------------------------------

    def save_state(self) -> dict[str, object]:
        """Everything the driver knows, as JSON-able data (in a real guest it is in guest RAM
        and travels with it). Timers are saved as the time left on the scheduler's clock, so
        the destination resumes them where the source stopped."""
        now = self.sched.now()
        o = self.opts
        state: dict[str, object] = {
            "options": {
                "boot_memory_end": o.boot_memory_end,
                "online": o.online.value,
                "force_bbm": o.force_bbm,
                "bbm_block_size": o.bbm_block_size,
                "unplug_online": o.unplug_online,
                "legacy_subblocks": o.legacy_subblocks,
                "pinned": sorted(o.pinned),
                "use_stride": o.use_stride,
                "request_log": o.request_log,
            },
            "probed": self.probed,
            "broken": self.broken,
            "hung": self.hung,
            "stopped_no_space": self.stopped_no_space,
            "retry_period": self.retry_period,
            "timer_in": None if self._timer is None else max(0.0, self._timer.when - now),
            "queued": self._queued,
            "seq": self._seq,
            "violations": list(self.violations),
            "workload": [self.workload_units, self.workload_period, self.workload_ticks],
            "workload_in": (
                None if self._workload_timer is None else max(0.0, self._workload_timer.when - now)
            ),
        }
        if self.probed:
            state.update(
                {
                    "config": [
                        self.block_size,
                        self.addr,
                        self.region_size,
                        self.plugged_size,
                        self.requested_size,
                        self.usable_region_size,
                    ],
                    "next_id": self.next_id,
                    "offline_size": self.offline_size,
                    "blocks": {str(mid): st.value for mid, st in self.state.items()},
                    "subblocks": {
                        str(mid): "".join(
                            "1" if mask >> i & 1 else "0" for i in range(self.per_unit)
                        )
                        for mid, mask in self.sb_plugged.items()
                    },
                    "seeds": {str(gpa): seed for gpa, seed in self._seeds.items()},
                    "unplug_all_required": self.unplug_all_required,
                    "config_changed": self.config_changed,
                }
            )
        return state

    @classmethod
    def restore(
        cls,
        channel: Channel,
        scheduler: Scheduler,
        state: Mapping[str, Any],
        *,
        memory: MemoryUser | None = None,
    ) -> LinuxGuest:
        """The driver a source's :meth:`save_state` described, on ``channel``; its queued
        work and timers are scheduled again with the time they had left. Raises ValueError
        (or KeyError, TypeError) for a malformed state."""
        raw = state["options"]
        opts = GuestOptions(
            boot_memory_end=int(raw["boot_memory_end"]),
            online=Online(raw["online"]),
            force_bbm=bool(raw["force_bbm"]),
            bbm_block_size=int(raw["bbm_block_size"]),
            unplug_online=bool(raw["unplug_online"]),
            legacy_subblocks=bool(raw["legacy_subblocks"]),
            pinned=frozenset(int(x) for x in raw["pinned"]),
            use_stride=int(raw["use_stride"]),
            request_log=None if raw.get("request_log") is None else int(raw["request_log"]),
        )
        g = cls(channel, scheduler, opts, memory=memory)
        g.broken = bool(state["broken"])
        g.hung = bool(state["hung"])
        g.stopped_no_space = bool(state["stopped_no_space"])
        g.retry_period = float(state["retry_period"])
        g._seq = int(state["seq"])
        g.violations = [str(v) for v in state["violations"]]
        if state["probed"]:
            g._restore_probed(state)
        timer_in = state["timer_in"]
        if timer_in is not None:
            g._arm_timer(float(timer_in))
        if state["queued"]:
            g._queue()
        units, period, ticks = state["workload"]
        g.workload_units, g.workload_period = int(units), float(period)
        g.workload_ticks = int(ticks)
        workload_in = state["workload_in"]
        if workload_in is not None and memory is not None:
            g._workload_timer = scheduler.call_at(scheduler.now() + float(workload_in), g._tick)
        return g

    def _restore_probed(self, state: Mapping[str, Any]) -> None:
        config = [int(x) for x in state["config"]]
        (
            self.block_size,
            self.addr,
            self.region_size,
            self.plugged_size,
            self.requested_size,
            self.usable_region_size,
        ) = config
        self._choose_mode()
        self.next_id = int(state["next_id"])
        self.offline_size = int(state["offline_size"])
        blocks, subblocks, seeds = state["blocks"], state["subblocks"], state["seeds"]
        self._reset_blocks()
        for mid, st in blocks.items():
            self._set_state(int(mid), Mb(st))
        for mid, bits in subblocks.items():
            bits = str(bits)
            if len(bits) != self.per_unit or set(bits) - {"0", "1"}:
                raise ValueError("guest state has a malformed sub-block map")
            self.sb_plugged[int(mid)] = sum(1 << i for i, c in enumerate(bits) if c == "1")
        self._seeds = {int(gpa): int(seed) for gpa, seed in seeds.items()}
        self.unplug_all_required = bool(state["unplug_all_required"])
        self.config_changed = bool(state["config_changed"])
        self.probed = True
        self._update_last_usable()

    # -- block bookkeeping --------------------------------------------------------------------

    def _base(self, mid: int) -> int:
        return mid * self.id_size

    def _ids(self, state: Mb, *, descending: bool = False) -> list[int]:
        return sorted(self._by_state[state], reverse=descending)

    def _set_state(self, mid: int, state: Mb) -> None:
        old = self.state.get(mid)
        if old is not None:
            self._by_state[old].discard(mid)
        self.state[mid] = state
        self._by_state[state].add(mid)

    def _online(self, mid: int, how: Online) -> None:
        st = self.state[mid]
        partial = st is Mb.OFFLINE_PARTIAL
        zone = Mb.MOVABLE if how is Online.MOVABLE else Mb.KERNEL
        self._set_state(mid, _PARTIAL[zone] if partial else zone)
        self.offline_size -= self.mb_size if self.sbm else self.unit
        if self.memory is not None:
            for gpa in self._plugged_units(mid):
                self._use(gpa)

    def _plugged_units(self, mid: int) -> list[int]:
        base = self._base(mid)
        if not self.sbm:
            return [base]
        mask = self.sb_plugged[mid]
        return [base + i * self.unit for i in range(self.per_unit) if mask >> i & 1]

    def _add_memory(self, mid: int) -> None:
        """add_memory_driver_managed, then the auto-online policy."""
        self.offline_size += self.mb_size if self.sbm else self.unit
        if self.opts.online is not Online.OFFLINE:
            self._online(mid, self.opts.online)

    def _remove(self, mid: int) -> None:
        if self.state[mid] in (Mb.OFFLINE, Mb.OFFLINE_PARTIAL):
            self.offline_size -= self.mb_size if self.sbm else self.unit
        self._set_state(mid, Mb.UNUSED)
        if self.sbm:
            self.sb_plugged[mid] = 0

    def _emptied(self) -> list[int]:
        """Partial blocks whose sub-blocks are all unplugged (waiting to be removed)."""
        return [
            mid
            for st in _PARTIAL.values()
            for mid in self._by_state[st]
            if not self.sb_plugged[mid]
        ]

    def _waiting_removal(self) -> bool:
        return bool(self._emptied())

    def _cleanup(self) -> Rc:
        """Unplug blocks left plugged but not added; retry removing emptied blocks."""
        for mid in self._ids(Mb.PLUGGED):
            base = self._base(mid)
            size = self.id_size
            if self.sbm:
                size = self.sb_plugged[mid].bit_count() * self.unit
            rc = self._unplug_request(base, size) if size else Rc.OK
            if rc is not Rc.OK:
                return rc
            self._remove(mid)
        if self.sbm:
            for mid in self._emptied():
                self._remove(mid)
        return Rc.OK

    # -- why the driver stops short ----------------------------------------------------------

    def _past_usable_region(self) -> Rc:
        size = self.mb_size if self.sbm else self.unit
        base, end = self._base(self.next_id), self.addr + self.usable_region_size
        self._short = (
            f"the next Linux memory block ({format_size(size)} at 0x{base:x}) does not fit the "
            f"usable region (up to 0x{end:x}): Linux adds memory in whole memory blocks"
        )
        return Rc.ENOSPC

    def _too_much_offline(self) -> Rc:
        self._short = (
            f"{format_size(self.offline_size)} of added memory is still offline: Linux adds no "
            f"more until it is onlined (offline threshold {format_size(self.offline_threshold)})"
        )
        return Rc.ENOSPC

    def _unplug_left(self, n: int) -> Rc:
        if not n:
            return Rc.OK
        self._short = (
            f"{format_size(n * self.unit)} could not be unplugged: the memory left in use is "
            "pinned by unmovable pages (kernel zone); the driver retries on its timer"
        )
        return Rc.EBUSY

    def _remainder(self) -> str | None:
        diff = abs(self.requested_size - self.plugged_size)
        if diff >= self.unit:
            return None
        unit = "sub-block" if self.sbm else "big block"
        return (
            f"the rest ({format_size(diff)}) is less than one {unit} ({format_size(self.unit)}), "
            "the driver's unit"
        )

    # -- plug (C5, C7) ------------------------------------------------------------------------

    def _plug(self, diff: int) -> Rc:
        n = diff // self.unit
        if n == 0:
            return Rc.OK
        if not self.sbm:
            return self._plug_bbm(n)
        for state in (Mb.KERNEL_PARTIAL, Mb.MOVABLE_PARTIAL, Mb.OFFLINE_PARTIAL):
            for mid in self._ids(state):
                n, rc = self._plug_partial(mid, n)
                if rc is not Rc.OK or n == 0:
                    return rc
        for mid in self._ids(Mb.UNUSED):
            if self.offline_size + self.mb_size > self.offline_threshold:
                return self._too_much_offline()
            n, rc = self._plug_and_add(mid, n)
            if rc is not Rc.OK or n == 0:
                return rc
        while n:
            if self.next_id > self.last_usable_id:
                return self._past_usable_region()
            if self.offline_size + self.mb_size > self.offline_threshold:
                return self._too_much_offline()
            mid = self.next_id
            self.next_id += 1
            self._set_state(mid, Mb.UNUSED)
            self.sb_plugged[mid] = 0
            n, rc = self._plug_and_add(mid, n)
            if rc is not Rc.OK:
                return rc
        return Rc.OK

    def _plug_partial(self, mid: int, n: int) -> tuple[int, Rc]:
        base = self._base(mid)
        online = self.state[mid] in _ONLINE
        while n and self.sb_plugged[mid] != self._full:
            mask = self.sb_plugged[mid]
            # The lowest unplugged sub-block, and the unplugged ones right above it.
            first = (~mask & (mask + 1)).bit_length() - 1
            above = mask >> first
            gap = (above & -above).bit_length() - 1 if above else self.per_unit - first
            count = min(gap, n)
            rc = self._plug_request(base + first * self.unit, count * self.unit)
            if rc is not Rc.OK:
                return n, rc
            self.sb_plugged[mid] = mask | ((1 << count) - 1) << first
            if online:
                for i in range(first, first + count):
                    self._use(base + i * self.unit)
            n -= count
        if self.sb_plugged[mid] == self._full:
            self._set_state(mid, _FULL[self.state[mid]])
        return n, Rc.OK

    def _plug_and_add(self, mid: int, n: int) -> tuple[int, Rc]:
        count = min(n, self.per_unit)
        rc = self._plug_request(self._base(mid), count * self.unit)
        if rc is not Rc.OK:
            return n, rc
        self.sb_plugged[mid] = (1 << count) - 1
        self._set_state(mid, Mb.OFFLINE if count == self.per_unit else Mb.OFFLINE_PARTIAL)
        self._add_memory(mid)
        return n - count, Rc.OK

    def _plug_bbm(self, n: int) -> Rc:
        while n:
            unused = self._ids(Mb.UNUSED)
            if unused:
                mid = unused[0]
            else:
                if self.next_id > self.last_usable_id:
                    return self._past_usable_region()
                mid = self.next_id
            if self.offline_size + self.unit > self.offline_threshold:
                return self._too_much_offline()
            rc = self._plug_request(self._base(mid), self.unit)
            if rc is not Rc.OK:
                return rc
            if not unused:
                self.next_id += 1
            self._set_state(mid, Mb.OFFLINE)
            self._add_memory(mid)
            n -= 1
        return Rc.OK

    # -- unplug (C6, C7) ----------------------------------------------------------------------

    def _pinned(self, gpa: int) -> bool:
        return gpa - self.addr in self.opts.pinned

    def _unplug(self, diff: int) -> Rc:
        n = diff // self.unit
        if n == 0:
            return Rc.OK
        if not self.sbm:
            return self._unplug_bbm(n)
        order = (
            Mb.OFFLINE_PARTIAL,
            Mb.OFFLINE,
            Mb.MOVABLE_PARTIAL,
            Mb.KERNEL_PARTIAL,
            Mb.MOVABLE,
            Mb.KERNEL,
        )
        for i, state in enumerate(order):
            if i == 2 and not self.opts.unplug_online:
                self._short = _ONLINE_STAYS
                return Rc.OK
            for mid in self._ids(state, descending=True):
                if self.state[mid] is not state:
                    continue
                if state in (Mb.OFFLINE, Mb.OFFLINE_PARTIAL):
                    n, rc = self._unplug_offline(mid, n)
                else:
                    n, rc = self._unplug_online(mid, n)
                if rc is not Rc.OK:
                    return rc
                if n == 0:
                    return Rc.OK
        return self._unplug_left(n)

    def _unplug_offline(self, mid: int, n: int) -> tuple[int, Rc]:
        base = self._base(mid)
        while n and self.sb_plugged[mid]:
            mask = self.sb_plugged[mid]
            # The highest plugged sub-block, and the plugged ones right below it.
            top = mask.bit_length() - 1
            holes = ~mask & ((1 << top) - 1)
            run = top - holes.bit_length() + 1
            count = min(run, n)
            low = top - count + 1
            rc = self._unplug_request(base + low * self.unit, count * self.unit)
            if rc is not Rc.OK:
                return n, rc
            self.sb_plugged[mid] = mask & ~(((1 << count) - 1) << low)
            n -= count
        if not self.sb_plugged[mid]:
            self._remove(mid)
        elif self.state[mid] is Mb.OFFLINE:
            self._set_state(mid, Mb.OFFLINE_PARTIAL)
        return n, Rc.OK

    def _unplug_online(self, mid: int, n: int) -> tuple[int, Rc]:
        base = self._base(mid)
        kernel = self.state[mid] in (Mb.KERNEL, Mb.KERNEL_PARTIAL)
        full = self.state[mid] in (Mb.KERNEL, Mb.MOVABLE)
        if n >= self.per_unit and full:
            # Fake-offline the whole block (alloc_contig_range); a pinned page makes it EBUSY.
            blocked = kernel and any(
                self._pinned(base + i * self.unit) for i in range(self.per_unit)
            )
            if not blocked:
                gpas = [base + i * self.unit for i in range(self.per_unit)]
                for gpa in gpas:
                    self._release(gpa)
                rc = self._unplug_request(base, self.per_unit * self.unit)
                if rc is not Rc.OK:
                    for gpa in gpas:
                        self._use(gpa)  # fake-online again
                    return n, rc
                self._remove(mid)  # offline_and_remove_memory
                return n - self.per_unit, Rc.OK
        for i in range(self.per_unit - 1, -1, -1):
            if not n:
                break
            if not self.sb_plugged[mid] >> i & 1:
                continue
            gpa = base + i * self.unit
            if kernel and self._pinned(gpa):
                continue  # migration failed: skipped silently
            self._release(gpa)
            rc = self._unplug_request(gpa, self.unit)
            if rc is not Rc.OK:
                self._use(gpa)
                return n, rc
            self.sb_plugged[mid] &= ~(1 << i)
            n -= 1
        if not self.sb_plugged[mid]:
            self._remove(mid)
        elif full and self.sb_plugged[mid] != self._full:
            self._set_state(mid, _PARTIAL[self.state[mid]])
        return n, Rc.OK

    def _unplug_bbm(self, n: int) -> Rc:
        for pass_ in range(3):
            if pass_ == 1 and not self.opts.unplug_online:
                self._short = _ONLINE_STAYS
                return Rc.OK
            for mid in sorted(self.state, reverse=True):
                if not n:
                    return Rc.OK
                st = self.state[mid]
                if st is Mb.UNUSED or st is Mb.PLUGGED:
                    continue
                offline = st is Mb.OFFLINE
                if (pass_ == 0 and not offline) or (pass_ == 1 and st is Mb.KERNEL):
                    continue
                base = self._base(mid)
                if st is Mb.KERNEL and any(
                    self._pinned(g) for g in range(base, base + self.unit, PAGEBLOCK_SIZE)
                ):
                    continue  # fake-offline fails: roll back and skip
                self._release(base)
                self._remove(mid)  # offline_and_remove_memory first (safe BBM unplug)
                rc = self._unplug_request(base, self.unit)
                if rc is not Rc.OK:
                    self._set_state(mid, Mb.PLUGGED)  # cleaned up by a later run
                    return rc
                n -= 1
        return self._unplug_left(n)


__all__ = [
    "Channel",
    "GuestOptions",
    "GuestRam",
    "LinuxGuest",
    "LoggedRequest",
    "Mb",
    "MemoryUser",
    "Online",
    "RamUser",
    "memory_block_size",
]


_RECORD = struct.Struct("<QQ")


class RamUser:
    """A :class:`MemoryUser` that reaches guest RAM through the machine's memory map.

    Each use writes one 16-byte record (address, seed) into one 4 KiB page of the range, so a
    fully used 1 TiB device costs 2 GiB of host memory, not 1 TiB.
    """

    def __init__(self, memory: GuestRam) -> None:
        self.ram = memory

    @staticmethod
    def _where(gpa: int, length: int, seed: int) -> int:
        return gpa + (seed * 2654435761 % ((length >> 12) or 1) << 12)

    def write_pattern(self, gpa: int, length: int, seed: int) -> None:
        """Write the record; raises if the range is not RAM."""
        self.ram.write(self._where(gpa, length, seed), _RECORD.pack(gpa, seed))

    def check_pattern(self, gpa: int, length: int, seed: int) -> bool:
        """True if the record is intact."""
        data = self.ram.read(self._where(gpa, length, seed), _RECORD.size)
        return data == _RECORD.pack(gpa, seed)


class GuestRam(Protocol):
    """Byte access to guest-physical memory (:class:`memslots.memory.address_space.GuestMemory`)."""

    def read(self, gpa: int, length: int) -> bytes:
        """Read guest memory."""
        ...

    def write(self, gpa: int, data: bytes) -> None:
        """Write guest memory."""
        ...
