"""virtio-mem: the wire format (``wire``, what a guest driver sees) and the device (``device``).

Nothing is imported here, so that importing ``wire`` does not load the device.
"""
