"""Memory devices: the memory-device layer, virtio-mem, pc-dimm, and vhost-user devices."""
