"""The pc-dimm device: a whole memory backend mapped as one memslot at plug time."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from memslots.devices.memory_device import MemoryDevice, SizeListener
from memslots.devices.qom import QomObject, QomProperty, refuse_after_realize
from memslots.errors import ConfigError
from memslots.memory.address_space import MemoryRegion
from memslots.memory.backends import MemoryBackend
from memslots.options import DimmOptions


class PcDimm(MemoryDevice):
    """QEMU's ``pc-dimm``: costs exactly one memslot, used as soon as it is plugged."""

    info_type = "dimm"

    def __init__(self, opts: DimmOptions, memdev: MemoryBackend | None, *, numa_nodes: int = 0):
        self.opts = opts
        self.id = opts.id
        self.memdev = memdev
        self.addr = opts.addr
        self.node = opts.node
        self.numa_nodes = numa_nodes
        #: The ACPI DIMM slot, assigned by the machine.
        self.slot = -1
        self.realized = False
        #: A DIMM's plugged size never changes while it is plugged: nobody is ever called.
        self.size_change_listeners: list[SizeListener] = []

    def get_memory_region(self) -> MemoryRegion:
        if self.memdev is None:
            raise ConfigError(f"pc-dimm '{self.label}': 'memdev' property must be set")
        return self.memdev.region

    def get_addr(self) -> int:
        return self.addr

    def set_addr(self, addr: int) -> None:
        self.addr = addr

    def get_plugged_size(self) -> int:
        return self.memdev.size if self.memdev is not None and self.realized else 0

    def realize(self) -> None:
        """QEMU's pc-dimm realize checks."""
        if self.memdev is None:
            raise ConfigError(f"pc-dimm '{self.label}': 'memdev' property is not set")
        if self.memdev.used_by is not None:
            raise ConfigError(
                f"pc-dimm '{self.label}': can't use already busy memdev: {self.memdev.id}"
            )
        if (self.numa_nodes and self.node >= self.numa_nodes) or (
            not self.numa_nodes and self.node
        ):
            raise ConfigError(
                f"pc-dimm '{self.label}': 'node' property value {self.node} exceeds the number "
                f"of numa nodes {self.numa_nodes or 1}"
            )
        self.memdev.used_by = self.label
        self.realized = True

    def unrealize(self) -> None:
        """Give the backend back."""
        if self.memdev is not None and self.memdev.used_by == self.label:
            self.memdev.used_by = None
        self.realized = False

    def info(self) -> dict[str, Any]:
        """``{"type": "dimm", "data": PCDIMMDeviceInfo}``, QEMU's fields."""
        assert self.memdev is not None, "a plugged pc-dimm has a memdev"
        data: dict[str, Any] = {} if self.id is None else {"id": self.id}
        data.update(
            {
                "addr": self.addr,
                "size": self.memdev.size,
                "slot": self.slot,
                "node": self.node,
                "memdev": self.memdev.qom_path,
                "hotplugged": self.hotplugged,
                "hotpluggable": True,
            }
        )
        return {"type": "dimm", "data": data}

    def qom_objects(self) -> dict[str, QomObject]:
        """The DIMM's properties."""

        def static(name: str) -> Callable[[object], None]:
            return refuse_after_realize(name, self.id, "pc-dimm")

        memdev = self.memdev
        assert memdev is not None, "a realized pc-dimm has a memdev"
        return {
            "": QomObject(
                "pc-dimm",
                {
                    "type": QomProperty(lambda: "pc-dimm"),
                    "addr": QomProperty(lambda: self.addr, static("addr")),
                    "node": QomProperty(lambda: self.node, static("node")),
                    "slot": QomProperty(lambda: self.slot, static("slot")),
                    "memdev": QomProperty(
                        lambda: memdev.qom_path,
                        refuse_after_realize("memdev", self.id, "pc-dimm", link=True),
                    ),
                    "size": QomProperty(lambda: memdev.size),
                },
            )
        }
