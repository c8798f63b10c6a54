"""The report's numbers: rows, columns and cells of every table, with their uncertainty and significance.

* A table is one (suite, dataset, pretraining epochs). A row is one (method or variant, settings
  fingerprint) -- the same experiment over seeds; several rows of one method are labelled with the settings
  that differ. A column is one (protocol key, metric, protocol settings): values measured under other
  ``evaluation[key]["settings"]`` get a column of their own, whose header names the differing settings.
* A cell holds one value per seed (the newest record's when two records of one row, seed and column
  exist). n >= 2: mean, sample std (ddof=1) and the Student-t interval over seeds; n = 1: the bootstrap
  interval over test images of that run. The image bootstrap of the mean over seeds is kept for n >= 2
  too (HTML tooltip, "Interval details"). Accuracies: percentile bootstrap. Clustering metrics: the basic
  (reflected) bootstrap ``[2v - q_hi, 2v - q_lo]``, because resampling duplicates images and inflates
  agreement, so the percentile interval of NMI/AMI/ARI/ACC sits above the estimate.
* Per column, among non-reference rows: bold = the best mean; a marker for the rows that are not
  significantly different from it (Welch's t-test on the per-seed values: the unit is the run; Holm over
  the column's comparisons, alpha 0.05); another for rows that cannot be tested (fewer than two seeds on
  either side, or no spread over the seeds).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from reports import stats
from reports.data import CLUSTER_METRICS, PerImage, Run, Superseded, differing, head_k, is_clustering_key

ALPHA = 0.05
DECIMALS = 2
SUBSET_ROLE = "subset"
SUBSET_LABEL = "Supervised (labelled subset only)"
REFERENCE_METHODS = ("random_init", "supervised")
_SUBSET_KEY = re.compile(r"semi_.+|finetune_[0-9.]+pct")
_KNN = re.compile(r"knn_k(\d+)")
_BLOCK = re.compile(r"(knn_k\d+|linear|block_classifier)_(B\d+|avg)")
_SEMI_PCT = re.compile(r"semi_([0-9.]+)pct")
_SEMI_PER_CLASS = re.compile(r"semi_(\d+)perclass")
_FINETUNE = re.compile(r"finetune_([0-9.]+)pct")

KIND_TITLES = {
    "clustering": "Clustering (k-means, K = classes)",
    "heads": "Clustering with the methods' own heads",
    "linear": "Linear evaluation",
    "knn": "kNN",
    "semi": "Semi-supervised and fine-tuning",
    "transfer": "Transfer",
    "blocks": "Per-block probes",
    "other": "Other protocols",
}
KINDS = tuple(KIND_TITLES)
METRIC_ORDER = {"NMI": 0, "AMI": 1, "ARI": 2, "ACC": 3, "ACC_M2O": 4, "ACC_MANY_TO_ONE": 4,
                "top1": 0, "top5": 1}
TOP_LABEL = {"top1": "top-1", "top5": "top-5"}
M2O = ("ACC_M2O", "ACC_MANY_TO_ONE")


def is_subset_key(key: str) -> bool:
    """Protocols trained on labelled images (semi-supervised subsets, fine-tuning on all labels)."""
    return _SUBSET_KEY.fullmatch(key) is not None


def kind_of(key: str) -> str:
    if key == "clustering":
        return "clustering"
    if head_k(key) is not None:
        return "heads"
    if key in ("linear", "online_linear"):
        return "linear"
    if _KNN.fullmatch(key):
        return "knn"
    if is_subset_key(key):
        return "semi"
    if key.startswith("transfer_linear:"):
        return "transfer"
    if _BLOCK.fullmatch(key):
        return "blocks"
    return "other"


def _num(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.inf


def key_order(key: str) -> tuple:
    """Columns in reading order: kNN by k, semi by size (per class, %, fine-tuning), blocks by index."""
    if m := _KNN.fullmatch(key):
        return (0, int(m.group(1)), key)
    if m := _SEMI_PER_CLASS.fullmatch(key):
        return (1, int(m.group(1)), key)
    if m := _SEMI_PCT.fullmatch(key):
        return (2, _num(m.group(1)), key)
    if m := _FINETUNE.fullmatch(key):
        return (3, _num(m.group(1)), key)
    if m := _BLOCK.fullmatch(key):
        block = m.group(2)
        return (4, m.group(1), math.inf if block == "avg" else int(block[1:]), key)
    if key == "linear":
        return (0, 0, key)
    if key == "online_linear":
        return (0, 1, key)
    if (k := head_k(key)) is not None:
        return (5, k, key)
    return (9, 0, key)


def metric_label(key: str, metric: str) -> str:
    if metric in M2O:
        return "ACC (many-to-one)"
    if metric == "ACC" and is_clustering_key(key):
        return "ACC (one-to-one)" if key != "clustering" else "ACC"
    return TOP_LABEL.get(metric, metric)


def protocol_label(key: str, settings: dict, params: dict) -> str:
    """What the column measures, in words (the metric follows)."""
    if key == "linear":
        views = settings.get("views")
        return "linear probe (offline" + (f", views {views})" if views is not None else ")")
    if key == "online_linear":
        return "online linear (during pretraining)"
    if m := _KNN.fullmatch(key):
        k = int(m.group(1))
        text = f"kNN k={k}" + (f", T={settings['temperature']:g}" if isinstance(settings.get("temperature"),
                                                                              (int, float)) else "")
        per_class = params.get("bank_images_per_class_min")
        if isinstance(per_class, (int, float)) and not isinstance(per_class, bool) and k > per_class:
            text += f" (k > {int(per_class)} bank images per class)"
        return text
    if m := _SEMI_PER_CLASS.fullmatch(key):
        return f"{int(m.group(1))} per class"
    if m := _SEMI_PCT.fullmatch(key):
        return f"{m.group(1)}% labels"
    if m := _FINETUNE.fullmatch(key):
        return f"{m.group(1)}% labels (fine-tune)"
    if key.startswith("transfer_linear:"):
        return f"→ {key.partition(':')[2]} (linear)"
    if m := _BLOCK.fullmatch(key):
        probe = {"block_classifier": "block classifier", "linear": "linear"}.get(m.group(1))
        if probe is None:
            probe = f"kNN k={m.group(1)[len('knn_k'):]}"
        return f"{probe} {m.group(2) if m.group(2) != 'avg' else 'avg'}"
    if key == "clustering" or head_k(key) is not None:
        return ""
    return key


# ------------------------------------------------------------------------------------------- values


@dataclass
class Model:
    """Everything the tables need: one row per cell (``cells``), per-seed values, per-image data."""

    values: pd.DataFrame  # one row per (run, key, metric) that enters a table
    cells: pd.DataFrame  # one row per (table, row, column)
    runs: list[Run]
    superseded: list[Superseded] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # values not shown, with why
    row_notes: dict[tuple, list[str]] = field(default_factory=dict)  # table -> settings of labelled rows
    tests: dict[tuple, dict] = field(default_factory=dict)  # (table, column) -> significance details


VALUE_COLUMNS = ["suite", "dataset", "epochs", "method", "method_base", "display", "is_reference",
                 "settings_fp", "role", "seed", "key", "metric", "value", "settings", "run", "path",
                 "created", "paper_reference", "backbone", "hparams"]


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def method_section(rec: dict) -> dict | None:
    """The suite's own `methods.<name>` section of the record's method or variant (as configured), if any."""
    sections = rec.get("config", {}).get("methods")
    section = sections.get(rec["method"]) if isinstance(sections, dict) else None
    return section if isinstance(section, dict) else None


def paper_of(rec: dict) -> str | None:
    """The paper a row may be paired with: a variant (an ablation of a method) only when its own section names
    one (`paper:`); otherwise it would inherit its base method's paper and be compared with numbers measured
    under other settings."""
    if rec.get("variant") and "paper" not in (method_section(rec) or {}):
        return None
    return rec["paper_reference"]


BOOKKEEPING = {"name", "method", "variant", "display_name", "paper", "version"}


def variant_differences(rec: dict, base: dict | None) -> list[tuple[str, str]]:
    """(setting, value) of a variant's settings that differ from its base method's: the resolved
    `method_config` of a base-method record of the same table when there is one, else the suite's raw
    `methods.<variant>` section against `methods.<base>` (hyperparameter names without their `hparams.`
    prefix)."""
    from reports.data import flatten

    def clean(d: dict) -> dict:
        return {k: v for k, v in (d or {}).items() if k not in BOOKKEEPING}

    if base is not None:
        mine, theirs = clean(rec["method_config"]), clean(base["method_config"])
    else:
        sections = rec.get("config", {}).get("methods")
        if not isinstance(sections, dict):
            return []
        mine, theirs = clean(sections.get(rec["method"])), clean(sections.get(rec["method_base"]))
    a, b = flatten(mine), flatten(theirs)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return [(k.removeprefix("hparams."), a.get(k, "unset")) for k in keys]


def values_frame(runs: list[Run]) -> tuple[pd.DataFrame, list[Superseded], list[str]]:
    """One row per (run, key, metric); the supervised row is dropped from label-subset protocols and the
    random-init row's label-subset values become the "Supervised (labelled subset only)" row."""
    rows, dropped = [], []
    for i, run in enumerate(runs):
        rec = run.record
        for key in sorted(rec["metrics"]):
            role = ""
            if is_subset_key(key) and rec["method_base"] in REFERENCE_METHODS:
                if rec["method_base"] == "supervised":
                    dropped.append(f"{run.path}: {key} of the supervised reference is not shown (its "
                                   "backbone saw all labels: it is no semi-supervised baseline)")
                    continue
                role = SUBSET_ROLE
            settings = canonical(rec["evaluation"][key]["settings"])
            info = rec["clusters"].get(key) if is_clustering_key(key) else None
            for metric in sorted(rec["metrics"][key]):
                if info is not None and metric == "ACC" and info["num_clusters"] != info["num_classes"]:
                    dropped.append(f"{run.path}: {key} one-to-one ACC is not shown (K = "
                                   f"{info['num_clusters']} != {info['num_classes']} classes: it would "
                                   f"measure K, not quality)")
                    continue
                rows.append((rec["suite"], rec["dataset"], rec["epochs"], rec["method"], rec["method_base"],
                             rec["method_display"], rec["is_reference"], rec["fingerprints"]["settings"],
                             role, rec["seed"], key, metric, float(rec["metrics"][key][metric]), settings, i,
                             run.path, run.created, paper_of(rec), rec["backbone"],
                             canonical((rec.get("method_config") or {}).get("hparams") or {})))
    values = pd.DataFrame(rows, columns=VALUE_COLUMNS)
    if values.empty:
        return values, [], dropped
    # one value per (row, seed, column): the newest record's (two evaluations with equal settings)
    values = values.sort_values(["created", "path"], ascending=[False, True], kind="mergesort")
    same = ["suite", "dataset", "epochs", "method", "settings_fp", "role", "seed", "key", "metric",
            "settings"]
    dup = values.duplicated(same, keep="first")
    superseded = []
    if dup.any():
        winners = values[~dup].set_index(same)
        for r in values[dup].drop_duplicates(["path", "key"]).itertuples(index=False):
            w = winners.loc[tuple(getattr(r, c) for c in same)]
            superseded.append(Superseded(r.path, runs[r.run].record["created"], w["path"],
                                         runs[int(w["run"])].record["created"], f"{r.key} values"))
    values = values[~dup].sort_values(same, kind="mergesort", ignore_index=True)
    return values, sorted(superseded, key=lambda s: (s.path, s.what)), dropped


# --------------------------------------------------------------------------------------- rows / columns


def _label_parts(keys: list[str], flat: dict[str, str], limit: int = 3) -> str:
    parts = [f"{k}={flat.get(k, 'unset')}" for k in keys]
    return ", ".join(parts[:limit]) + (f", … (+{len(parts) - limit})" if len(parts) > limit else "")


def row_labels(values: pd.DataFrame, runs: list[Run]) -> tuple[dict[tuple, str], list[str]]:
    """Row id (method, settings_fp, role) -> label within one table, and notes with the full differences.

    Several settings of one method: each row is labelled with the keys whose values differ, from the
    records' `method_config`, else from their `config` without the evaluation section."""
    from reports.data import flatten

    first = values.drop_duplicates(["method", "settings_fp", "role"])
    labels, notes = {}, []
    base_records = {}
    for method, base_name, i in zip(first["method"], first["method_base"], first["run"]):
        if method == base_name:
            base_records.setdefault(method, runs[int(i)].record)
    for (method, role), group in first.groupby(["method", "role"], sort=True):
        base = SUBSET_LABEL if role == SUBSET_ROLE else group["display"].iloc[0]
        rec = runs[int(group["run"].iloc[0])].record
        if rec.get("variant") and role != SUBSET_ROLE:
            diff = variant_differences(rec, base_records.get(rec["method_base"]))
            if diff:
                # a few differences are the label; more would bury the row's name: counted, listed in the notes
                words = ", ".join(f"{k} {v}" for k, v in diff) if len(diff) <= 3 else \
                    f"{len(diff)} settings differ, see above"
                suffix = f" ({rec['variant']})"
                base = (base[:-len(suffix)] if base.endswith(suffix) else base) + \
                    f" ({rec['variant']}: {words})"
                if len(diff) > 3:
                    notes.append(f"{base}: " + ", ".join(f"{k} {v}" for k, v in diff)
                                 + f" (differs from {rec['method_base']})")
        if len(group) == 1:
            labels[(method, group["settings_fp"].iloc[0], role)] = base
            continue
        recs = [runs[int(i)].record for i in group["run"]]
        prefix, dicts = "", [r["method_config"] for r in recs]
        keys = differing(dicts)
        if not keys:  # the same method settings: the difference is elsewhere in the config
            prefix = "config."
            dicts = [{k: v for k, v in r["config"].items() if k != "evaluation"} for r in recs]
            keys = differing(dicts)
        for fp, d in zip(group["settings_fp"], dicts):
            flat = {prefix + k: v for k, v in flatten(d).items()}
            text = _label_parts([prefix + k for k in keys], flat) if keys else f"settings {fp}"
            label = f"{base} [{text}]"
            labels[(method, fp, role)] = label
            if keys:
                notes.append(f"{label}: " + ", ".join(f"{prefix + k}={flat.get(prefix + k, 'unset')}"
                                                      for k in keys) + f" (settings fingerprint {fp})")
    # two methods with one display name: add the registry name
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    for rid, label in labels.items():
        if counts[label] > 1:
            labels[rid] = f"{label} ({rid[0]})"
    return labels, sorted(notes)


def column_headers(values: pd.DataFrame, runs: list[Run]) -> dict[tuple, str]:
    """(key, metric, settings) -> header within one table; settings that differ between the columns of
    one (key, metric) are named in brackets."""
    headers = {}
    for (key, metric), group in values.groupby(["key", "metric"], sort=True):
        variants = sorted(set(group["settings"]))
        split = differing([json.loads(s) for s in variants]) if len(variants) > 1 else []
        if key == "linear":
            split = [k for k in split if k != "views"]  # the label names the views already
        if _KNN.fullmatch(key):
            split = [k for k in split if k not in ("k", "temperature")]  # named by the label
        for settings in variants:
            mine = group[group["settings"] == settings]
            params = [runs[int(i)].record["evaluation"][key] for i in mine["run"]]
            per_class = [p.get("bank_images_per_class_min") for p in params]
            numbers = [v for v in per_class if isinstance(v, (int, float)) and not isinstance(v, bool)]
            merged = {"bank_images_per_class_min": min(numbers)} if numbers else {}
            words = protocol_label(key, json.loads(settings), merged)
            label = metric_label(key, metric)
            text = f"{words} {label}".strip() if words else label
            if split:
                from reports.data import flatten

                flat = flatten(json.loads(settings))
                text += f" [{_label_parts(split, flat, limit=4)}]"
            headers[(key, metric, settings)] = text
    return headers


# --------------------------------------------------------------------------------------------- cells


def reflect(interval: stats.Interval, low: float, high: float) -> tuple[float, float]:
    """Basic (reflected) bootstrap bounds from the percentile ones, clipped to the metric's range."""
    lo, hi = 2 * interval.value - interval.ci_high, 2 * interval.value - interval.ci_low
    return max(low, lo), min(high, hi)


def metric_range(metric: str) -> tuple[float, float]:
    return (-100.0, 100.0) if metric in ("AMI", "ARI") else (0.0, 100.0)


def stacked(parts: list[PerImage]) -> PerImage | None:
    """Per-image data of several seeds as [seeds, n], if they share the test images (same labels)."""
    if not parts or len({p.labels_id for p in parts}) != 1:
        return None
    return PerImage(parts[0].kind, parts[0].labels, np.stack([p.data for p in parts]), parts[0].labels_id)


def image_interval(data: PerImage, metric: str, n_boot: int) -> tuple[float, float, float, str]:
    """(value, low, high, method) of the bootstrap over test images (mean over the seeds stacked in data)."""
    if data.kind == "accuracy":
        iv = stats.accuracy_interval(data.data, n_boot=n_boot)
        return iv.value, iv.ci_low, iv.ci_high, "percentile"
    iv = stats.clustering_interval(data.labels, data.data, CLUSTER_METRICS[metric], n_boot=n_boot)
    low, high = reflect(iv, *metric_range(metric))
    return iv.value, low, high, "basic"


def paired_test(a: PerImage, b: PerImage, metric: str, n_boot: int) -> stats.PairedTest:
    if a.kind == "accuracy":
        return stats.paired_bootstrap_test(a.data, b.data, n_boot=n_boot)
    return stats.paired_clustering_test(a.labels, a.data, b.data, CLUSTER_METRICS[metric], n_boot=n_boot)


CELL_COLUMNS = ["suite", "dataset", "epochs", "table", "kind", "row", "method", "method_base", "display",
                "settings_fp", "role", "is_reference", "paper_reference", "backbone", "key", "metric",
                "settings", "column", "n", "seeds", "values", "mean", "std", "t_low", "t_high", "n_images",
                "img_value", "img_low", "img_high", "img_method", "img_note", "best", "tied", "p_holm",
                "test_note", "untestable", "p_raw", "diff", "diff_low", "diff_high", "K", "source", "nonempty",
                "num_classes", "hparams"]


def _cluster_info(runs: list[Run], idx: list[int], key: str) -> tuple[str, str, str, int | None]:
    infos = [runs[i].record["clusters"][key] for i in idx]

    def span(name: str) -> str:
        vals = sorted({int(info[name]) for info in infos})
        return str(vals[0]) if len(vals) == 1 else f"{vals[0]}–{vals[-1]}"

    classes = {int(info["num_classes"]) for info in infos}
    return (span("num_clusters"), "/".join(sorted({info["source"] for info in infos})), span("num_nonempty"),
            classes.pop() if len(classes) == 1 else None)


def build_model(runs: list[Run], n_boot: int = stats.N_BOOT) -> Model:
    values, superseded, dropped = values_frame(runs)
    model = Model(values, pd.DataFrame(columns=CELL_COLUMNS), runs, superseded, dropped)
    if values.empty:
        return model
    cells = []
    for (suite, dataset, epochs), table_values in values.groupby(["suite", "dataset", "epochs"], sort=True):
        table = (suite, dataset, int(epochs))
        labels, notes = row_labels(table_values, runs)
        model.row_notes[table] = notes
        headers = column_headers(table_values, runs)
        group_keys = ["method", "settings_fp", "role", "key", "metric", "settings"]
        for (method, fp, role, key, metric, settings), g in table_values.groupby(group_keys, sort=True):
            g = g.sort_values("seed")
            idx = [int(i) for i in g["run"]]
            summary = stats.seed_summary(g["value"].to_numpy())
            parts = [runs[i].per_image.get((key, metric)) for i in idx]
            cell = dict(suite=suite, dataset=dataset, epochs=int(epochs), table=table, kind=kind_of(key),
                        row=labels[(method, fp, role)], method=method, method_base=g["method_base"].iloc[0],
                        display=g["display"].iloc[0], settings_fp=fp, role=role,
                        is_reference=bool(g["is_reference"].iloc[0]) or role == SUBSET_ROLE,
                        paper_reference=g["paper_reference"].iloc[0], backbone=g["backbone"].iloc[0], key=key,
                        metric=metric, n_images=0, settings=settings, column=headers[(key, metric, settings)],
                        n=summary.n, seeds=tuple(int(s) for s in g["seed"]), values=tuple(g["value"]),
                        mean=summary.mean, std=summary.std,
                        # clipped to the metric's range (a t-interval of a mean near 100% passes 100);
                        # NaN (one seed: no interval) stays NaN, which max/min would turn into a bound
                        t_low=_clipped(summary.ci_low, max, metric_range(metric)[0]),
                        t_high=_clipped(summary.ci_high, min, metric_range(metric)[1]),
                        img_value=math.nan, img_low=math.nan, img_high=math.nan, img_method="", img_note="",
                        best=False, tied=False, p_holm=math.nan, test_note="", untestable=False,
                        p_raw=math.nan, diff=math.nan, diff_low=math.nan, diff_high=math.nan, K="", source="",
                        nonempty="", num_classes=None, hparams=g["hparams"].iloc[0])
            if any(p is None for p in parts):
                cell["img_note"] = "no per-image predictions"
            else:
                data = stacked(parts)
                if data is None:
                    cell["img_note"] = "seeds scored on different test images"
                else:
                    v, lo, hi, how = image_interval(data, metric, n_boot)
                    cell.update(img_value=v, img_low=lo, img_high=hi, img_method=how,
                                n_images=len(data.labels))
            if is_clustering_key(key):
                info = _cluster_info(runs, idx, key)
                cell["K"], cell["source"], cell["nonempty"], cell["num_classes"] = info
            cells.append(cell)
    frame = pd.DataFrame(cells, columns=CELL_COLUMNS)
    model.cells = frame
    _mark_best(model, n_boot)
    return model


def _clipped(bound: float, towards, limit: float) -> float:
    return bound if math.isnan(bound) else towards(limit, bound)


def per_seed(model: Model, cell: pd.Series) -> dict[int, PerImage | None]:
    v = model.values
    mine = v[(v["suite"] == cell["suite"]) & (v["dataset"] == cell["dataset"])
             & (v["epochs"] == cell["epochs"]) & (v["method"] == cell["method"])
             & (v["settings_fp"] == cell["settings_fp"]) & (v["role"] == cell["role"])
             & (v["key"] == cell["key"]) & (v["metric"] == cell["metric"])
             & (v["settings"] == cell["settings"])]
    return {int(s): model.runs[int(i)].per_image.get((cell["key"], cell["metric"]))
            for s, i in zip(mine["seed"], mine["run"])}


def _mark_best(model: Model, n_boot: int) -> None:
    """Bold, the not-significantly-different marker and "not testable", per column among non-reference rows.

    The unit of the test is the run: Welch's t-test on the two cells' per-seed values
    (``stats.welch_seed_test``), Holm over the column's testable comparisons with its best row, alpha
    ``ALPHA``. A comparison needs two seeds on each side and some seed-to-seed spread; otherwise the cell
    is "not testable". ``diff_low``/``diff_high`` is the interval of (row − best) at the level whose
    exclusion of 0 is exactly the Holm verdict (1 − alpha · p/p_Holm), so a figure of these intervals
    says what the marks say. ``n_boot`` is unused (kept for the signature)."""
    del n_boot
    cells = model.cells
    contenders = cells[~cells["is_reference"].astype(bool)]
    for (table, key, metric, settings), group in contenders.groupby(["table", "key", "metric", "settings"],
                                                                    sort=True):
        if len(group) < 2:
            continue
        rounded = group["mean"].round(DECIMALS)
        cells.loc[group.index[rounded == rounded.max()], "best"] = True
        order = group.sort_values(["mean", "row"], ascending=[False, True], kind="mergesort")
        best = order.iloc[0]
        details = {"best": best["row"], "comparisons": []}
        tested = []
        for j, other in order.iloc[1:].iterrows():
            test = stats.welch_seed_test(other["values"], best["values"])
            cells.at[j, "diff"] = test.diff
            if math.isnan(test.p_value):
                short = "fewer than 2 seeds" if min(other["n"], best["n"]) < 2 else "no seed-to-seed spread"
                note = (f"not testable: {short} (n = {other['n']} vs {best['n']} for the best, "
                        f"{best['row']})")
                cells.at[j, "untestable"] = True
                cells.at[j, "test_note"] = note
                details["comparisons"].append((other["row"], note))
                continue
            tested.append((j, test))
        adjusted = stats.holm([t.p_value for _, t in tested]) if tested else []
        for (j, test), p in zip(tested, adjusted):
            p = float(p)
            level = 1 - ALPHA * (test.p_value / p if p > 0 else 1.0 / len(tested))
            again = stats.welch_seed_test(cells.at[j, "values"], best["values"], level=level)
            cells.at[j, "p_holm"], cells.at[j, "p_raw"] = p, test.p_value
            cells.at[j, "diff_low"], cells.at[j, "diff_high"] = again.low, again.high
            cells.at[j, "tied"] = bool(p >= ALPHA)
            delta = f"{test.diff:+.2f}".replace("-0.00", "+0.00")
            cells.at[j, "test_note"] = (f"vs best {best['row']}: Δ = {delta} (means over seeds, n = "
                                        f"{cells.at[j, 'n']} vs {best['n']}), Welch t-test over seeds p = "
                                        f"{test.p_value:.3g}, Holm-adjusted over {len(tested)} = {p:.3g}")
            details["comparisons"].append((cells.at[j, "row"], cells.at[j, "test_note"]))
        model.tests[(table, key, metric, settings)] = details


# ------------------------------------------------------------------------------------------- ranks

HEADLINE = (("knn_k20", "top1"), ("linear", "top1"), ("clustering", "NMI"))  # one clustering metric


def headline_columns(model: Model, table: tuple) -> tuple[pd.DataFrame, list[pd.DataFrame]]:
    """The table's contender (non-reference) cells, and per HEADLINE metric present one column of them: the
    cells of that key and metric under its most common protocol settings (ties: the first settings)."""
    cells = model.cells
    mine = cells[(cells["table"] == table) & ~cells["is_reference"].astype(bool)]
    used = []
    for key, metric in HEADLINE:
        group = mine[(mine["key"] == key) & (mine["metric"] == metric)]
        if group.empty:
            continue
        counts = group.groupby("settings").size()
        settings = sorted(counts.index, key=lambda s: (-counts[s], s))[0]
        used.append(group[group["settings"] == settings])
    return mine, used


def leaderboard(model: Model, table: tuple, n_boot: int = stats.N_BOOT) -> tuple[pd.DataFrame, list[str],
                                                                                list[str]]:
    """Average rank of the seed means over the headline metrics present in the table, with a bootstrap
    rank interval resampling each method's seeds independently (stats.rank_of_means), the rows that
    cannot be ranked (a headline metric not measured) and the columns used."""
    mine, used = headline_columns(model, table)
    if not used:
        return pd.DataFrame(columns=list(stats.RANK_INTERVAL_COLUMNS)), [], []
    columns = [g["column"].iloc[0] for g in used]
    rows = sorted(set(mine["row"]))
    scores = [(r.row, seed, r.column, value) for g in used for r in g.itertuples()
              for seed, value in zip(r.seeds, r.values)]
    frame = pd.DataFrame(scores, columns=["method", "seed", "metric", "value"])
    have = frame.groupby("method")["metric"].nunique()
    ranked = [r for r in rows if have.get(r, 0) == len(columns)]
    measured = {r: set(frame.loc[frame["method"] == r, "metric"]) for r in rows}
    unranked = [f"{r} (missing: {', '.join(c for c in columns if c not in measured[r])})"
                for r in rows if r not in ranked]
    if len(ranked) < 2:
        return pd.DataFrame(columns=list(stats.RANK_INTERVAL_COLUMNS)), columns, unranked
    ranks = stats.rank_of_means(frame[frame["method"].isin(ranked)], n_boot=n_boot)
    return ranks, columns, unranked
