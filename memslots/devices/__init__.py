"""Memory devices: the MemoryDevice interface, the device-memory area, the memslot budget (every
rule about memslots), virtio-mem, pc-dimm, and vhost-user devices."""
