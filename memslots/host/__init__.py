"""The host: libc calls through ctypes, host memory backends, page sizes."""
