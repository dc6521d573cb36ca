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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from memslots.devices.memory_device import MemoryDevice
from memslots.devices.virtio_mem.device import VirtioMem
from memslots.errors import MemslotsError, MigrationError
from memslots.host.memory import HostMemory
from memslots.machine.machine import Machine
from memslots.memory.address_space import RamBlock
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


def describe_machine(m: Machine) -> dict[str, Any]:
    """The CONFIG section: what a destination checks its own machine against."""
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
            }
            for block_id, block in ram_blocks(m)
        ],
        "devices": devices,
    }


def _host_memory(block_id: str, block: RamBlock) -> HostMemory:
    if not isinstance(block, HostMemory) or block.closed:
        raise MigrationError(f"RAM block '{block_id}' has no host memory (a planned machine?)")
    return block


def ram_ranges(m: Machine) -> list[tuple[int, HostMemory, int, int]]:
    """What a full pass sends: ``(block index, memory, offset, length)`` -- boot RAM whole,
    virtio-mem backends' plugged blocks only (QEMU skips discarded ranges), others whole."""
    users = {d.memdev.id: d for d in m.virtio_mem_devices if d.memdev is not None}
    out: list[tuple[int, HostMemory, int, int]] = []
    for index, (block_id, block) in enumerate(ram_blocks(m)):
        memory = _host_memory(block_id, block)
        dev = users.get(block_id) if block_id != BOOT_RAM_ID else None
        if dev is None:
            out.append((index, memory, 0, memory.size))
            continue
        bs = dev.block_size
        out += [(index, memory, f * bs, n * bs) for f, n in dev.plugged_ranges()]
    return out


def write_setup(m: Machine, writer: StreamWriter) -> None:
    """Header, CONFIG and every virtio-mem device's early state."""
    writer.write_header()
    writer.write_section(
        RecordType.CONFIG, "config", encode_config(describe_machine(m)), CONFIG_VERSION
    )
    for dev in m.virtio_mem_devices:
        writer.write_section(
            RecordType.EARLY, section_name(dev), encode_early(dev.save_early()), EARLY_VERSION
        )


def write_ram(m: Machine, writer: StreamWriter, *, stable: bool) -> None:
    """One full pass over :func:`ram_ranges`."""
    sources: dict[int, RamSource] = {}
    for index, memory, offset, length in ram_ranges(m):
        src = sources.get(index)
        if src is None:
            src = sources[index] = RamSource.of_memory(memory)
        writer.write_ram(index, src, offset, length, stable=stable)


def write_completion(
    m: Machine,
    writer: StreamWriter,
    *,
    states: Mapping[str, tuple[int, bytes]] | None = None,
    virtio: Mapping[str, bytes] | None = None,
) -> None:
    """Every virtio-mem device's late state (``virtio`` by section name: its transport's
    state), the STATE sections (name -> ``(version, bytes)``), END."""
    for dev in m.virtio_mem_devices:
        name = section_name(dev)
        late = dev.save_late((virtio or {}).get(name, b""))
        writer.write_section(RecordType.LATE, name, encode_late(late), LATE_VERSION)
    for name, (version, data) in (states or {}).items():
        writer.write_section(RecordType.STATE, name, data, version)
    writer.write_end()


def save_machine(
    m: Machine,
    writer: StreamWriter,
    *,
    states: Mapping[str, tuple[int, bytes]] | None = None,
    virtio: Mapping[str, bytes] | None = None,
    stable: bool = True,
) -> StreamStats:
    """A whole stopped machine in one stream (snapshot, or a stop-and-copy migration).

    ``stable`` (the default) means nothing writes guest memory meanwhile (vCPUs stopped), so
    pages are sent zero-copy. The virtio-mem devices are kept busy while saving.
    """
    devices = m.virtio_mem_devices
    was_busy = [d.busy for d in devices]
    for d in devices:
        d.busy = True
    try:
        write_setup(m, writer)
        write_ram(m, writer, stable=stable)
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
        targets[index] = RamTarget.of_memory(_host_memory(block_id, block))
    return targets


def load_machine(m: Machine, reader: StreamReader) -> LoadedMachine:
    """Load a stream into a destination machine (see the module docstring)."""
    out = LoadedMachine(stats=reader.stats)
    devices = {section_name(d): d for d in m.virtio_mem_devices}
    early: set[str] = set()
    late: set[str] = set()
    config: dict[str, Any] = {}
    ram_ready = False

    def ensure_ram() -> None:
        nonlocal ram_ready
        if not ram_ready:
            reader.set_ram_targets(ram_targets(m, config))
            ram_ready = True

    def device(record: SectionRecord, version: int) -> VirtioMem:
        dev = devices.get(record.name)
        if dev is None:
            raise MigrationError(_UNKNOWN_SECTION.format(record.name))
        if record.version != version:
            raise MigrationError(
                f"section '{record.name}' has version {record.version}, this build reads "
                f"version {version}"
            )
        return dev

    try:
        reader.read_header()
        first = reader.read_record()
        assert isinstance(first, SectionRecord)  # the reader makes CONFIG come first
        config = decode_config(first.payload)
        check_machine(m, config)
        handlers: dict[RecordType, Callable[[SectionRecord], None]] = {}

        def on_early(record: SectionRecord) -> None:
            dev = device(record, EARLY_VERSION)
            if record.name in early:
                raise MigrationError(f"section '{record.name}': a second early state")
            dev.load_early(decode_early(record.payload, record.name))
            early.add(record.name)

        def on_late(record: SectionRecord) -> None:
            ensure_ram()
            dev = device(record, LATE_VERSION)
            if record.name not in early or record.name in late:
                raise MigrationError(f"section '{record.name}': late state without early state")
            state = decode_late(record.payload, record.name)
            dev.load_late(state)
            out.virtio[record.name] = state.virtio
            late.add(record.name)

        def on_state(record: SectionRecord) -> None:
            ensure_ram()
            if record.name in out.states:
                raise MigrationError(f"STATE section '{record.name}' appears twice")
            out.states[record.name] = (record.version, record.payload)

        handlers[RecordType.EARLY] = on_early
        handlers[RecordType.LATE] = on_late
        handlers[RecordType.STATE] = on_state
        while True:
            if not ram_ready and reader.next_is_ram():
                ensure_ram()
            record = reader.read_record()
            if isinstance(record, EndRecord):
                break
            if isinstance(record, RamRecord):
                continue
            handlers[record.type](record)
        ensure_ram()
        missing = sorted(set(devices) - late)
        if missing:
            raise MigrationError(
                f"the stream has no state for {', '.join(missing)}: the source has no such "
                "device (the destination needs the source's command line)"
            )
    except BaseException as exc:
        for name in early:
            devices[name].cancel_incoming()
        if isinstance(exc, MemslotsError) and not isinstance(exc, MigrationError):
            raise MigrationError(f"migration load failed: {exc}") from exc
        raise
    return out
