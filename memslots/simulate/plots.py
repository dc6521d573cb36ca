"""Plots of a simulation (matplotlib, an optional dependency): PNG and SVG side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memslots.errors import HostMissingError
from memslots.host.kmem import CGROUP, SYSTEM
from memslots.simulate.run import SimResult

GiB_F = float(1 << 30)


def measured_label(source: str | None) -> str:
    """Where measured points come from, as a legend says it."""
    if source == SYSTEM:
        return "system-wide VmallocUsed, may include other processes"
    return "per-VM cgroup" if source == CGROUP else "unknown source"


MiB_F = float(1 << 20)


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise HostMissingError("plots need matplotlib: pip install 'memslots[plot]'") from exc
    return plt


def write_plots(results: Sequence[SimResult], out_dir: Path, stem: str = "simulate") -> list[Path]:
    """Write the three figures for ``results`` (one or more strategies); return the files.

    The memslot map is drawn from the steps that recorded one (``run_simulation``'s
    ``memslot_maps``).
    """
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        for ext in ("png", "svg"):
            path = out_dir / f"{stem}-{name}.{ext}"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            written.append(path)
        plt.close(fig)

    # 1. requested vs plugged over time
    fig, ax = plt.subplots(figsize=(8, 4))
    first = results[0]
    times = [s.time for s in first.steps]
    ax.step(
        times,
        [s.requested / GiB_F for s in first.steps],
        where="post",
        label="requested",
        color="black",
        linestyle="--",
    )
    for r in results:
        ax.step(
            [s.time for s in r.steps],
            [s.plugged / GiB_F for s in r.steps],
            where="post",
            label=f"plugged ({r.strategy})",
        )
    ax.set_xlabel("time (s)")
    ax.set_ylabel("GiB")
    ax.set_title("Requested vs plugged")
    ax.legend()
    save(fig, "sizes")

    # 2. memslot map over time, one panel per strategy
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        grid = [
            [1.0 if m else 0.0 for m in s.memslot_map] for s in r.steps if s.memslot_map is not None
        ]
        columns = list(map(list, zip(*grid, strict=True))) if grid else [[0.0]]
        ax.imshow(
            columns,
            aspect="auto",
            origin="lower",
            cmap="Greens",
            vmin=0,
            vmax=1,
            interpolation="nearest",
        )
        ax.set_title(f"memslots mapped ({r.strategy})")
        ax.set_xlabel("trace step")
        ax.set_ylabel("memslot index")
    save(fig, "memslots")

    # 3. kernel metadata: single vs each strategy vs ideal
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.step(
        times,
        [s.single_metadata_bytes / MiB_F for s in first.steps],
        where="post",
        label="one memslot",
        color="tab:red",
    )
    for r in results:
        ax.step(
            [s.time for s in r.steps],
            [s.kernel_metadata_bytes / MiB_F for s in r.steps],
            where="post",
            label=f"{r.strategy} (model)",
        )
        measured = [s.kernel_metadata_measured for s in r.steps]
        if all(m is not None for m in measured):
            source = r.steps[0].kernel_metadata_source if r.steps else None
            ax.plot(
                [s.time for s in r.steps],
                [float(m or 0) / MiB_F for m in measured],
                "o",
                markersize=3,
                label=f"{r.strategy} (measured, {measured_label(source)})",
            )
    ax.step(
        times,
        [s.ideal_metadata_bytes / MiB_F for s in first.steps],
        where="post",
        label="ideal (plugged memory only)",
        color="gray",
        linestyle=":",
    )
    ax.set_xlabel("time (s)")
    ax.set_ylabel("KVM metadata (MiB)")
    ax.set_yscale("symlog")
    ax.set_title("Kernel metadata")
    ax.legend()
    save(fig, "metadata")
    return written
