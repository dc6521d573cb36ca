"""The guest model over QMP (our ``x-`` extensions): what a test or a benchmark asks of the
guest that a real VM would do by itself.

* ``x-guest-workload {"id", "units", "period"}``: the guest keeps ``units`` of its usable units
  busy, rewriting them every ``period`` seconds (``LinuxGuest.set_workload``): a working set
  that dirties memory while a migration runs. ``units`` 0 stops it.
* ``x-guest-fill {"id", "size"}``: the guest's memory is in use: ``size`` bytes of its usable
  units (those without a pattern) get data (``GuestVm.fill``); returns ``written``.
* ``x-guest-verify {"id"}``: the guest checks every pattern it wrote into its memory (from the
  vCPU on the real kernel); returns ``checked``, every ``violations`` the driver noted so
  far, and ``workload-ticks``.
"""

from __future__ import annotations

from typing import Any, Protocol

from memslots.guest.linux import LinuxGuest
from memslots.machine.runner import MachineRunner
from memslots.machine.vm import GuestVm
from memslots.monitor.qmp_server import Command, Handler, Param, QMPCommandError, QMPServer


class GuestOwner(Protocol):
    """Who holds the guest VM (the runtime)."""

    @property
    def guest(self) -> GuestVm | None:
        """The guest VM, if any yet."""
        ...


class GuestCommands:
    """``x-guest-workload``, ``x-guest-fill`` and ``x-guest-verify``, registered in
    ``server``."""

    def __init__(
        self, owner: GuestOwner, server: QMPServer, *, runner: MachineRunner | None = None
    ) -> None:
        self.owner = owner
        self.runner = runner
        server.register(
            Command(
                "x-guest-workload",
                self._locked(self._workload),
                (Param("id", "str"), Param("units", "int"), Param("period", "number", True)),
            )
        )
        server.register(
            Command("x-guest-verify", self._locked(self._verify), (Param("id", "str"),))
        )
        server.register(
            Command(
                "x-guest-fill",
                self._locked(self._fill),
                (Param("id", "str"), Param("size", "size")),
            )
        )

    def _locked(self, handler: Handler) -> Handler:
        """``handler`` in the runner's worker, holding the machine lock (the guests run in a
        thread of their own)."""
        runner = self.runner
        if runner is None:
            return handler

        async def locked(args: dict[str, Any]) -> object:
            return await runner.run(lambda: handler(args))

        return locked

    def _driver(self, dev_id: str) -> LinuxGuest:
        gvm = self.owner.guest
        driver = gvm.guests.get(dev_id) if gvm is not None else None
        if driver is None:
            raise QMPCommandError(f"no guest driver for device '{dev_id}'", "DeviceNotFound")
        return driver

    def _workload(self, args: dict[str, Any]) -> object:
        driver = self._driver(args["id"])
        units, period = args["units"], float(args.get("period", 0.05))
        if units < 0 or (units and period <= 0):
            raise QMPCommandError("x-guest-workload: units must be >= 0 and period > 0")
        driver.set_workload(units, period)
        return {}

    def _fill(self, args: dict[str, Any]) -> object:
        gvm = self.owner.guest
        self._driver(args["id"])
        assert gvm is not None
        return {"written": gvm.fill(args["id"], args["size"])}

    def _verify(self, args: dict[str, Any]) -> object:
        driver = self._driver(args["id"])
        checked = driver.verify()
        return {
            "checked": checked,
            "violations": list(driver.violations),
            "workload-ticks": driver.workload_ticks,
        }
