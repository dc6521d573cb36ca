"""Shared fixtures, the host the tests run on, and the test tiers with every skip guard.

Tiers are markers (registered in pyproject.toml). A test that needs something the host may lack
carries its tier's marker, and :func:`pytest_runtest_setup` skips it here, naming what is
missing:

* ``kvm``: a usable ``/dev/kvm`` (``requires_kvm``);
* ``backend(NAME)``: Debian's real vhost-user back-ends (``requires_qsd``,
  ``requires_virtiofsd``; ``bash scripts/setup.sh --tests`` installs them);
* ``qemu``: the real QEMU (``qemu-system-x86_64``, run on ``/dev/kvm``);
* ``kmem``: kernel memory measured per VM, in a memory cgroup of our own (``requires_memcg``);
* ``slow``: long tests, left out of the default quick run.

``--require-real`` (or ``MEMSLOTS_REQUIRE_REAL=1``) turns a missing prerequisite of the ``kvm``,
``backend`` and ``qemu`` tiers into a failure; ``--run-slow`` (or ``MEMSLOTS_RUN_SLOW=1``) runs the
``slow`` tier. ``.ci/run`` sets both variables (the first only where ``/dev/kvm`` exists), so CI
executes every real-KVM, real-back-end and real-QEMU test and the fuzzer's 10^5 inputs. Guards
for what only some hosts have (``/dev/vhost-net``, ``kvm_pvm``) stay plain skips.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence

import pytest
from backends import QSD, VIRTIOFSD
from kmem_support import Stressor, run_stressor

from memslots.host.kmem import cgroup_unavailable_reason
from memslots.host.vhost import VHOST_NET_PATH
from memslots.kvm.host import HostInfo, host_info
from memslots.kvm.mmu import MmuConfig
from memslots.kvm.model import KvmModel
from memslots.machine.machine import Machine
from memslots.options import parse_machine_config
from memslots.vhost.backend import VhostModel

#: This host, detected once before any test runs (so that no meter ever sees the probe VM).
HOST = host_info()

QEMU = "qemu-system-x86_64"
#: Tiers whose missing prerequisites ``--require-real`` turns into failures.
REAL_TIERS = ("kvm", "backend", "qemu")
_SETUP_HINT = "bash scripts/setup.sh --tests installs it"


def _kvm_missing() -> str | None:
    return None if HOST.kvm else "needs a usable /dev/kvm"


def _backend_missing(name: str) -> str | None:
    if name == "qemu-storage-daemon":
        if not os.access(QSD, os.X_OK):
            return f"needs {QSD} ({_SETUP_HINT}: qemu-system-common)"
        return None
    if name == "virtiofsd":
        if not os.access(VIRTIOFSD, os.X_OK):
            return f"needs {VIRTIOFSD} ({_SETUP_HINT}: qemu-system-common)"
        if os.geteuid() != 0:
            return "needs root, which virtiofsd requires"
        return None
    raise ValueError(f"unknown vhost-user back-end {name!r}")


def _qemu_missing() -> str | None:
    if shutil.which(QEMU) is None:
        return f"needs {QEMU} ({_SETUP_HINT}: qemu-system-x86)"
    return None if HOST.kvm else f"needs a usable /dev/kvm for {QEMU}"


_memcg_missing = cgroup_unavailable_reason()


def _missing(mark: pytest.Mark) -> str | None:
    """Why the host cannot run a test of this tier (None: it can, or not a tier)."""
    if mark.name == "kvm":
        return _kvm_missing()
    if mark.name == "backend":
        return _backend_missing(*mark.args)
    if mark.name == "qemu":
        return _qemu_missing()
    if mark.name == "kmem" and _memcg_missing is not None:
        return f"needs a per-VM memory cgroup: {_memcg_missing}"
    return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("memslots tiers")
    group.addoption(
        "--require-real",
        action="store_true",
        default=_env_flag("MEMSLOTS_REQUIRE_REAL"),
        help="fail (not skip) kvm, backend and qemu tests the host cannot run "
        "[default: MEMSLOTS_REQUIRE_REAL]",
    )
    group.addoption(
        "--run-slow",
        action="store_true",
        default=_env_flag("MEMSLOTS_RUN_SLOW"),
        help="also run the slow tier [default: MEMSLOTS_RUN_SLOW]",
    )


def require(tier: str, require_real: bool, reason: str | None) -> None:
    """Skip for ``reason`` (if any), or fail if ``require_real`` (``--require-real``) covers
    ``tier``."""
    if reason is None:
        return
    if tier in REAL_TIERS and require_real:
        pytest.fail(f"--require-real: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """The one place where tiers are skipped (or, with ``--require-real``, fail)."""
    require_real = bool(item.config.getoption("--require-real"))
    for mark in item.iter_markers():
        require(mark.name, require_real, _missing(mark))
    if item.get_closest_marker("slow") is not None and not item.config.getoption("--run-slow"):
        pytest.skip("slow: run with --run-slow or MEMSLOTS_RUN_SLOW=1 (CI does)")


requires_kvm = pytest.mark.kvm
requires_qsd = pytest.mark.backend("qemu-storage-daemon")
requires_virtiofsd = pytest.mark.backend("virtiofsd")
requires_qemu = pytest.mark.qemu
#: Tests that measure kernel memory per VM: they need a memory cgroup of their own.
requires_memcg = pytest.mark.kmem
slow = pytest.mark.slow
#: Host-specific, never required: a vhost-kernel device, and the host the kvm_pvm facts are of.
requires_vhost_net = pytest.mark.skipif(
    not os.path.exists(VHOST_NET_PATH), reason=f"no {VHOST_NET_PATH} on this host"
)
requires_kvm_pvm = pytest.mark.skipif(
    not os.path.exists("/sys/module/kvm_pvm"), reason="host is not running kvm_pvm"
)


@pytest.fixture
def memslot_stressor(request: pytest.FixtureRequest) -> Iterator[Stressor]:
    """Another process on the host creating and deleting 64 GiB memslots in a loop, on its own
    VM, for the whole test; stopped (and its VM closed) at teardown. Needs /dev/kvm."""
    require("kvm", bool(request.config.getoption("--require-real")), _kvm_missing())
    yield from run_stressor()


PlanFactory = Callable[..., Machine]

#: A fixed host for planning tests, so that they mean the same on every machine: an AMD vCPU
#: with 48 physical address bits (QEMU's rules relocate RAM above 1 TiB for it), shadow paging,
#: 2 MiB THP and huge pages, the vhost module's default limit, no /dev/vhost-net.
AMD_HOST = HostInfo(
    cpu_vendor="amd",
    phys_bits=48,
    mmu=MmuConfig(),
    kvm=False,
    kvm_max_memslots=32764,
    thp_size=2 << 20,
    page_size=4096,
    huge_page_size=2 << 20,
    vhost_kernel_max_mem_regions=64,
    vhost_net=False,
)


@pytest.fixture
def plan_machine() -> Iterator[PlanFactory]:
    """Build planned machines (nothing mapped) on the KVM model; closes them afterwards."""
    made: list[Machine] = []

    def build(
        memory: str,
        objects: Sequence[str] = (),
        devices: Sequence[str] = (),
        *,
        kvm_max: int = 32764,
        kvm_free: int | None = None,
        vhost: tuple[int, int | None, str] | None = None,
        host: HostInfo = AMD_HOST,
        chardevs: Sequence[str] = (),
        vhost_user_limit: int | None = None,
    ) -> Machine:
        config = parse_machine_config(memory, objects, devices, accel="sim", chardevs=chardevs)
        consumers = [VhostModel("vhost0", vhost[0], kind=vhost[2])] if vhost else []

        def describe(m: Machine) -> None:
            if kvm_free is not None:
                m.set_free_memslots(m.kvm, kvm_free, "--kvm-free-memslots")
            if vhost is not None and vhost[1] is not None:
                m.set_free_memslots(consumers[0], vhost[1], "--vhost-free-memslots")

        m = Machine(
            config,
            vm=KvmModel(max_memslots=kvm_max, mmu=MmuConfig()),
            planned=True,
            vhost=list(consumers),
            before_devices=describe,
            host=host,
            vhost_user_limit=vhost_user_limit,
        )
        made.append(m)
        return m

    yield build
    for m in made:
        m.close()
