"""memslots: a VMM memory-device layer that exposes virtio-mem device memory to KVM and
vhost through many small memslots, mapped only while memory in them is plugged."""

from memslots.errors import MemslotsError

__all__ = ["MemslotsError", "__version__"]
__version__ = "0.1.0"
