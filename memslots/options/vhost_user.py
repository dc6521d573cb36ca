"""vhost-user options: ``-chardev socket`` and ``-device vhost-user-blk|fs[-pci]``, with QEMU's
realize checks that need no machine, in QEMU's order and words."""

from __future__ import annotations

from dataclasses import dataclass

from memslots.errors import OptionError
from memslots.options.grammar import Props, split_option_string

VHOST_USER_BLK_DRIVERS = ("vhost-user-blk", "vhost-user-blk-pci")
VHOST_USER_FS_DRIVERS = ("vhost-user-fs", "vhost-user-fs-pci")
VHOST_USER_DRIVERS = VHOST_USER_BLK_DRIVERS + VHOST_USER_FS_DRIVERS
MEMSLOT_ACCOUNTING = ("qemu", "precise")
#: sizeof(virtio_fs_config.tag).
FS_TAG_MAX = 36


@dataclass(frozen=True)
class ChardevOptions:
    """``-chardev socket,id=…,path=…``: a Unix socket we connect to as the client."""

    id: str
    path: str


def parse_chardev(text: str) -> ChardevOptions:
    """Parse ``-chardev socket,id=ID,path=PATH[,server=off]``."""
    props = Props("-chardev", text, split_option_string(text, "backend"))
    backend = props.require_str("backend")
    if backend != "socket":
        raise OptionError(
            f"-chardev {text}: unsupported chardev backend '{backend}' (supported: socket)"
        )
    chardev_id = props.pop_id(required=True)
    assert chardev_id is not None
    if "host" in props.values or "port" in props.values:
        raise OptionError(
            f"-chardev {text}: only Unix sockets are supported: use 'path' instead of "
            "'host' and 'port'"
        )
    path = props.require_str("path")
    if props.pop_bool("server", False):
        raise OptionError(
            f"-chardev {text}: 'server=on' is not supported: memslots connects to the "
            "vhost-user back-end as a client"
        )
    props.finish(("backend", "id", "path", "server"))
    return ChardevOptions(id=chardev_id, path=path)


@dataclass(frozen=True)
class VhostUserDeviceOptions:
    """``-device vhost-user-blk[-pci]|vhost-user-fs[-pci],chardev=…``.

    ``memslot_accounting`` is our extension: "qemu" (default) or "precise" (see
    :mod:`memslots.devices.budget`).
    """

    driver: str
    id: str | None
    chardev: str
    tag: str | None = None
    memslot_accounting: str = "qemu"

    @property
    def is_blk(self) -> bool:
        """True for vhost-user-blk."""
        return self.driver in VHOST_USER_BLK_DRIVERS

    @property
    def precise(self) -> bool:
        """True for precise memslot accounting."""
        return self.memslot_accounting == "precise"


def parse_vhost_user_device(text: str) -> VhostUserDeviceOptions:
    """Parse ``-device vhost-user-blk[-pci],chardev=…[,id=…][,memslot-accounting=…]`` or
    ``-device vhost-user-fs[-pci],chardev=…,tag=…[,id=…][,memslot-accounting=…]``."""
    props = Props("-device", text, split_option_string(text, "driver"))
    driver = props.require_str("driver")
    if driver not in VHOST_USER_DRIVERS:
        raise OptionError(
            f"-device {text}: unsupported device '{driver}' "
            f"(supported: {', '.join(VHOST_USER_DRIVERS)})"
        )
    dev_id = props.pop_id()
    chardev = props.pop_str("chardev")
    accounting = props.pop_choice("memslot-accounting", MEMSLOT_ACCOUNTING, "qemu")
    allowed = ["id", "chardev", "memslot-accounting"]
    tag = None
    if driver in VHOST_USER_FS_DRIVERS:
        tag = props.pop_str("tag")
        allowed.append("tag")
    props.finish(allowed)
    # QEMU's realize checks, in its order and words.
    if not chardev:
        missing = "chardev is mandatory" if driver in VHOST_USER_BLK_DRIVERS else "missing chardev"
        raise OptionError(f"-device {text}: {missing}")
    if driver in VHOST_USER_FS_DRIVERS:
        if tag is None:
            raise OptionError(f"-device {text}: missing tag property")
        if not tag:
            raise OptionError(f"-device {text}: tag property must not be empty")
        try:
            # surrogateescape: the bytes of a command-line word that is not UTF-8.
            tag_bytes = tag.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raise OptionError(f"-device {text}: tag property must be UTF-8 text") from None
        if len(tag_bytes) > FS_TAG_MAX:
            raise OptionError(f"-device {text}: tag property must be {FS_TAG_MAX} bytes or less")
    return VhostUserDeviceOptions(
        driver=driver, id=dev_id, chardev=chardev, tag=tag, memslot_accounting=accounting
    )


def vhost_user_device_from_args(args: dict[str, object]) -> VhostUserDeviceOptions:
    """The same rules for QMP ``device_add`` arguments: they are joined into the command
    line's text (commas escaped), so refusals read as for ``-device``."""
    words = []
    for key, value in args.items():
        text = ("on" if value else "off") if isinstance(value, bool) else str(value)
        words.append(f"{key}={text.replace(',', ',,')}")
    return parse_vhost_user_device(",".join(words))
