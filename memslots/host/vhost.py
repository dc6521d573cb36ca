"""What the host's vhost module offers, read as QEMU reads it: ``/dev/vhost-net`` and
vhost-kernel's memslot limit (the ``max_mem_regions`` module parameter).

Read once, by :func:`memslots.kvm.host.detect_host`; :mod:`memslots.vhost.kernel` is given the
values.
"""

from __future__ import annotations

import logging
import re

log = logging.getLogger("memslots.host.vhost")

#: The vhost module parameter QEMU reads for vhost-kernel's limit.
MAX_MEM_REGIONS_PATH = "/sys/module/vhost/parameters/max_mem_regions"
#: QEMU's (and the module's) default when the parameter can't be read or parsed.
VHOST_KERNEL_DEFAULT_LIMIT = 64
#: The vhost-kernel device QEMU opens for ``-netdev tap,vhost=on``.
VHOST_NET_PATH = "/dev/vhost-net"


_STRTOULL_DEC = re.compile(r"[ \t\n\v\f\r]*([+-]?)([0-9]+)")


def parse_max_mem_regions(text: str) -> int | None:
    """The vhost module's ``max_mem_regions`` as QEMU reads it; None if QEMU would ignore it.

    QEMU parses with ``strtoull`` in base 10 (leading blanks and a sign allowed, anything after
    the digits ignored, a minus sign negating modulo 2^64) and rejects no digits, 0 and
    overflow. The value then becomes QEMU's ``int`` limit, so it wraps to 32 bits as in C.
    """
    m = _STRTOULL_DEC.match(text)
    if m is None:
        return None
    value = int(m.group(2))
    if value == 0 or value >= 1 << 64:
        return None
    if m.group(1) == "-":
        value = -value & ((1 << 64) - 1)
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def vhost_kernel_memslots_limit(path: str = MAX_MEM_REGIONS_PATH) -> int:
    """vhost-kernel's memslot limit: the module parameter, else 64 (QEMU's rules).

    A missing or unreadable file silently gives 64; an invalid value gives 64 and QEMU's
    message on logger ``memslots.host.vhost``.
    """
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return VHOST_KERNEL_DEFAULT_LIMIT
    value = parse_max_mem_regions(text)
    if value is None:
        log.warning("ignoring invalid max_mem_regions value in vhost module: %s", text.rstrip())
        return VHOST_KERNEL_DEFAULT_LIMIT
    return value
