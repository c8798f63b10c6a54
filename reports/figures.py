"""Seaborn figures rendered to PNG bytes, byte-identical from one build to the next.

No pyplot (no global figure state, no GUI backend): each figure is a ``matplotlib.figure.Figure`` drawn by
the Agg canvas, under matplotlib's default rcParams plus a fixed theme (so a user's matplotlibrc changes
nothing), at a fixed dpi, with a fixed ``svg.hashsalt`` and without the PNG "Software" metadata.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import matplotlib as mpl
import pandas as pd
import seaborn as sns
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

DPI = 100
RC = {
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "svg.hashsalt": "ssl-cluster-bench",
    "font.family": "DejaVu Sans",  # shipped with matplotlib: same glyphs everywhere
    "axes.titlesize": 9,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
}
SERIES_LABELS = {"loss": "training loss", "online_knn_top1": "online kNN top-1 (%)"}


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


def _legend_outside(ax) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def palette_for(methods: Sequence[str]) -> dict[str, tuple]:
    """One colour per method name, the same in every figure of a report (colour-blind friendly)."""
    names = sorted(set(methods))
    colors = sns.color_palette("colorblind", max(len(names), 1)) if len(names) <= 10 \
        else sns.color_palette("husl", len(names))
    return {name: tuple(color) for name, color in zip(names, colors)}


def bar_chart(values: pd.DataFrame, labels: Sequence[str], methods: Sequence[str], title: str,
              palette: dict[str, tuple] | None = None) -> bytes:
    """Bars = mean over seeds per method (hue) and metric column (x); error bars = sample std over seeds.

    `values` has one row per seed with columns `column` (a label in `labels`), `method` (a name in
    `methods`) and `value`.
    """
    present = set(values["method"])
    methods = [m for m in methods if m in present]
    width = min(16.0, max(5.5, 2.0 + 0.28 * len(labels) * max(1, len(methods))))

    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        sns.barplot(data=values, x="column", y="value", hue="method", order=list(labels),
                    hue_order=list(methods), errorbar="sd", capsize=0.15, err_kws={"linewidth": 0.8},
                    palette=palette, ax=ax)
        ax.set_xlabel("")
        ax.set_ylabel("%")
        ax.set_title(title)
        _legend_outside(ax)

    return render_png(width, 3.4, draw)


def curves_chart(history: pd.DataFrame, methods: Sequence[str], title: str,
                 palette: dict[str, tuple] | None = None) -> bytes:
    """One panel per series (loss, online kNN top-1): mean over seeds per epoch, band = std over seeds."""
    series = [s for s in SERIES_LABELS if (history["series"] == s).any()]
    present = set(history["method"])
    methods = [m for m in methods if m in present]

    def draw(fig: Figure) -> None:
        axes = fig.subplots(1, len(series), squeeze=False)[0]
        for ax, name in zip(axes, series):
            data = history[history["series"] == name]
            sns.lineplot(data=data, x="epoch", y="value", hue="method", hue_order=list(methods),
                         estimator="mean", errorbar="sd", sort=True, marker="o", markersize=3,
                         palette=palette, ax=ax)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch")
            ax.set_ylabel(SERIES_LABELS[name])
            if ax is axes[-1]:
                _legend_outside(ax)
            elif ax.get_legend() is not None:
                ax.get_legend().remove()
        fig.suptitle(title, fontsize=9)

    return render_png(4.0 * len(series) + 1.6, 3.2, draw)
