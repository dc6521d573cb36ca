"""The vhost-user front-end: negotiation in QEMU's order and a shadow of the back-end's table.

We negotiate in QEMU's order (GET_FEATURES, SET_OWNER, GET_PROTOCOL_FEATURES, SET_FEATURES,
SET_PROTOCOL_FEATURES, GET_QUEUE_NUM with MQ, GET_MAX_MEM_SLOTS with CONFIGURE_MEM_SLOTS), then
keep the back-end's table with one ADD_MEM_REG / REM_MEM_REG per memslot, or with SET_MEM_TABLE
(at most 8 regions) when the back-end lacks CONFIGURE_MEM_SLOTS.

The back-ends Debian 12 ships (libvhost-user 7.2) acknowledge a failed request with 0 and then
drop the connection (qemu-storage-daemon) or exit (virtiofsd), so an ack proves nothing: every
batch of changes ends with GET_FEATURES, which always gets a reply, and EOF or EPIPE there
means the batch failed. :class:`VhostUserFrontend` keeps a shadow of exactly what the back-end
holds, because REM_MEM_REG must repeat the exact (gpa, size, uaddr) of an ADD_MEM_REG, and the
same triple must never be added twice (one REM would remove both).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from memslots.errors import VhostError
from memslots.vhost.user.wire import (
    BASELINE_NREGIONS,
    CONFIG_HEADER,
    F_PROTOCOL_FEATURES,
    F_VERSION_1,
    MAX_RAM_SLOTS,
    SUPPORTED_PROTOCOL_FEATURES,
    U64,
    VRING_ADDR,
    VRING_STATE,
    MemRegion,
    ProtocolFeature,
    Req,
    VhostUserConnection,
)


@dataclass(frozen=True)
class Endpoint:
    """How to reach a back-end and what to negotiate with it.

    ``config``: the device has a config space (vhost-user-blk), so CONFIG is negotiated and
    required. ``protocol_features``: what we are willing to use (a subset of
    :data:`SUPPORTED_PROTOCOL_FEATURES`). ``timeout``: seconds to wait for any reply.
    """

    path: str
    config: bool = False
    protocol_features: int = SUPPORTED_PROTOCOL_FEATURES
    timeout: float = 5.0


class VhostUserFrontend:
    """A negotiated connection to a back-end, and a shadow of the memory table it holds.

    Attributes after negotiation: ``features`` (offered), ``acked_features``,
    ``protocol_features`` (negotiated), ``queue_num`` and ``max_mem_slots`` (QEMU's limit:
    ``min(GET_MAX_MEM_SLOTS, 512)``, or 8 without CONFIGURE_MEM_SLOTS). ``prior_limit`` is the
    limit validated on an earlier connection; a back-end that now reports less is refused, as
    QEMU does. Any failed or unverifiable request closes the connection, since the back-end's
    table is then unknown (a real back-end drops it with the connection).
    """

    def __init__(self, endpoint: Endpoint, *, prior_limit: int = 0) -> None:
        self.endpoint = endpoint
        self.connection = VhostUserConnection(endpoint.path, endpoint.timeout)
        #: What the back-end holds: exactly the regions it acknowledged and we verified.
        self.table: dict[tuple[int, int, int], MemRegion] = {}
        self.features = self.acked_features = self.protocol_features = 0
        self.queue_num = 1
        self.max_mem_slots = 0
        try:
            self._negotiate(prior_limit)
        except BaseException:
            self.close()
            raise

    # -- negotiation -----------------------------------------------------------------------

    def has(self, feature: ProtocolFeature) -> bool:
        """Whether a protocol feature was negotiated."""
        return bool(self.protocol_features & (1 << feature))

    def _negotiate(self, prior_limit: int) -> None:
        path = self.endpoint.path
        features = self._get_u64(Req.GET_FEATURES)
        if not features & (1 << F_VERSION_1):
            raise VhostError(
                f"vhost-user back-end at '{path}' does not offer VIRTIO_F_VERSION_1 "
                f"(features 0x{features:x}); legacy virtio is not supported"
            )
        self.features = features
        self.connection.send(Req.SET_OWNER)
        has_protocol = bool(features & (1 << F_PROTOCOL_FEATURES))
        protocol = 0
        wanted = self.endpoint.protocol_features & SUPPORTED_PROTOCOL_FEATURES
        if has_protocol:
            offered = self._get_u64(Req.GET_PROTOCOL_FEATURES)
            protocol = offered & wanted
            if self.endpoint.config:
                protocol |= offered & (1 << ProtocolFeature.CONFIG)
        if self.endpoint.config and not protocol & (1 << ProtocolFeature.CONFIG):
            raise VhostError(
                "Device expects VHOST_USER_PROTOCOL_F_CONFIG but backend does not support it. "
                f"(back-end at '{path}')"
            )
        self.acked_features = features & ((1 << F_VERSION_1) | (1 << F_PROTOCOL_FEATURES))
        self.connection.send(Req.SET_FEATURES, U64.pack(self.acked_features))
        if has_protocol:
            self.connection.send(Req.SET_PROTOCOL_FEATURES, U64.pack(protocol))
        self.protocol_features = protocol
        if self.has(ProtocolFeature.MQ):
            self.queue_num = self._get_u64(Req.GET_QUEUE_NUM)
        if self.has(ProtocolFeature.CONFIGURE_MEM_SLOTS):
            slots = self._get_u64(Req.GET_MAX_MEM_SLOTS)
        else:
            slots = BASELINE_NREGIONS
        if slots < prior_limit:
            raise VhostError(
                f"The backend specified a max ram slots limit of {slots}, when the prior "
                f"validated limit was {prior_limit}. This limit should never decrease. "
                f"(back-end at '{path}')"
            )
        self.max_mem_slots = min(slots, MAX_RAM_SLOTS)

    # -- messages --------------------------------------------------------------------------

    def _get_u64(self, req: Req) -> int:
        self.connection.send(req)
        payload = self.connection.recv_reply(req)
        if len(payload) != U64.size:
            raise VhostError(
                f"vhost-user back-end at '{self.endpoint.path}' answered {req.name} with "
                f"{len(payload)} bytes"
            )
        value: int = U64.unpack(payload)[0]
        return value

    def _set(self, req: Req, payload: bytes = b"", fds: Iterable[int] = ()) -> None:
        """Send a request that changes state; with REPLY_ACK, wait for its ack."""
        ack = self.has(ProtocolFeature.REPLY_ACK)
        self.connection.send(req, payload, fds, need_reply=ack)
        if ack:
            status = self._reply_u64(req)
            if status != 0:
                raise VhostError(
                    f"vhost-user back-end at '{self.endpoint.path}' failed {req.name} "
                    f"(ack {status})"
                )

    def _reply_u64(self, req: Req) -> int:
        payload = self.connection.recv_reply(req)
        if len(payload) != U64.size:
            raise VhostError(
                f"vhost-user back-end at '{self.endpoint.path}' acked {req.name} with "
                f"{len(payload)} bytes"
            )
        value: int = U64.unpack(payload)[0]
        return value

    def _verify(self) -> None:
        """A GET_FEATURES round trip: proves that everything sent before was processed.

        libvhost-user handles messages in order and acks failures with 0 before dropping the
        connection, so a reply here is the only evidence that the requests before it worked.
        """
        features = self._get_u64(Req.GET_FEATURES)
        if features != self.features:
            raise VhostError(
                f"vhost-user back-end at '{self.endpoint.path}' now offers features "
                f"0x{features:x} instead of 0x{self.features:x}"
            )

    @contextmanager
    def _checked(self) -> Iterator[None]:
        """Close the connection when a request fails: the back-end's state is then unknown."""
        try:
            yield
        except VhostError:
            self.close()
            raise

    def ping(self) -> None:
        """Check that the back-end is still there (one GET_FEATURES round trip)."""
        with self._checked():
            self._verify()

    # -- the memory table --------------------------------------------------------------------

    @property
    def configure_mem_slots(self) -> bool:
        """True when regions are added and removed one by one (else SET_MEM_TABLE)."""
        return self.has(ProtocolFeature.CONFIGURE_MEM_SLOTS)

    def sync(self, desired: Mapping[tuple[int, int, int], tuple[MemRegion, int]]) -> int:
        """Make the back-end hold exactly ``desired`` (key -> region and its fd).

        Removals go first, then additions, then the verification round trip. More regions
        than :attr:`max_mem_slots` are refused before anything is sent. Returns the number of
        table messages sent (0 when the back-end already holds ``desired``).
        """
        if len(desired) > self.max_mem_slots:
            raise VhostError(
                f"vhost-user back-end at '{self.endpoint.path}' supports "
                f"{self.max_mem_slots} memory regions, not {len(desired)}"
            )
        with self._checked():
            sent = (
                self._sync_regions(desired)
                if self.configure_mem_slots
                else self._sync_table(desired)
            )
            if sent:
                self._verify()
        return sent

    def _sync_regions(self, desired: Mapping[tuple[int, int, int], tuple[MemRegion, int]]) -> int:
        removes = sorted(r for k, r in self.table.items() if k not in desired)
        adds = sorted(v for k, v in desired.items() if k not in self.table)
        for region in removes:
            # No fd: the back-end matches on (gpa, size, uaddr) alone.
            self._set(Req.REM_MEM_REG, U64.pack(0) + region.pack())
            del self.table[region.key]
        for region, fd in adds:
            self._set(Req.ADD_MEM_REG, U64.pack(0) + region.pack(), (fd,))
            self.table[region.key] = region
        return len(removes) + len(adds)

    def _sync_table(self, desired: Mapping[tuple[int, int, int], tuple[MemRegion, int]]) -> int:
        if desired.keys() == self.table.keys():
            return 0
        entries = sorted(desired.values())
        payload = VRING_STATE.pack(len(entries), 0) + b"".join(r.pack() for r, _ in entries)
        self._set(Req.SET_MEM_TABLE, payload, [fd for _, fd in entries])
        self.table = {r.key: r for r, _ in entries}
        return 1

    def translate(self, gpa: int, length: int) -> int:
        """Our (QEMU's) address of ``[gpa, gpa+length)``, which must lie in one region the
        back-end holds: ring addresses are given to the back-end as such addresses."""
        for r in self.table.values():
            if r.gpa <= gpa and gpa + length <= r.gpa + r.size:
                return r.uaddr + gpa - r.gpa
        raise VhostError(
            f"guest memory [0x{gpa:x}, +0x{length:x}) is not in a memory region the vhost-user "
            f"back-end at '{self.endpoint.path}' holds"
        )

    # -- virtqueues and config ---------------------------------------------------------------

    def set_vring(
        self,
        index: int,
        num: int,
        rings: tuple[int, int, int],
        kick_fd: int,
        call_fd: int,
    ) -> None:
        """Set up and start virtqueue ``index`` with ``num`` entries.

        ``rings`` are the guest-physical addresses of the descriptor table, avail and used
        rings; they must lie in memory the back-end holds, since it reads ``used->idx`` as
        soon as it gets SET_VRING_ADDR.
        """
        desc, avail, used = rings
        addrs = (
            self.translate(desc, 16 * num),
            self.translate(used, 6 + 8 * num),
            self.translate(avail, 6 + 2 * num),
        )
        with self._checked():
            self._set(Req.SET_VRING_NUM, VRING_STATE.pack(index, num))
            self._set(Req.SET_VRING_BASE, VRING_STATE.pack(index, 0))
            self._set(Req.SET_VRING_ADDR, VRING_ADDR.pack(index, 0, *addrs, 0))
            self._set(Req.SET_VRING_CALL, U64.pack(index), (call_fd,))
            self._set(Req.SET_VRING_KICK, U64.pack(index), (kick_fd,))
            if self.acked_features & (1 << F_PROTOCOL_FEATURES):
                # With protocol features, rings start disabled.
                self._set(Req.SET_VRING_ENABLE, VRING_STATE.pack(index, 1))
            self._verify()

    def get_config(self, size: int) -> bytes:
        """GET_CONFIG: the first ``size`` bytes of the device's config space."""
        with self._checked():
            self.connection.send(Req.GET_CONFIG, CONFIG_HEADER.pack(0, size, 0) + bytes(size))
            payload = self.connection.recv_reply(Req.GET_CONFIG)
            if len(payload) != CONFIG_HEADER.size + size:
                raise VhostError(
                    f"vhost-user back-end at '{self.endpoint.path}' answered GET_CONFIG with "
                    f"{len(payload)} bytes"
                )
        return payload[CONFIG_HEADER.size :]

    def close(self) -> None:
        """Close the connection; the back-end holds nothing any more."""
        self.connection.close()
        self.table.clear()
