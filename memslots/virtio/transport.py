"""The device's side of the virtio transport for virtio-mem: status, features, config, queue 0.

This is what a virtio-pci (modern) front-end would expose of :class:`VirtioMem`: the device
status byte, feature negotiation, the read-only config space with its generation counter, the
one request queue (at most 128 entries) and its notification. Every method takes what a guest
can write and never raises for it: anything the guest got wrong (a malformed chain, a short or
unknown request, a queue set up at the wrong time or in the wrong place) makes the device need a
reset, as QEMU's ``virtio_error`` does — DEVICE_NEEDS_RESET is set, a config interrupt goes out
(after DRIVER_OK), the queue is not processed any further, and the offending element is not
returned. A chain is validated completely before the device acts on it, so a violation never
leaves the plugged state half-changed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from memslots.devices.virtio_mem.device import QUEUE_SIZE, VirtioMem
from memslots.devices.virtio_mem.wire import (
    CONFIG_SIZE,
    F_UNPLUGGED_INACCESSIBLE,
    REQUEST_SIZE,
    RESPONSE_SIZE,
    ReqType,
    Request,
    Response,
)
from memslots.errors import MemslotsError, MigrationError
from memslots.memory.address_space import GuestMemory
from memslots.virtio.virtqueue import Chain, QueueSetupError, VirtQueue

log = logging.getLogger("memslots.virtio.transport")

#: Device status bits.
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

#: Transport feature bits.
F_INDIRECT_DESC = 28
F_VERSION_1 = 32

_REQUEST_TYPES = frozenset(int(t) for t in ReqType)
#: The requests that can take memory out of reach.
_TAKES_OUT_OF_REACH = frozenset((ReqType.UNPLUG, ReqType.UNPLUG_ALL))
#: Version of :meth:`VirtioMemTransport.save_state`'s format.
STATE_VERSION = 1


def _noop() -> None:
    pass


class VirtioMemTransport:
    """virtio-mem behind a virtio transport, driven by what the guest writes.

    ``interrupt`` is the used-buffer notification of queue 0 and ``config_interrupt`` the
    configuration-change notification. ``request_listeners`` are called with each request and
    its response once the response is in the used ring (for tracing and statistics).
    """

    def __init__(
        self,
        dev: VirtioMem,
        memory: GuestMemory,
        *,
        interrupt: Callable[[], None] = _noop,
        config_interrupt: Callable[[], None] = _noop,
    ) -> None:
        self.dev = dev
        self.memory = memory
        self.interrupt = interrupt
        self.config_interrupt = config_interrupt
        self.request_listeners: list[Callable[[Request, Response], None]] = []
        #: The violation that made the device need a reset (None until then, and after reset).
        self.error: MemslotsError | None = None
        self.queue: VirtQueue | None = None
        self.driver_features = 0
        self._status = 0
        self._generation = 0
        self._config = dev.config().pack()
        dev.config_change_listeners.append(self._config_changed)

    def close(self) -> None:
        """Stop following the device's config changes."""
        self.dev.config_change_listeners.remove(self._config_changed)

    # -- migration -----------------------------------------------------------------------------

    def save_state(self) -> bytes:
        """The virtio state a migration carries in the device's late section (QEMU's generic
        virtio state): status, negotiated features, config generation, the queue's layout and
        indices. UTF-8 JSON, versioned (:data:`STATE_VERSION`)."""
        state: dict[str, object] = {
            "version": STATE_VERSION,
            "status": self._status,
            "driver_features": self.driver_features,
            "generation": self._generation,
            "needs_reset": self.dev.needs_reset,
            "queue": self.queue.save_state() if self.queue is not None else None,
        }
        return json.dumps(state, sort_keys=True).encode()

    def load_state(self, data: bytes) -> None:
        """Take a source's :meth:`save_state` (on a fresh transport of the destination's
        device); raises :class:`~memslots.errors.MigrationError` if it is malformed."""
        try:
            state = json.loads(data)
            if state.get("version") != STATE_VERSION:
                raise MigrationError(
                    f"virtio state version {state.get('version')} is not {STATE_VERSION}"
                )
            queue = state["queue"]
            self._status = int(state["status"]) & 0xFF
            self.driver_features = int(state["driver_features"])
            self._generation = int(state["generation"])
            self.dev.needs_reset = bool(state["needs_reset"])
            self.queue = None
            if queue is not None:
                vq = VirtQueue(
                    self.memory,
                    int(queue["num"]),
                    int(queue["desc"]),
                    int(queue["avail"]),
                    int(queue["used"]),
                    interrupt=self._queue_interrupt,
                    indirect=bool(queue["indirect"]),
                    max_size=QUEUE_SIZE,
                )
                vq.last_avail_idx = int(queue["last_avail_idx"]) & 0xFFFF
                vq.used_idx = int(queue["used_idx"]) & 0xFFFF
                self.queue = vq
        except MigrationError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, MemslotsError) as exc:
            raise MigrationError(
                f"virtio-mem '{self.dev.label}': malformed virtio state: {exc}"
            ) from None
        self._config = self.dev.config().pack()

    # -- status and features -------------------------------------------------------------------

    @property
    def status(self) -> int:
        """The device status byte as the driver reads it (DEVICE_NEEDS_RESET is the device's
        ``needs_reset``)."""
        return self._status | (STATUS_DEVICE_NEEDS_RESET if self.dev.needs_reset else 0)

    @property
    def ready(self) -> bool:
        """True while the device answers its queue: FEATURES_OK and DRIVER_OK set, FAILED and
        DEVICE_NEEDS_RESET not."""
        live = STATUS_FEATURES_OK | STATUS_DRIVER_OK
        return self._status & (live | STATUS_FAILED) == live and not self.dev.needs_reset

    @property
    def device_features(self) -> int:
        """Feature bits the device offers."""
        features = 1 << F_VERSION_1 | 1 << F_INDIRECT_DESC
        if self.dev.unplugged_inaccessible == "on":
            features |= 1 << F_UNPLUGGED_INACCESSIBLE
        return features

    def write_driver_features(self, features: int) -> None:
        """The driver accepts ``features``; ignored once FEATURES_OK is set (as in QEMU)."""
        if not self._status & STATUS_FEATURES_OK:
            self.driver_features = features & ((1 << 64) - 1)

    def _features_acceptable(self) -> bool:
        offered = self.device_features
        accepted = self.driver_features
        # A modern-only device, and QEMU's virtio-mem refuses drivers that would touch
        # unplugged memory when the device cannot allow it.
        required = offered & (1 << F_VERSION_1 | 1 << F_UNPLUGGED_INACCESSIBLE)
        return not accepted & ~offered and accepted & required == required

    def write_status(self, value: int) -> None:
        """The driver writes the status byte; 0 resets the device.

        FEATURES_OK is only kept if the accepted features are acceptable; the driver reads the
        status back to find out. DEVICE_NEEDS_RESET belongs to the device and is not writable.
        """
        value &= 0xFF
        if value == 0:
            self.reset()
            return
        if (
            value & STATUS_FEATURES_OK
            and not self._status & STATUS_FEATURES_OK
            and not self._features_acceptable()
        ):
            value &= ~STATUS_FEATURES_OK
        self._status = value & ~STATUS_DEVICE_NEEDS_RESET

    def reset(self) -> None:
        """A device reset: status, features and queue are forgotten; block states are kept."""
        self.dev.device_reset()
        self._status = 0
        self.driver_features = 0
        self.queue = None
        self.error = None

    # -- config space --------------------------------------------------------------------------

    def _sync_config(self) -> bool:
        """Take the current config; True (and a new generation) if it changed."""
        raw = self.dev.config().pack()
        if raw == self._config:
            return False
        # plugged_size changes without a notification: the generation still has to move so
        # that a driver reading the fields one by one notices.
        self._config = raw
        self._generation += 1
        return True

    @property
    def config_generation(self) -> int:
        """The config generation (8 bits, as in virtio-pci); changes with every config change."""
        self._sync_config()
        return self._generation & 0xFF

    def read_config(self, offset: int, length: int) -> bytes:
        """Read ``length`` config bytes at ``offset``; all-ones outside the 56 bytes (QEMU)."""
        length = max(0, length)
        if offset < 0 or offset + length > CONFIG_SIZE:
            return b"\xff" * length
        self._sync_config()
        return self._config[offset : offset + length]

    def _config_changed(self, dev: VirtioMem) -> None:
        if not self._sync_config():
            # QEMU bumps the generation with every notification, even when nothing changed.
            self._generation += 1
        if self._status & STATUS_DRIVER_OK:
            self.config_interrupt()

    # -- the request queue ---------------------------------------------------------------------

    def setup_queue(self, num: int, desc: int, avail: int, used: int) -> None:
        """The driver configures and enables queue 0 (after FEATURES_OK, before DRIVER_OK)."""
        if self.status & (STATUS_DRIVER_OK | STATUS_DEVICE_NEEDS_RESET):
            self._violation(QueueSetupError("queue set up after DRIVER_OK or while broken"))
        elif not self._status & STATUS_FEATURES_OK:
            self._violation(QueueSetupError("queue set up before FEATURES_OK"))
        else:
            try:
                self.queue = VirtQueue(
                    self.memory,
                    num,
                    desc,
                    avail,
                    used,
                    interrupt=self._queue_interrupt,
                    indirect=bool(self.driver_features >> F_INDIRECT_DESC & 1),
                    max_size=QUEUE_SIZE,
                )
            except QueueSetupError as exc:
                self._violation(exc)

    def notify(self) -> None:
        """The driver kicked queue 0: answer every available request, in order.

        Never raises for anything the guest wrote; a violation makes the device need a reset
        and stops processing at the offending element, which is not returned.
        """
        vq = self.queue
        if vq is None or not self.ready:
            return
        dev = self.dev
        try:
            while (chain := vq.pop()) is not None:
                req = self._request(chain)
                self._check_reach(vq, chain, req)
                resp = dev.execute(req)
                chain.write_in(resp.pack())
                vq.push(chain.head, RESPONSE_SIZE)
                for cb in self.request_listeners:
                    cb(req, resp)
        except MemslotsError as exc:
            self._violation(exc)

    def _queue_interrupt(self) -> None:
        # Looked up at each push, so that ``interrupt`` can be replaced at any time.
        self.interrupt()

    def _request(self, chain: Chain) -> Request:
        """The chain's request, checked in QEMU's order; protocol_violation if unusable."""
        dev = self.dev
        if chain.out_len < REQUEST_SIZE:
            dev.protocol_violation(f"invalid request size: {chain.out_len}")
        if chain.in_len < RESPONSE_SIZE:
            dev.protocol_violation(f"not enough space for response: {chain.in_len}")
        req = Request.unpack(chain.read_out(REQUEST_SIZE))
        if req.type not in _REQUEST_TYPES:
            dev.protocol_violation(f"unknown request type: {req.type}")
        return req

    def _check_reach(self, vq: VirtQueue, chain: Chain, req: Request) -> None:
        """A request that would take its own response buffer or the queue out of reach is a
        protocol violation, refused before it runs (nothing changes)."""
        dev = self.dev
        if req.type not in _TAKES_OUT_OF_REACH or not dev.protects or dev.memdev is None:
            return
        memory = dev.memdev.memory
        # Drivers keep their queue and buffers elsewhere: then there is nothing to work out.
        places = [
            (what, place)
            for what, place in (
                *(("response buffer", p) for p in chain.in_places),
                *vq.ring_places,
            )
            if place[0] is memory
        ]
        if not places:
            return
        gone = dev.out_of_reach_after(req)
        for what, (_mem, offset, n) in places:
            if any(lo < offset + n and offset < hi for lo, hi in gone):
                dev.protocol_violation(
                    f"the request would take its own {what} out of reach (unplugged memory)"
                )

    def _violation(self, exc: MemslotsError) -> None:
        """QEMU's virtio_error: the device needs a reset and tells the driver so."""
        self.dev.needs_reset = True
        self.error = exc
        log.warning("virtio-mem '%s': %s; the device needs a reset", self.dev.label, exc)
        if self._status & STATUS_DRIVER_OK:
            self._generation += 1
            self.config_interrupt()
