"""The virtio transport of virtio-mem: split virtqueues in guest RAM."""
