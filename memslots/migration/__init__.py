"""Live migration: the stream format, dirty tracking, and device/machine state save and load."""
