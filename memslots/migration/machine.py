"""A machine's memory state through the stream: what the source writes, how a destination loads.

Source (:func:`save_machine`, or its three steps for a live migration):

1. :func:`write_setup`: the header, the CONFIG section (:func:`describe_machine`) and each
   virtio-mem device's early state (its bitmap is frozen from here: the device is busy);
2. RAM (:func:`ram_ranges` lists what to send: boot RAM whole, each virtio-mem backend's
   plugged blocks only, other used backends whole; a live migration then sends what the dirty
   logs report, :mod:`memslots.migration.dirty` and ``KvmAccel.sync_dirty_log``);
3. :func:`write_completion`: each virtio-mem device's late state, the opaque STATE sections
   (guest model, probe vCPU), END.

Destination (:func:`load_machine`), built from the same command line with
``Machine(..., incoming=True)`` so realize skips the initial discard: the CONFIG section is
checked against its own machine; each early state goes through ``VirtioMem.load_early`` (QEMU's
sanity messages; then the destination maps the memslots of *its own* decision that hold plugged
blocks); before the first page the RAM blocks are checked (QEMU's messages); pages go straight
into host memory; each late state goes through ``load_late`` (unplugged memory discarded). On
any error every device's load is cancelled (no memslot stays mapped, memory is given back) and
:class:`MigrationError` says why; the machine must then not run.

A local live update (``x-ignore-shared``) sends no pages of the backends whose memory is
shared and has a file descriptor: CONFIG marks them ``ignored`` and carries their fds
(SCM_RIGHTS, in ``ram_blocks`` order), and the destination maps them in place of its own
memory (``HostMemory.adopt``) before any early state is loaded, and never discards in them.

:class:`MachineLoader` splits a load into what reads the stream (:meth:`MachineLoader.next_record`,
which applies RAM records as they come and may run off the event loop) and what changes the
machine (:meth:`MachineLoader.apply`, run where the machine's other changes run).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Set
from dataclasses import dataclass, field
from typing import Any

import xxhash

from memslots.devices.memory_device import MemoryDevice
from memslots.devices.virtio_mem.device import VirtioMem
from memslots.errors import MemslotsError, MigrationError
from memslots.host.memory import HostMemory
from memslots.machine.machine import Machine
from memslots.memory.address_space import RamBlock
from memslots.migration.channel import SocketSource
from memslots.migration.sections import (
    CONFIG_VERSION,
    EARLY_VERSION,
    LATE_VERSION,
    decode_config,
    decode_early,
    decode_late,
    encode_config,
    encode_early,
    encode_late,
)
from memslots.migration.stream import (
    EndRecord,
    RamRecord,
    RamSource,
    RamTarget,
    RecordType,
    SectionRecord,
    StreamReader,
    StreamStats,
    StreamWriter,
)
from memslots.vhost.user.consumer import VhostUserConsumer

BOOT_RAM_ID = "pc.ram"


def section_name(dev: VirtioMem) -> str:
    """The stream's name for a virtio-mem device: its id, or its memdev when it has none."""
    if dev.id:
        return f"virtio-mem/{dev.id}"
    memdev = dev.memdev.id if dev.memdev is not None else "?"
    return f"virtio-mem/memdev={memdev}"


def ram_blocks(m: Machine) -> list[tuple[str, RamBlock]]:
    """The RAM blocks that travel, in stream order: boot RAM, then every backend a memory
    device uses (a backend no device uses holds no guest data and is not sent)."""
    blocks: list[tuple[str, RamBlock]] = []
    if m.boot_ram is not None:
        blocks.append((BOOT_RAM_ID, m.boot_ram.memory))
    blocks += [(b.id, b.memory) for b in m.backends.values() if b.used_by is not None]
    return blocks


def shared_blocks(m: Machine) -> set[str]:
    """The RAM blocks a local live update hands over instead of copying: shared memory with
    a file descriptor (``memory-backend-memfd``, or ``-file`` with ``share=on``)."""
    return {
        block_id
        for block_id, block in ram_blocks(m)
        if isinstance(block, HostMemory) and block.shared and block.fd is not None
    }


def describe_machine(m: Machine, ignored: Set[str] = frozenset()) -> dict[str, Any]:
    """The CONFIG section: what a destination checks its own machine against (``ignored``:
    the blocks whose memory is handed over, not sent)."""
    lay = m.layout
    sections: dict[MemoryDevice, str] = {dev: section_name(dev) for dev in m.virtio_mem_devices}
    devices: list[dict[str, Any]] = []
    for dev in m.memory_devices:
        entry: dict[str, Any] = {
            "id": dev.id,
            "type": dev.info_type,
            "addr": dev.get_addr(),
            "memdev": dev.memdev.id if dev.memdev is not None else None,
        }
        if dev in sections:
            entry["section"] = sections[dev]
        devices.append(entry)
    return {
        "machine": {
            "ram_size": m.config.memory.ram_size,
            "maxmem": m.config.memory.maxmem,
            "slots": m.config.memory.slots,
            "device_memory_base": lay.device_memory_base,
            "device_memory_size": lay.device_memory_size,
        },
        "ram_blocks": [
            {
                "id": block_id,
                "size": block.size,
                "page_size": block.page_size,
                "fd_backed": block.fd_backed,
                "ignored": block_id in ignored,
            }
            for block_id, block in ram_blocks(m)
        ],
        "devices": devices,
    }


def _host_memory(block_id: str, block: RamBlock) -> HostMemory:
    if not isinstance(block, HostMemory) or block.closed:
        raise MigrationError(f"RAM block '{block_id}' has no host memory (a planned machine?)")
    return block


def ram_ranges(
    m: Machine, ignored: Set[str] = frozenset()
) -> list[tuple[int, HostMemory, int, int]]:
    """What a full pass sends: ``(block index, memory, offset, length)`` -- boot RAM whole,
    virtio-mem backends' plugged blocks only (QEMU skips discarded ranges), others whole;
    nothing of the ``ignored`` blocks."""
    users = {d.memdev.id: d for d in m.virtio_mem_devices if d.memdev is not None}
    out: list[tuple[int, HostMemory, int, int]] = []
    for index, (block_id, block) in enumerate(ram_blocks(m)):
        if block_id in ignored:
            continue
        memory = _host_memory(block_id, block)
        dev = users.get(block_id) if block_id != BOOT_RAM_ID else None
        if dev is None:
            out.append((index, memory, 0, memory.size))
            continue
        bs = dev.block_size
        out += [(index, memory, f * bs, n * bs) for f, n in dev.plugged_ranges()]
    return out


def write_setup(m: Machine, writer: StreamWriter, ignored: Set[str] = frozenset()) -> None:
    """Header, CONFIG (with the fds of the ``ignored`` blocks) and every virtio-mem device's
    early state."""
    writer.write_header()
    fds = []
    for block_id, block in ram_blocks(m):
        if block_id in ignored:
            fd = _host_memory(block_id, block).fd
            if fd is None:
                raise MigrationError(f"RAM block '{block_id}' has no fd to hand over")
            fds.append(fd)
    writer.write_section(
        RecordType.CONFIG,
        "config",
        encode_config(describe_machine(m, ignored)),
        CONFIG_VERSION,
        fds=fds,
    )
    for dev in m.virtio_mem_devices:
        writer.write_section(
            RecordType.EARLY, section_name(dev), encode_early(dev.save_early()), EARLY_VERSION
        )


def write_ram(
    m: Machine, writer: StreamWriter, *, stable: bool, ignored: Set[str] = frozenset()
) -> None:
    """One full pass over :func:`ram_ranges`."""
    send_ranges(writer, ram_ranges(m, ignored), stable=stable)


def send_ranges(
    writer: StreamWriter, ranges: Iterable[tuple[int, HostMemory, int, int]], *, stable: bool
) -> None:
    """Send ``(block index, memory, offset, length)`` ranges (see :func:`ram_ranges`)."""
    sources: dict[int, RamSource] = {}

    def with_sources() -> Iterator[tuple[int, RamSource, int, int]]:
        for index, memory, offset, length in ranges:
            src = sources.get(index)
            if src is None:
                src = sources[index] = RamSource.of_memory(memory)
            yield index, src, offset, length

    writer.write_ram_ranges(with_sources(), stable=stable)


Section = tuple[RecordType, str, bytes, int]


def completion_sections(
    m: Machine,
    *,
    states: Mapping[str, tuple[int, bytes]] | None = None,
    virtio: Mapping[str, bytes] | None = None,
) -> list[Section]:
    """Every virtio-mem device's late state (``virtio`` by section name: its transport's
    state) and the STATE sections (name -> ``(version, bytes)``), as ``(type, name, payload,
    version)``: taken from the machine at once, so a command cannot change them halfway."""
    out: list[Section] = []
    for dev in m.virtio_mem_devices:
        name = section_name(dev)
        late = dev.save_late((virtio or {}).get(name, b""))
        out.append((RecordType.LATE, name, encode_late(late), LATE_VERSION))
    for name, (version, data) in (states or {}).items():
        out.append((RecordType.STATE, name, data, version))
    return out


def write_end(writer: StreamWriter, sections: Iterable[Section]) -> None:
    """The :func:`completion_sections`, then END."""
    for kind, name, payload, version in sections:
        writer.write_section(kind, name, payload, version)
    writer.write_end()


def write_completion(
    m: Machine,
    writer: StreamWriter,
    *,
    states: Mapping[str, tuple[int, bytes]] | None = None,
    virtio: Mapping[str, bytes] | None = None,
) -> None:
    """The late states and STATE sections (:func:`completion_sections`), END."""
    write_end(writer, completion_sections(m, states=states, virtio=virtio))


def save_machine(
    m: Machine,
    writer: StreamWriter,
    *,
    states: Mapping[str, tuple[int, bytes]] | None = None,
    virtio: Mapping[str, bytes] | None = None,
    stable: bool = True,
    ignored: Set[str] = frozenset(),
) -> StreamStats:
    """A whole stopped machine in one stream (snapshot, or a stop-and-copy migration).

    ``stable`` (the default) means nothing writes guest memory meanwhile (vCPUs stopped), so
    pages are sent zero-copy. The virtio-mem devices are kept busy while saving. ``ignored``
    blocks are handed over by fd (see :func:`shared_blocks`), not sent.
    """
    devices = m.virtio_mem_devices
    was_busy = [d.busy for d in devices]
    for d in devices:
        d.busy = True
    try:
        write_setup(m, writer, ignored)
        write_ram(m, writer, stable=stable, ignored=ignored)
        write_completion(m, writer, states=states, virtio=virtio)
    finally:
        for d, busy in zip(devices, was_busy, strict=True):
            d.busy = busy
    return writer.stats


@dataclass
class LoadedMachine:
    """What a load brought besides memory and device state: the STATE sections (name ->
    ``(version, bytes)``), each device's virtio state (by section name), the stream's stats."""

    states: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    virtio: dict[str, bytes] = field(default_factory=dict)
    stats: StreamStats = field(default_factory=StreamStats)


_UNKNOWN_SECTION = (
    "Unknown savevm section or instance '{}' 0. Make sure that your current VM setup matches "
    "your saved VM setup, including any hotplugged devices"
)


def check_machine(m: Machine, config: Mapping[str, Any]) -> None:
    """The destination's machine against the source's CONFIG (RAM blocks are checked later,
    by :func:`ram_targets`, so that a device's own sanity messages come first, as in QEMU)."""
    theirs = config.get("machine")
    if not isinstance(theirs, dict):
        raise MigrationError("the CONFIG section has no machine description")
    lay = m.layout
    ours = (lay.device_memory_base, lay.device_memory_size)
    src = (theirs.get("device_memory_base"), theirs.get("device_memory_size"))
    if src != ours:
        raise MigrationError(
            f"the device memory area changed from {_area(src)} to {_area(ours)} (the destination "
            "needs the source's -m and maxmem)"
        )
    devices = config.get("devices")
    if not isinstance(devices, list):
        raise MigrationError("the CONFIG section has no device list")
    ours_sections = {section_name(d) for d in m.virtio_mem_devices}
    for entry in devices:
        section = entry.get("section") if isinstance(entry, dict) else None
        if section is not None and section not in ours_sections:
            raise MigrationError(_UNKNOWN_SECTION.format(section))


def _area(area: tuple[Any, Any]) -> str:
    base, size = area
    if not isinstance(base, int) or not isinstance(size, int):
        return "(unknown)"
    return f"[0x{base:x}, +0x{size:x})"


def ram_targets(m: Machine, config: Mapping[str, Any]) -> dict[int, RamTarget]:
    """Map the source's RAM blocks (by index) to this machine's, with QEMU's messages."""
    blocks = config.get("ram_blocks")
    if not isinstance(blocks, list):
        raise MigrationError("the CONFIG section has no RAM block list")
    ours = dict(ram_blocks(m))
    targets: dict[int, RamTarget] = {}
    for index, entry in enumerate(blocks):
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise MigrationError(f"the CONFIG section's RAM block #{index} is malformed")
        block_id = entry["id"]
        block = ours.get(block_id)
        if block is None:
            raise MigrationError(f'Unknown ramblock "{block_id}", cannot accept migration')
        if entry.get("size") != block.size:
            raise MigrationError(
                f"Length mismatch: {block_id}: 0x{entry.get('size', 0):x} in != 0x{block.size:x}"
            )
        if entry.get("page_size") != block.page_size:
            raise MigrationError(
                f"Mismatched RAM page size {block_id} (local) {block.page_size} != "
                f"{entry.get('page_size')}"
            )
        if not entry.get("ignored"):
            targets[index] = RamTarget.of_memory(_host_memory(block_id, block))
    return targets


def ignored_blocks(config: Mapping[str, Any]) -> list[str]:
    """The ids of the blocks a CONFIG section hands over by fd, in ``ram_blocks`` order."""
    blocks = config.get("ram_blocks")
    if not isinstance(blocks, list):
        raise MigrationError("the CONFIG section has no RAM block list")
    return [b["id"] for b in blocks if isinstance(b, dict) and b.get("ignored")]


class MachineLoader:
    """A load of one stream into a destination machine, in two halves (see the module
    docstring): :meth:`next_record` reads (RAM goes straight into memory) and returns the next
    section or END; :meth:`apply` takes it into the machine and says whether it was END;
    :meth:`finish` checks that every device had its state. On any error call :meth:`cancel`.
    """

    def __init__(self, m: Machine, reader: StreamReader) -> None:
        self.m = m
        self.reader = reader
        self.out = LoadedMachine(stats=reader.stats)
        self._devices = {section_name(d): d for d in m.virtio_mem_devices}
        self._early: set[str] = set()
        self._late: set[str] = set()
        self._config: dict[str, Any] | None = None
        self._ignored: set[str] = set()
        self._ram_ready = False
        self._aborted = False
        self._handlers: dict[RecordType, Callable[[SectionRecord], None]] = {
            RecordType.CONFIG: self._on_config,
            RecordType.EARLY: self._on_early,
            RecordType.LATE: self._on_late,
            RecordType.STATE: self._on_state,
        }

    # -- reading (may run off the machine's thread)

    def next_record(self) -> SectionRecord | EndRecord:
        """Read until the next section or END; RAM records are applied on the way."""
        reader = self.reader
        if reader.header is None:
            reader.read_header()
        while True:
            if self._aborted:
                raise MigrationError("the migration load was aborted")
            if not self._ram_ready and self._config is not None and reader.next_is_ram():
                self._ensure_ram()
            record = reader.read_record()
            if not isinstance(record, RamRecord):
                return record

    def abort(self) -> None:
        """Make :meth:`next_record` (in another thread) stop at the next record."""
        self._aborted = True

    def _ensure_ram(self) -> None:
        if not self._ram_ready:
            assert self._config is not None
            self.reader.set_ram_targets(ram_targets(self.m, self._config))
            self._ram_ready = True

    # -- applying (where the machine changes)

    def apply(self, record: SectionRecord | EndRecord) -> bool:
        """Take ``record`` into the machine; True once it was END."""
        if isinstance(record, EndRecord):
            return True
        self._handlers[record.type](record)
        return False

    def _device(self, record: SectionRecord, version: int) -> VirtioMem:
        dev = self._devices.get(record.name)
        if dev is None:
            raise MigrationError(_UNKNOWN_SECTION.format(record.name))
        if record.version != version:
            raise MigrationError(
                f"section '{record.name}' has version {record.version}, this build reads "
                f"version {version}"
            )
        return dev

    def _on_config(self, record: SectionRecord) -> None:
        if record.version != CONFIG_VERSION:
            raise MigrationError(
                f"section 'config' has version {record.version}, this build reads version "
                f"{CONFIG_VERSION}"
            )
        config = decode_config(record.payload)
        check_machine(self.m, config)
        self._config = config
        self._adopt(ignored_blocks(config))

    def _adopt(self, ignored: list[str]) -> None:
        """Map the memory the source handed over (its fds came with CONFIG) in place of ours."""
        source = self.reader.source
        fds = source.take_fds() if isinstance(source, SocketSource) else []
        try:
            if len(fds) != len(ignored):
                raise MigrationError(
                    f"the source hands over {len(ignored)} shared RAM block(s) "
                    f"({', '.join(ignored) or 'none'}) but {len(fds)} file descriptor(s) came "
                    "(x-ignore-shared needs a unix: socket)"
                )
            ours = dict(ram_blocks(self.m))
            assert self._config is not None
            if ignored:
                ram_targets(self.m, self._config)  # QEMU's ramblock messages before adopting
            for block_id, fd in zip(ignored, list(fds), strict=True):
                memory = _host_memory(block_id, ours[block_id])
                try:
                    memory.adopt(fd)
                except MemslotsError as exc:
                    raise MigrationError(f"x-ignore-shared: {exc}") from exc
                fds.remove(fd)
                self._ignored.add(block_id)
        finally:
            for fd in fds:
                os.close(fd)
        if self._ignored:
            for consumer in self.m.budget.vhost_backends:
                if isinstance(consumer, VhostUserConsumer):
                    consumer.refresh_fds()

    @property
    def setup_loaded(self) -> bool:
        """CONFIG and every device's early state are in: the memslots that hold plugged
        memory are mapped, and what is left is RAM and the states the switch-over sends."""
        return self._config is not None and self._early == set(self._devices)

    def _on_early(self, record: SectionRecord) -> None:
        dev = self._device(record, EARLY_VERSION)
        if record.name in self._early:
            raise MigrationError(f"section '{record.name}': a second early state")
        dev.load_early(decode_early(record.payload, record.name))
        self._early.add(record.name)

    def _on_late(self, record: SectionRecord) -> None:
        self._ensure_ram()
        dev = self._device(record, LATE_VERSION)
        if record.name not in self._early or record.name in self._late:
            raise MigrationError(f"section '{record.name}': late state without early state")
        state = decode_late(record.payload, record.name)
        dev.load_late(state, discard_unplugged=not self._is_ignored(dev))
        self.out.virtio[record.name] = state.virtio
        self._late.add(record.name)

    def _on_state(self, record: SectionRecord) -> None:
        self._ensure_ram()
        if record.name in self.out.states:
            raise MigrationError(f"STATE section '{record.name}' appears twice")
        self.out.states[record.name] = (record.version, record.payload)

    def _is_ignored(self, dev: VirtioMem) -> bool:
        return dev.memdev is not None and dev.memdev.id in self._ignored

    def finish(self) -> LoadedMachine:
        """After END: every device of this machine must have had its state."""
        if self._config is None:
            raise MigrationError("the stream ended before its CONFIG section")
        self._ensure_ram()
        missing = sorted(set(self._devices) - self._late)
        if missing:
            raise MigrationError(
                f"the stream has no state for {', '.join(missing)}: the source has no such "
                "device (the destination needs the source's command line)"
            )
        return self.out

    def cancel(self) -> None:
        """Undo what the load did to the devices (memory handed over is left alone: it is
        the source's)."""
        for name in self._early:
            dev = self._devices[name]
            dev.cancel_incoming(discard=not self._is_ignored(dev))
        source = self.reader.source
        if isinstance(source, SocketSource):
            source.close_fds()


def load_machine(m: Machine, reader: StreamReader) -> LoadedMachine:
    """Load a stream into a destination machine (see the module docstring)."""
    loader = MachineLoader(m, reader)
    try:
        while not loader.apply(loader.next_record()):
            pass
        return loader.finish()
    except BaseException as exc:
        loader.cancel()
        if isinstance(exc, MemslotsError) and not isinstance(exc, MigrationError):
            raise MigrationError(f"migration load failed: {exc}") from exc
        raise


def ram_digest(m: Machine) -> dict[str, str]:
    """XXH3-64 of the memory a migration carries, by RAM block: for virtio-mem backends the
    plugged blocks only, in order (unplugged memory is never compared). Holes of shared
    fd-backed memory count as zeros without being read (reading would allocate them)."""
    out: dict[str, str] = {}
    names = [block_id for block_id, _ in ram_blocks(m)]
    hashers: dict[int, xxhash.xxh3_64] = {}
    zeros = bytes(1 << 20)
    for index, memory, offset, length in ram_ranges(m):
        h = hashers.setdefault(index, xxhash.xxh3_64())
        src = RamSource.of_memory(memory)
        extents = src.holes(offset, length) if src.holes is not None else [(offset, length, False)]
        for start, size, hole in extents:
            if not hole:
                h.update(src.view[start : start + size])
                continue
            while size:
                n = min(size, len(zeros))
                h.update(zeros[:n])
                size -= n
    for index, h in hashers.items():
        out[names[index]] = f"{h.intdigest():016x}"
    return out
