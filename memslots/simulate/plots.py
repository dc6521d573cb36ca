"""Plots of a simulation (matplotlib, an optional dependency): PNG and SVG side by side."""

from __future__ import annotations

import shlex
import sys
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


#: The matplotlib the ``plot`` extra names (pyproject.toml).
MATPLOTLIB = "matplotlib>=3.8"


def install_command() -> str:
    """The one command that adds plots to this installation, whatever installed it."""
    return f"{shlex.quote(sys.executable)} -m pip install '{MATPLOTLIB}'"


def require_matplotlib() -> None:
    """Raise :class:`HostMissingError` naming :func:`install_command` if plots cannot be made;
    front-ends call it before they run anything, so that no result is lost."""
    _pyplot()


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise HostMissingError(
            f"plots need matplotlib, which this installation lacks; add it with: "
            f"{install_command()}"
        ) from exc
    return plt


#: One colour per strategy, the same in every figure; none of them is a reference line's
#: (requested: black, one memslot: red, ideal: gray).
STRATEGY_COLOURS = (
    "tab:blue",
    "tab:orange",
    "tab:green",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
)
UNMAPPED_COLOUR = "whitesmoke"


def strategy_colour(index: int) -> str:
    """The colour of the ``index``-th strategy (colours repeat only past eight strategies)."""
    return STRATEGY_COLOURS[index % len(STRATEGY_COLOURS)]


def _width(index: int, count: int) -> float:
    # Earlier strategies wider, so that series that coincide still show each colour.
    return 1.0 + 2.0 * (count - 1 - index) / max(1, count - 1)


def figures(results: Sequence[SimResult]) -> dict[str, Any]:
    """The three figures for ``results`` (one or more strategies), by name: ``sizes``,
    ``memslots`` and ``metadata``."""
    plt = _pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    first = results[0]
    times = [s.time for s in first.steps]

    # 1. requested vs plugged over time
    sizes, ax = plt.subplots(figsize=(8, 4))
    ax.step(
        times,
        [s.requested / GiB_F for s in first.steps],
        where="post",
        label="requested",
        color="black",
        linestyle="--",
    )
    for i, r in enumerate(results):
        ax.step(
            [s.time for s in r.steps],
            [s.plugged / GiB_F for s in r.steps],
            where="post",
            label=f"plugged ({r.strategy})",
            color=strategy_colour(i),
            linewidth=_width(i, len(results)),
        )
    ax.set_xlabel("time (s)")
    ax.set_ylabel("GiB")
    ax.set_title("Requested vs plugged")
    ax.legend()

    # 2. memslot map over time, one panel per strategy, in the strategy's colour
    memslots, axes = plt.subplots(
        1, len(results), figsize=(4 * len(results), 4), squeeze=False, layout="constrained"
    )
    for i, (ax, r) in enumerate(zip(axes[0], results, strict=True)):
        grid = [
            [1.0 if m else 0.0 for m in s.memslot_map] for s in r.steps if s.memslot_map is not None
        ]
        columns = list(map(list, zip(*grid, strict=True))) if grid else [[0.0]]
        ax.imshow(
            columns,
            aspect="auto",
            origin="lower",
            cmap=ListedColormap([UNMAPPED_COLOUR, strategy_colour(i)]),
            vmin=0,
            vmax=1,
            interpolation="nearest",
        )
        ax.set_title(f"memslots mapped ({r.strategy})")
        ax.set_xlabel("trace step")
        ax.set_ylabel("memslot index")
        # Steps and memslots are counted: no tick between two of them.
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.legend(
            handles=[
                Patch(facecolor=strategy_colour(i), edgecolor="gray", label="mapped"),
                Patch(facecolor=UNMAPPED_COLOUR, edgecolor="gray", label="not mapped"),
            ],
            loc="upper right",
            fontsize="small",
        )

    # 3. kernel metadata: single vs each strategy vs ideal
    metadata, ax = plt.subplots(figsize=(8, 4))
    ax.step(
        times,
        [s.single_metadata_bytes / MiB_F for s in first.steps],
        where="post",
        label="one memslot",
        color="tab:red",
        linestyle="--",
        zorder=3,  # dashed on top: the single strategy's own line runs beneath it
    )
    for i, r in enumerate(results):
        ax.step(
            [s.time for s in r.steps],
            [s.kernel_metadata_bytes / MiB_F for s in r.steps],
            where="post",
            label=f"{r.strategy} (model)",
            color=strategy_colour(i),
            linewidth=_width(i, len(results)),
        )
        measured = [s.kernel_metadata_measured for s in r.steps]
        if all(m is not None for m in measured):
            source = r.steps[0].kernel_metadata_source if r.steps else None
            ax.plot(
                [s.time for s in r.steps],
                [float(m or 0) / MiB_F for m in measured],
                "o",
                markersize=3,
                color=strategy_colour(i),
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
    return {"sizes": sizes, "memslots": memslots, "metadata": metadata}


def write_plots(results: Sequence[SimResult], out_dir: Path, stem: str = "simulate") -> list[Path]:
    """Write the figures for ``results`` as PNG and SVG; return the files."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name, fig in figures(results).items():
        for ext in ("png", "svg"):
            path = out_dir / f"{stem}-{name}.{ext}"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            written.append(path)
        plt.close(fig)
    return written
