"""The report's numbers: every table's rows, columns and cells, with their uncertainty and significance.

``values_frame`` filters the tidy entries of ``reports.data.entries_frame``, ``build_model`` aggregates them over
seeds (a table: suite, dataset, epochs; a row: method or variant, settings; a column: evaluation, metric and
protocol settings) and ``_mark_best`` marks them. The rules are the report's appendix (``templates/text.yaml``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from reports import stats
from reports.data import (
    CLUSTER_METRICS,
    CLUSTERING_PROTOCOLS,
    PerImage,
    Run,
    Superseded,
    at_place,
    differing,
    dotted_json,
    entries_frame,
)

ALPHA = 0.05
DECIMALS = 2
SUBSET_ROLE = "subset"
SUBSET_LABEL = "Supervised (labelled subset only)"
REFERENCE_METHODS = ("random_init", "supervised")
SUBSET_PROTOCOLS = ("semi", "finetune")  # trained on labelled images

KIND_TITLES = {"clustering": "Clustering (k-means, K = classes)", "heads": "Clustering with the methods' own heads",
               "linear": "Linear evaluation", "knn": "kNN", "semi": "Semi-supervised and fine-tuning",
               "transfer": "Transfer", "blocks": "Per-block probes", "other": "Other protocols"}
_KIND_OF = {"clustering": "clustering", "clustering_head": "heads", "linear": "linear", "online_linear": "linear",
            "knn": "knn", "semi": "semi", "finetune": "semi", "transfer": "transfer"}
METRIC_ORDER = {"NMI": 0, "AMI": 1, "ARI": 2, "ACC": 3, "ACC_M2O": 4, "ACC_MANY_TO_ONE": 4, "top1": 0, "top5": 1}
METRIC_LABELS = {"ACC_M2O": "ACC (many-to-one)", "ACC_MANY_TO_ONE": "ACC (many-to-one)", "top1": "top-1",
                 "top5": "top-5"}
PROBES = {"block_classifier": "block classifier", "linear": "linear"}


def kind_of(protocol: str, settings: dict) -> str:
    if "block" in settings and protocol not in CLUSTERING_PROTOCOLS:
        return "blocks" if protocol in ("knn", "knn_k10", "linear", "block_classifier") else "other"
    return _KIND_OF.get(protocol, "other")


def percent(fraction: float) -> str:
    """0.01 -> "1", 0.005 -> "0.5" (as benchmarks.evaluation.semi.percent_label)."""
    return f"{round(fraction * 100, 6):g}"


def column_order(protocol: str, settings: dict) -> tuple:
    """Columns in reading order: kNN by k, semi by size (per class, %, fine-tuning), blocks by index."""
    if kind_of(protocol, settings) == "blocks":
        block = settings["block"]
        return (4, protocol, settings.get("k", 0), math.inf if block == "avg" else block)
    if protocol == "semi":
        return (1, settings["per_class"]) if "per_class" in settings else (2, settings.get("fraction", math.inf))
    return {"linear": (0, 0), "online_linear": (0, 1), "knn": (0, settings.get("k", 0)), "finetune": (3, 0),
            "clustering_head": (5, settings.get("k", 0))}.get(protocol, (9, 0))


def fmt_delta(value: float) -> str:
    text = f"{value:+.{DECIMALS}f}"
    return "+" + text[1:] if float(text) == 0 else text


def metric_label(protocol: str, metric: str) -> str:
    one_to_one = metric == "ACC" and protocol == "clustering_head"
    return "ACC (one-to-one)" if one_to_one else METRIC_LABELS.get(metric, metric)


def protocol_label(protocol: str, settings: dict, bank_min: float | None, key: str) -> str:
    """What the column measures, in words (the metric follows); `bank_min` is kNN's fewest bank images per class,
    `key` names an unknown protocol."""
    if kind_of(protocol, settings) == "blocks":
        probe = PROBES.get(protocol) or f"kNN k={settings.get('k')}"
        return f"{probe} {'avg' if settings['block'] == 'avg' else 'B' + str(settings['block'])}"
    if protocol == "knn":
        k, temperature = settings["k"], settings.get("temperature")
        text = f"kNN k={k}" + (f", T={temperature:g}" if isinstance(temperature, (int, float)) else "")
        return text + (f" (k > {int(bank_min)} bank images per class)" if bank_min is not None and k > bank_min else "")
    if protocol == "semi" and ("per_class" in settings or "fraction" in settings):
        return (f"{settings['per_class']} per class" if "per_class" in settings
                else f"{percent(settings['fraction'])}% labels")
    views = f", views {settings['views']}" if settings.get("views") is not None else ""
    labels = {"linear": f"linear probe (offline{views})", "online_linear": "online linear (during pretraining)",
              "finetune": "100% labels (fine-tune)", "transfer": f"→ {settings.get('dataset')} (linear)",
              "clustering": "", "clustering_head": ""}
    return labels.get(protocol, key)


@dataclass
class Model:
    """Everything the tables need: one row per cell (``cells``), per-seed values, per-image data."""

    values: pd.DataFrame  # one row per (run, metric entry) that enters a table
    cells: pd.DataFrame  # one row per (table, row, column)
    runs: list[Run]
    superseded: list[Superseded] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # values not shown, with why
    row_notes: dict[tuple, list[str]] = field(default_factory=dict)  # table -> settings of labelled rows


#: one value per (row, seed, column)
SAME = ["suite", "dataset", "epochs", "method", "settings_fp", "role", "seed", "key", "metric", "settings"]


def values_frame(runs: list[Run]) -> tuple[pd.DataFrame, list[Superseded], list[str]]:
    """The entries that enter a table (the appendix's label-subset and one-to-one ACC rules), one value per row,
    seed and column: the newest record's, the others superseded."""
    values = entries_frame(runs)
    subset = values["protocol"].isin(SUBSET_PROTOCOLS) & values["method_base"].isin(REFERENCE_METHODS)
    supervised = subset & (values["method_base"] == "supervised")
    one_to_one = ((values["metric"] == "ACC") & values["protocol"].isin(CLUSTERING_PROTOCOLS)
                  & (values["num_clusters"] != values["num_classes"]))
    dropped = [f"{r.path}: {r.key} of the supervised reference is not shown (its backbone saw all labels: it is no "
               "semi-supervised baseline)" for r in values[supervised].drop_duplicates(["path", "key"]).itertuples()]
    dropped += [f"{r.path}: {r.key} one-to-one ACC is not shown (K = {r.num_clusters} != {r.num_classes} classes: "
                "it would measure K, not quality)" for r in values[one_to_one].itertuples()]
    shown = ~supervised & ~one_to_one
    values = values[shown].assign(role=np.where(subset[shown], SUBSET_ROLE, ""))
    values = values.sort_values(["created", "path"], ascending=[False, True], kind="mergesort")
    dup = values.duplicated(SAME, keep="first")
    lost = values[dup].drop_duplicates(["path", "key"]).merge(values[~dup][[*SAME, "path", "run"]], on=SAME,
                                                             suffixes=("", "_winner"))
    superseded = [Superseded(r.path, runs[r.run].record["created"], r.path_winner,
                             runs[r.run_winner].record["created"], f"{r.key} values") for r in lost.itertuples()]
    values = values[~dup].sort_values(SAME, kind="mergesort", ignore_index=True)
    return values, sorted(superseded, key=lambda s: (s.path, s.what)), dropped


BOOKKEEPING = {"name", "method", "variant", "display_name", "paper", "version"}


def variant_differences(rec: dict, base: dict | None) -> list[tuple[str, str]]:
    """(setting without `hparams.`, value) where a variant differs from its base method: against the resolved
    `method_config` of a base record of the same table, else the suite's raw `methods.<base>` section."""
    if base is not None:
        mine, theirs = rec["method_config"], base["method_config"]
    else:
        sections = rec.get("config", {}).get("methods")
        if not isinstance(sections, dict):
            return []
        mine, theirs = sections.get(rec["method"]), sections.get(rec["method_base"])
    a, b = ({k: v for k, v in (d or {}).items() if k not in BOOKKEEPING} for d in (mine, theirs))
    return [(k.removeprefix("hparams."), dotted_json(a).get(k, "unset")) for k in differing([a, b])]


def _label_parts(keys: list[str], flat: dict[str, str], limit: int = 3) -> str:
    parts = [f"{k}={flat.get(k, 'unset')}" for k in keys]
    return ", ".join(parts[:limit]) + (f", … (+{len(parts) - limit})" if len(parts) > limit else "")


def _variant_label(base: str, rec: dict, base_rec: dict | None, notes: list[str]) -> str:
    """A variant's row label names its differences from the base method (a few; more are counted and listed in
    the notes: they would bury the row's name)."""
    diff = variant_differences(rec, base_rec)
    if not diff:
        return base
    listed = ", ".join(f"{k} {v}" for k, v in diff)
    words = listed if len(diff) <= 3 else f"{len(diff)} settings differ, see above"
    label = base.removesuffix(f" ({rec['variant']})") + f" ({rec['variant']}: {words})"
    if len(diff) > 3:
        notes.append(f"{label}: {listed} (differs from {rec['method_base']})")
    return label


def _settings_labels(base: str, group: pd.DataFrame, runs: list[Run], notes: list[str]) -> dict:
    """Several settings of one method: each row labelled with the keys whose values differ, from the records'
    `method_config`, else from their `config` without the evaluation section."""
    recs = [runs[int(i)].record for i in group["run"]]
    dicts = [r["method_config"] for r in recs]
    if not differing(dicts):  # the same method settings: the difference is elsewhere in the config
        dicts = [{"config": {k: v for k, v in r["config"].items() if k != "evaluation"}} for r in recs]
    keys, labels = differing(dicts), {}
    for fp, d in zip(group["settings_fp"], dicts):
        flat = dotted_json(d)
        labels[fp] = f"{base} [{_label_parts(keys, flat) or f'settings {fp}'}]"
        if keys:
            notes.append(f"{labels[fp]}: {_label_parts(keys, flat, limit=len(keys))} (settings fingerprint {fp})")
    return labels


def row_labels(values: pd.DataFrame, runs: list[Run]) -> tuple[dict[tuple, str], list[str]]:
    """Row id (method, settings_fp, role) -> label within one table, and notes with the full differences."""
    first = values.drop_duplicates(["method", "settings_fp", "role"])
    base_records = {m: runs[int(i)].record for m, b, i in zip(first["method"], first["method_base"], first["run"])
                    if m == b}
    labels, notes = {}, []
    for (method, role), group in first.groupby(["method", "role"], sort=True):
        base = SUBSET_LABEL if role == SUBSET_ROLE else group["display"].iloc[0]
        rec = runs[int(group["run"].iloc[0])].record
        if rec.get("variant") and role != SUBSET_ROLE:
            base = _variant_label(base, rec, base_records.get(rec["method_base"]), notes)
        by_fp = ({group["settings_fp"].iloc[0]: base} if len(group) == 1
                 else _settings_labels(base, group, runs, notes))
        labels.update({(method, fp, role): label for fp, label in by_fp.items()})
    counts = pd.Series(list(labels.values())).value_counts()
    # two methods with one display name: add the registry name
    return ({rid: f"{label} ({rid[0]})" if counts[label] > 1 else label for rid, label in labels.items()},
            sorted(notes))


def column_headers(values: pd.DataFrame, runs: list[Run]) -> dict[tuple, str]:
    """(key, metric, settings) -> header within one table; settings that differ between the columns of
    one evaluation and metric are named in brackets (other than those the label names already)."""
    headers = {}
    for (key, metric), group in values.groupby(["key", "metric"], sort=True):
        protocol, entry = group["protocol"].iloc[0], group["entry"].iloc[0]
        named = () if "block" in entry else {"linear": ("views",), "knn": ("k", "temperature")}.get(protocol, ())
        split = [k for k in differing(list(group.drop_duplicates("settings")["entry"])) if k not in named]
        for settings, mine in group.groupby("settings"):
            per_class = [runs[int(i)].record["evaluation"][key].get("bank_images_per_class_min") for i in mine["run"]]
            bank_min = min((v for v in per_class if isinstance(v, (int, float)) and not isinstance(v, bool)),
                           default=None)
            text = f"{protocol_label(protocol, mine['entry'].iloc[0], bank_min, key)} {metric_label(protocol, metric)}"
            brackets = f" [{_label_parts(split, dotted_json(mine['entry'].iloc[0]), limit=4)}]" if split else ""
            headers[(key, metric, settings)] = text.strip() + brackets
    return headers


def reflect(interval: stats.Interval, low: float, high: float) -> tuple[float, float]:
    """Basic (reflected) bootstrap bounds from the percentile ones, clipped to the metric's range."""
    lo, hi = 2 * interval.value - interval.ci_high, 2 * interval.value - interval.ci_low
    return max(low, lo), min(high, hi)


def metric_range(metric: str) -> tuple[float, float]:
    return (-100.0, 100.0) if metric in ("AMI", "ARI") else (0.0, 100.0)


def image_interval(parts: list[PerImage | None], metric: str, n_boot: int) -> dict:
    """The bootstrap over test images of the mean over the seeds (their per-image data stacked), when every
    seed has per-image data on the same test images; else why not."""
    if any(p is None for p in parts):
        return {"img_note": "no per-image predictions"}
    if len({p.labels_id for p in parts}) != 1:
        return {"img_note": "seeds scored on different test images"}
    data = np.stack([p.data for p in parts])
    if parts[0].kind == "accuracy":
        iv = stats.accuracy_interval(data, n_boot=n_boot)
        low, high, how = iv.ci_low, iv.ci_high, "percentile"
    else:
        together = tuple(CLUSTER_METRICS[m] for m in parts[0].metrics if m in CLUSTER_METRICS)
        iv = stats.clustering_interval(parts[0].labels, data, CLUSTER_METRICS[metric], n_boot=n_boot,
                                       together=together)
        (low, high), how = reflect(iv, *metric_range(metric)), "basic"
    return {"img_value": iv.value, "img_low": low, "img_high": high, "img_method": how,
            "n_images": len(parts[0].labels)}


def _span(values) -> str:
    vals = sorted({int(v) for v in values})
    return str(vals[0]) if len(vals) == 1 else f"{vals[0]}–{vals[-1]}"


def _cluster_info(infos: list[dict]) -> dict:
    classes = {int(info["num_classes"]) for info in infos}
    return {"K": _span(i["num_clusters"] for i in infos), "source": "/".join(sorted({i["source"] for i in infos})),
            "nonempty": _span(i["num_nonempty"] for i in infos),
            "num_classes": classes.pop() if len(classes) == 1 else None}


def _cell(g: pd.DataFrame, runs: list[Run], n_boot: int) -> dict:
    """One cell from the values of its seeds (sorted by seed): the seed statistics, the image bootstrap and,
    for clustering, K and the non-empty clusters."""
    first = g.iloc[0]
    summary = stats.seed_summary(g["value"].to_numpy())
    low, high = metric_range(first["metric"])
    cell = {c: first[c] for c in ("method_base", "display", "paper_reference", "backbone", "protocol", "hparams")}
    cell.update(kind=kind_of(first["protocol"], first["entry"]), entry=first["entry"],
                is_reference=bool(first["is_reference"]) or first["role"] == SUBSET_ROLE,
                n=summary.n, seeds=tuple(int(s) for s in g["seed"]), values=tuple(g["value"]),
                # a t-interval of a mean near 100% passes 100; NaN (one seed: no interval) stays NaN
                mean=summary.mean, std=summary.std, t_low=np.maximum(summary.ci_low, low),
                t_high=np.minimum(summary.ci_high, high))
    parts = [runs[int(i)].per_image.get((first["key"], first["metric"])) for i in g["run"]]
    cell.update(image_interval(parts, first["metric"], n_boot))
    if first["protocol"] in CLUSTERING_PROTOCOLS:
        cell.update(_cluster_info([runs[int(i)].record["clusters"][first["key"]] for i in g["run"]]))
    return cell


CELL_DEFAULTS = {"n_images": 0, "img_value": math.nan, "img_low": math.nan, "img_high": math.nan, "img_method": "",
                 "img_note": "", "best": False, "tied": False, "p_holm": math.nan, "test_note": "", "untestable": False,
                 "p_raw": math.nan, "diff": math.nan, "diff_low": math.nan, "diff_high": math.nan, "K": "",
                 "source": "", "nonempty": "", "num_classes": None}
GROUP = ["method", "settings_fp", "role", "key", "metric", "settings"]  # a row's id, then a column's


def build_model(runs: list[Run], n_boot: int = stats.N_BOOT) -> Model:
    """Aggregate the values over seeds: one cell per (table, row, column), then the marks."""
    values, superseded, dropped = values_frame(runs)
    cells, row_notes = [], {}
    for (suite, dataset, epochs), table_values in values.groupby(["suite", "dataset", "epochs"], sort=True):
        table = (suite, dataset, int(epochs))
        labels, row_notes[table] = row_labels(table_values, runs)
        headers = column_headers(table_values, runs)
        for ids, g in table_values.groupby(GROUP, sort=True):
            cells.append({"suite": suite, "dataset": dataset, "epochs": int(epochs), "table": table,
                          **dict(zip(GROUP, ids)), "row": labels[ids[:3]], "column": headers[ids[3:]], **CELL_DEFAULTS,
                          **_cell(g.sort_values("seed"), runs, n_boot)})
    empty = ["suite", "dataset", "epochs", "table", *GROUP, "row", "column", "n", "mean", *CELL_DEFAULTS]
    frame = pd.DataFrame(cells) if cells else pd.DataFrame(columns=empty)
    if cells:
        _mark_best(frame)
    return Model(values, frame, runs, superseded, dropped, row_notes)


def _mark_column(cells: pd.DataFrame, group: pd.DataFrame) -> None:
    """Bold the column's best mean; test every other row against the best row (Welch over seeds, Holm)."""
    rounded = group["mean"].round(DECIMALS)
    cells.loc[group.index[rounded == rounded.max()], "best"] = True
    order = group.sort_values(["mean", "row"], ascending=[False, True], kind="mergesort")
    best = order.iloc[0]
    tested = []
    for j, other in order.iloc[1:].iterrows():
        test = stats.welch_seed_test(other["values"], best["values"])
        cells.at[j, "diff"] = test.diff
        if math.isnan(test.p_value):
            short = "fewer than 2 seeds" if min(other["n"], best["n"]) < 2 else "no seed-to-seed spread"
            note = f"not testable: {short} (n = {other['n']} vs {best['n']} for the best, {best['row']})"
            cells.loc[j, ["untestable", "test_note"]] = [True, note]
        else:
            tested.append((j, other, test))
    for (j, other, test), p in zip(tested, stats.holm([t.p_value for *_, t in tested])):
        level = 1 - ALPHA * (test.p_value / p if p > 0 else 1.0 / len(tested))
        again = stats.welch_seed_test(other["values"], best["values"], level=level)
        note = (f"vs best {best['row']}: Δ = {fmt_delta(test.diff)} (means over seeds, n = {other['n']} vs "
                f"{best['n']}), Welch t-test over seeds p = {test.p_value:.3g}, "
                f"Holm-adjusted over {len(tested)} = {p:.3g}")
        cells.loc[j, ["p_holm", "p_raw", "diff_low", "diff_high", "tied", "test_note"]] = \
            [p, test.p_value, again.low, again.high, bool(p >= ALPHA), note]


def _mark_best(cells: pd.DataFrame) -> None:
    """``_mark_column`` for every column of two or more non-reference rows (the appendix, ``templates/text.yaml``)."""
    contenders = cells[~cells["is_reference"].astype(bool)]
    for _, group in contenders.groupby(["table", "key", "metric", "settings"], sort=True):
        if len(group) >= 2:
            _mark_column(cells, group)


#: one clustering metric
HEADLINE = (("knn", {"k": 20}, "top1"), ("linear", {}, "top1"), ("clustering", {}, "NMI"))


def headline_columns(model: Model, table: tuple) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """The table's contender cells, and per HEADLINE metric present its cells (no block, head or transfer
    dataset) under the most common protocol settings (ties: the first)."""
    cells = model.cells
    mine = cells[(cells["table"] == table) & ~cells["is_reference"].astype(bool)]
    groups = [mine[at_place(mine, protocol, wanted) & (mine["metric"] == metric)]
              for protocol, wanted, metric in HEADLINE]
    return mine, [g[g["settings"] == g["settings"].mode().iloc[0]] for g in groups if not g.empty]  # mode() is sorted


def leaderboard(model: Model, table: tuple, n_boot: int = stats.N_BOOT) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Average rank of the seed means over the table's headline metrics with bootstrap rank intervals
    (stats.rank_of_means), the rows that cannot be ranked (a headline metric not measured), the columns used."""
    mine, used = headline_columns(model, table)
    empty = pd.DataFrame(columns=list(stats.RANK_INTERVAL_COLUMNS))
    if not used:
        return empty, [], []
    columns = [g["column"].iloc[0] for g in used]
    scores = pd.DataFrame([(r.row, seed, r.column, value) for g in used for r in g.itertuples()
                           for seed, value in zip(r.seeds, r.values)], columns=["method", "seed", "metric", "value"])
    measured = scores.groupby("method")["metric"].agg(set)
    rows = sorted(set(mine["row"]))
    ranked = [r for r in rows if len(measured.get(r, ())) == len(columns)]
    unranked = [f"{r} (missing: {', '.join(c for c in columns if c not in measured.get(r, ()))})"
                for r in rows if r not in ranked]
    if len(ranked) < 2:
        return empty, columns, unranked
    return stats.rank_of_means(scores[scores["method"].isin(ranked)], n_boot=n_boot), columns, unranked
