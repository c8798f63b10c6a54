"""Seaborn figures rendered to PNG bytes, byte-identical from one build to the next.

No pyplot (no global state, no GUI): a ``Figure`` on the Agg canvas under matplotlib's default rcParams plus a
fixed theme (a user's matplotlibrc changes nothing), fixed dpi and ``svg.hashsalt``, no PNG "Software" metadata.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Sequence

import matplotlib as mpl
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
RC = {"figure.dpi": DPI, "savefig.dpi": DPI, "svg.hashsalt": "ssl-cluster-bench",
      "font.family": "DejaVu Sans",  # shipped with matplotlib: same glyphs everywhere
      "axes.titlesize": 9, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7, "legend.fontsize": 7}
SERIES_LABELS = {"loss": "training loss / its first-epoch value", "online_knn_top1": "online kNN top-1 (%)"}


def render_png(width: float, height: float, draw: Callable[[Figure], None]) -> bytes:
    """Draw on a fresh Figure under fixed settings and return the PNG bytes (no metadata that changes)."""
    with mpl.rc_context():
        mpl.rcdefaults()
        sns.set_theme(style="whitegrid", context="paper", palette="colorblind", rc=RC)
        fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
        FigureCanvasAgg(fig)
        draw(fig)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def palette_for(methods: Sequence[str]) -> dict[str, tuple]:
    """One colour per row label, the same in every build whatever else is in the report: seaborn's "tab20"
    palette indexed by a stable hash (md5) of the label itself, not by its position among the labels."""
    colors = sns.color_palette("tab20", 20)
    return {name: tuple(colors[int(hashlib.md5(name.encode()).hexdigest(), 16) % len(colors)])
            for name in sorted(set(methods))}


STATUS_MARKERS = {"best": ("D", True), "worse": ("o", True), "tied": ("o", False), "untestable": ("x", True)}


def difference_plot(points: pd.DataFrame, columns: Sequence[str], rows: Sequence[str], title: str,
                    palette: dict[str, tuple] | None = None) -> bytes:
    """One panel per column, `rows` in that order: each row's difference to the column's best with the interval of
    the table's test (its reading: templates/text.yaml), marker by ``STATUS_MARKERS``. `points`: `column`, `row`,
    `value` (row − best), `low`, `high`, `status`. Hand-drawn lines: the intervals come from the test, not data."""
    columns = [c for c in columns if c in set(points["column"])]
    ncols = min(3, len(columns))
    nrows = math.ceil(len(columns) / ncols)
    height = max(1.6, 0.28 * len(rows) + 0.9)

    def draw(fig: Figure) -> None:
        axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
        for ax, column in zip(axes.flat, columns):
            mine = points[points["column"] == column]
            ax.axvline(0.0, color=(0.3, 0.3, 0.3), linewidth=0.8, linestyle="--")
            for p in mine.itertuples(index=False):
                y = rows.index(p.row)
                color = (palette or {}).get(p.row, "C0")
                if not (math.isnan(p.low) or math.isnan(p.high)):
                    ax.hlines(y, p.low, p.high, color=color, linewidth=1.0)
                    ax.vlines([p.low, p.high], y - 0.15, y + 0.15, color=color, linewidth=1.0)
                marker, filled = STATUS_MARKERS[p.status]
                ax.plot([p.value], [y], marker=marker, markersize=4.5, color=color,
                        markerfacecolor=color if filled else "white", markeredgecolor=color)
            ax.set_yticks(range(len(rows)), rows)
            ax.set_ylim(len(rows) - 0.5, -0.5)
            ax.set_title(column, fontsize=8)
            ax.set_xlabel("difference to the best (points)")
        for ax in list(axes.flat)[len(columns):]:
            ax.set_visible(False)
        fig.suptitle(title, fontsize=9)

    width = min(16.0, 2.2 + 3.6 * ncols + 0.05 * max(len(r) for r in rows))
    return render_png(width, height * nrows + 0.5, draw)


def curve_panels(history: pd.DataFrame) -> pd.DataFrame:
    """The curves as drawn: per series, only methods with two epochs or more (a one-point line is no curve);
    the loss of each method divided by its own mean first-epoch loss (losses of different methods live on
    different scales, a loss near 200 flattened the others to zero), online kNN top-1 as recorded."""
    if history.empty:
        return history
    data = history[history.groupby(["series", "method"])["epoch"].transform("nunique") >= 2].reset_index(drop=True)
    losses = data[data["series"] == "loss"]
    at_first = losses["epoch"] == losses.groupby("method")["epoch"].transform("min")
    scale = losses["value"].where(at_first).groupby(losses["method"]).transform("mean")
    data.loc[losses.index, "value"] = losses["value"] / scale.where(scale != 0)
    return data.dropna(subset=["value"])


def curves_chart(history: pd.DataFrame, methods: Sequence[str], title: str,
                 palette: dict[str, tuple] | None = None) -> bytes | None:
    """One panel per series (loss relative to its first epoch, online kNN top-1): mean over seeds per epoch,
    band = std over seeds; None when no method has two epochs of any series."""
    history = curve_panels(history)
    if history.empty:
        return None
    series = [s for s in SERIES_LABELS if (history["series"] == s).any()]
    methods = [m for m in methods if (history["method"] == m).any()]

    def draw(fig: Figure) -> None:
        axes = fig.subplots(1, len(series), squeeze=False)[0]
        for ax, name in zip(axes, series):
            data = history[history["series"] == name]
            sns.lineplot(data=data, x="epoch", y="value", hue="method", hue_order=methods,
                         estimator="mean", errorbar="sd", sort=True, marker="o", markersize=3,
                         palette=palette, legend=ax is axes[-1], ax=ax)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.set_ylabel(SERIES_LABELS[name])
        handles, labels = axes[-1].get_legend_handles_labels()
        if handles:  # seaborn drew its legend inside the panel (only with handles): replaced by one outside
            axes[-1].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        fig.suptitle(title, fontsize=9)

    return render_png(4.0 * len(series) + 1.6, 3.2, draw)
