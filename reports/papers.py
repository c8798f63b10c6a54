"""Pairing our cells with the papers' numbers (paper_results.csv), only like for like.

A cell and a CSV row pair only when all of these agree, checked in this order (the first that fails is
the reason a paper row stays unpaired):

1. the CSV protocol has a counterpart in this suite (``PROTOCOLS``: our key and required settings);
2. method: the display name of the record's ``method_base`` (``BASE_DISPLAY``) equals the CSV method and
   the record's ``paper_reference`` equals the CSV paper (each variant pairs with its own paper); the
   reference rows pair by name alone ("Random" = random init; "Supervised" = the supervised backbone,
   except in label-subset protocols, where it is the network trained from random weights on the
   labelled images only, our "Supervised (labelled subset only)" row);
3. pretraining dataset; 4. backbone (``BACKBONES``); 5. pretraining epochs;
6. the protocol key (evaluation dataset included: ``transfer_linear:<eval dataset>``);
7. the required protocol settings (``evaluation[key]["settings"]``; kNN: k and the temperature T);
7b. the method hyperparameters the paper row names (``PAPER_HPARAMS``; the cells' ``hparams``); 8. the metric.

Δ = ours − paper with ``stats.delta_interval``; with the paper's std over n runs (``PAPER_RUNS``) and
n >= 2 seeds of ours, also Welch's p (``stats.welch_test``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pandas as pd

from reports import stats
from reports.cells import SUBSET_ROLE, is_subset_key


@dataclass(frozen=True)
class Protocol:
    """A CSV protocol of one paper (table "*" = every table) -> our key and the settings it requires."""

    paper: str
    table: str
    protocol: str
    key: str | None  # {eval} = the evaluation dataset, {C} = its number of classes, {3C} = three times it
    settings: tuple[tuple[str, object], ...]
    source: str  # where the paper says so


#: The one mapping from the papers' protocols to ours (checked against the papers in seeds/).
PROTOCOLS = (
    Protocol("carl-carp-dissertation", "*", "linear", "linear", (("views", "crop_flip"),),
             "sec. 5.6, 5.7.1, 5.8: linear evaluation protocol of He et al. (MoCo): linear classifier "
             "on frozen features, trained on random crop + flip views"),
    Protocol("carl-carp-dissertation", "*", "transfer_linear", "transfer_linear:{eval}", (("epochs", 50),),
             "sec. 5.7.2: frozen encoder, linear classifier trained 50 epochs on the target dataset"),
    Protocol("carl-carp-dissertation", "Table 5.3", "semi_1pct", "semi_1pct",
             (("mode", "finetune"), ("epochs", 50)),
             "sec. 5.7.3: encoder fine-tuned 50 epochs on 1% of the labels"),
    Protocol("carl-carp-dissertation", "Table 5.3", "semi_10pct", "semi_10pct",
             (("mode", "finetune"), ("epochs", 50)), "sec. 5.7.3: encoder fine-tuned 50 epochs on 10% of the "
                                                     "labels"),
    Protocol("carl-carp-dissertation", "Table 5.3", "finetune_100pct", "finetune_100pct", (("epochs", 50),),
             "sec. 5.7.4: encoder fine-tuned 50 epochs on all labels"),
    Protocol("carl-carp-dissertation", "Table 6.2", "semi_1pct", "semi_1pct",
             (("mode", "finetune"), ("epochs", 20)), "Table 6.2: fine-tuned 20 epochs"),
    Protocol("carl-carp-dissertation", "Table 6.2", "semi_10pct", "semi_10pct",
             (("mode", "finetune"), ("epochs", 20)), "Table 6.2: fine-tuned 20 epochs"),
    Protocol("self-classifier", "*", "linear", "linear", (("views", "crop_flip"),),
             "sec. 4.1: standard linear classification protocol on frozen pooled features"),
    Protocol("self-classifier", "*", "knn_k20", "knn_k20", (("temperature", 0.07),),
             "sec. 4.3: weighted kNN with 20 neighbours, following InstDisc (Wu et al.: T = 0.07)"),
    Protocol("self-classifier", "*", "knn_k200", "knn_k200", (("temperature", 0.07),),
             "sec. 4.3: weighted kNN with 200 neighbours, following InstDisc (Wu et al.: T = 0.07)"),
    Protocol("self-classifier", "Table 2", "clustering", "clustering_head_k{3C}", (),
             "sec. 7.2 (CIFAR): fixed output layer of 30 (CIFAR-10) / 60 (CIFAR-100-20) classes, 3x "
             "over-clustering"),
    Protocol("self-classifier-reimplementation", "Table 1", "clustering", "clustering_head_k{C}", (),
             "sec. 3.3, 5.1: heads of C, 2C, 4C, 8C classes; Table 1 scores the K = classes head "
             "(NMI/AMI/ARI, Hungarian ACC)"),
    Protocol("uic", "*", "linear", "linear", (("views", "crop_flip"),),
             "sec. 4: linear probe trained with random crop + horizontal flip"),
    Protocol("uic", "*", "linear_conv5", None, (), "AlexNet conv5 linear probe: no such probe in this suite"),
    *(Protocol("sslpp", "Table III", f"block_classifier_{b}", f"block_classifier_{b}", (),
               "Table III: NIN block classifier on frozen block feature maps") for b in ("B2", "B3", "B4",
                                                                                         "avg")),
    *(Protocol("sslpp", "Table V", f"knn_k10_{b}", f"knn_k10_{b}", (),
               "Table V: kNN, K = 10, plurality vote on pooled block features") for b in ("B2", "B3", "B4",
                                                                                          "avg")),
)
#: registry backbone -> the CSV's name (small_cnn has no paper counterpart)
BACKBONES = {"resnet18_cifar": "ResNet-18", "resnet18": "ResNet-18", "resnet50": "ResNet-50", "nin": "NIN"}
#: registry method -> display name of the method (its base, whatever the variant), as in the CSV
BASE_DISPLAY = {"simclr": "SimCLR", "byol": "BYOL", "swav": "SwAV", "self_classifier": "Self-Classifier",
                "carl": "CARL", "carp": "CARP", "uic": "UIC", "sslpp": "SSL++ (Rotation)", "iic": "IIC",
                "rotation": "Rotation", "random_init": "Random", "supervised": "Supervised"}
#: runs behind the papers' mean ± std (for Welch's test)
PAPER_RUNS = {("carl-carp-dissertation", "Table 5.2"): 3, ("carl-carp-dissertation", "Table 5.3"): 3}
DATASET_CLASSES = {"MNIST": 10, "CIFAR-10": 10, "CIFAR-100": 100, "CIFAR-100-20": 20, "STL-10": 10,
                   "ImageNet": 1000}


def protocol_for(paper: str, table: str, protocol: str) -> Protocol | None:
    for p in PROTOCOLS:
        if p.paper == paper and p.protocol == protocol and p.table in ("*", table):
            if p.table == table or not any(q.paper == paper and q.protocol == protocol and q.table == table
                                           for q in PROTOCOLS):
                return p
    return None


def our_key(proto: Protocol, row: pd.Series, cells: pd.DataFrame) -> str:
    classes = DATASET_CLASSES.get(row["eval_dataset"])
    if classes is None:  # a dataset the table above does not know: as the records say
        same = cells["dataset"].str.casefold() == row["eval_dataset"].casefold()
        known = cells.loc[same, "num_classes"].dropna()
        classes = int(known.iloc[0]) if len(known) else 0
    return proto.key.format(eval=row["eval_dataset"], C=classes, **{"3C": 3 * classes})


def _fmt_setting(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _method_filter(row: pd.Series, cells: pd.DataFrame, key: str) -> tuple[pd.Series, str]:
    """Cells of the CSV row's method (see the module docstring), and the reason when there are none."""
    name = row["method"].casefold()
    if name in ("random", "random init"):
        mask = (cells["method_base"] == "random_init") & (cells["role"] == "")
    elif name == "supervised":
        if is_subset_key(key):
            mask = (cells["method_base"] == "random_init") & (cells["role"] == SUBSET_ROLE)
        else:
            mask = (cells["method_base"] == "supervised") & (cells["role"] == "")
    else:
        bases = {b for b, d in BASE_DISPLAY.items() if d.casefold() == name}
        bases |= set(cells.loc[cells["display"].str.casefold() == name, "method_base"])
        same = cells["method_base"].isin(bases)
        mask = same & (cells["paper_reference"] == row["paper"])
        if not mask.any():
            refs = sorted({r for r in cells.loc[same, "paper_reference"] if isinstance(r, str)})
            if same.any():
                ours = f"follow {', '.join(refs)}" if refs else "name no paper"
                if refs and cells.loc[same, "paper_reference"].isna().any():
                    ours += " or none"
                return mask, (f"our {row['method']} runs {ours} (paper_reference), this row is from "
                              f"{row['paper']}")
            return mask, f"no run of {row['method']} (following {row['paper']})"
        return mask, ""
    return mask, "" if mask.any() else f"no run of {row['method']} (reference row)"


#: the cell columns ``pairing_candidates`` reads: a report cell has them, and so has a planned run's
#: prospective cell (``reports.reproduce``), so that the report and the planner decide pairing alike
#: The method hyperparameters that define a paper row, where the paper names them: (paper, table, pretraining
#: dataset) -> (hyperparameter, value). A cell pairs only if its method_config.hparams agree (step 7b).
PAPER_HPARAMS = {
    # Table 1's MNIST row: heads 10/20/40/80, row tau 0.1, col tau 0.05 (the CSV note, sec. 3.3)
    ("self-classifier-reimplementation", "Table 1", "MNIST"): (("row_tau", 0.1), ("col_tau", 0.05)),
    # Table 1's STL-10 row is its Table 2 ablation tau = (0.07, 0.05), 300 epochs (the CSV note)
    ("self-classifier-reimplementation", "Table 1", "STL-10"): (("row_tau", 0.07), ("col_tau", 0.05)),
}

PAIRING_COLUMNS = ("row", "method_base", "display", "role", "paper_reference", "dataset", "backbone", "epochs",
                   "key", "settings", "metric", "num_classes")


def pairing_candidates(row: pd.Series, cells: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The one pairing predicate: the cells (suite, method, epochs, protocol key, settings, metric; the
    columns of ``PAIRING_COLUMNS``) that fit a CSV row on every criterion of the module docstring, or none
    and the first criterion that fails. The report pairs its cells with it (``pair_with_papers``) and
    ``python -m benchmarks reproduce`` plans its runs with it, so a plan and its report cannot disagree."""
    proto = protocol_for(row["paper"], row["table"], row["protocol"])
    if proto is None or proto.key is None:
        return cells.iloc[:0], f"protocol {row['protocol']} has no counterpart in this suite"
    key = our_key(proto, row, cells)
    transfer = key.startswith("transfer_linear:")
    if not transfer and row["eval_dataset"].casefold() != row["pretrain_dataset"].casefold():
        return cells.iloc[:0], (f"evaluated on {row['eval_dataset']} after pretraining on "
                                f"{row['pretrain_dataset']}")
    mask, reason = _method_filter(row, cells, key)
    if reason:
        return cells.iloc[:0], reason
    cand = cells[mask]
    names = ", ".join(sorted(set(cand["row"])))
    same = cand[cand["dataset"].str.casefold() == row["pretrain_dataset"].casefold()]
    if same.empty:
        return same, (f"no run of {names} on {row['pretrain_dataset']} (ours: "
                      f"{', '.join(sorted(set(cand['dataset'])))})")
    cand = same
    same = cand[[BACKBONES.get(b) == row["backbone"] for b in cand["backbone"]]]
    if same.empty:
        return same, f"backbone {', '.join(sorted(set(cand['backbone'])))}, paper {row['backbone']}"
    cand = same
    same = cand[cand["epochs"] == int(row["epochs"])] if not pd.isna(row["epochs"]) else cand.iloc[:0]
    if same.empty:
        ours = ", ".join(str(e) for e in sorted(set(cand["epochs"])))
        return same, f"our runs have {ours} epochs, the paper {row['epochs']}"
    cand = same
    same = cand[cand["key"] == key]
    if same.empty:
        kind = sorted({k for k in cand["key"] if k.split("_")[0] == key.split("_")[0]})
        return same, f"{key} not measured in our runs" + (f" (ours: {', '.join(kind)})" if kind else "")
    cand = same
    keep = []
    mismatches = set()
    for settings in cand["settings"]:
        mine = json.loads(settings)
        wrong = [(k, v) for k, v in proto.settings if mine.get(k, "\0") != v]
        keep.append(not wrong)
        for k, v in wrong:
            ours = _fmt_setting(mine[k]) if k in mine else "unset"
            mismatches.add(f"ours {key} ({k} {ours}), paper {_fmt_setting(v)}")
    same = cand[keep]
    if same.empty:
        return same, "protocol: " + "; ".join(sorted(mismatches))
    cand = same
    required = PAPER_HPARAMS.get((row["paper"], row["table"], row["pretrain_dataset"]), ())
    if required and "hparams" in cand.columns:  # the method settings that define the paper's row
        keep, mismatches = [], set()
        for hparams in cand["hparams"]:
            mine = json.loads(hparams) if isinstance(hparams, str) else {}
            wrong = [(k, v) for k, v in required if mine.get(k, "\0") != v]
            keep.append(not wrong)
            mismatches |= {f"ours {k} {_fmt_setting(mine[k]) if k in mine else 'unset'}, paper "
                           f"{_fmt_setting(v)}" for k, v in wrong}
        same = cand[keep]
        if same.empty:
            return same, "method settings: " + "; ".join(sorted(mismatches))
        cand = same
    same = cand[cand["metric"] == row["metric"]]
    if same.empty:
        ours = ", ".join(sorted(set(cand["metric"])))
        return same, f"metric {row['metric']} not in our {key} (ours: {ours})"
    return same, ""


def relevant_papers(papers: pd.DataFrame, runs, suites=None, methods=None, epochs=None) -> pd.DataFrame:
    """Paper rows that concern the selected runs (the filters applied the same way as to the records)."""
    keep = pd.Series(True, index=papers.index)
    records = [run.record for run in runs]
    if methods is not None:
        names = {str(m).casefold() for m in methods}
        for rec in records:
            names |= {rec["method_display"].casefold(), BASE_DISPLAY.get(rec["method_base"], "").casefold()}
        keep &= papers["method"].str.casefold().isin(names)
    if epochs is not None:
        keep &= papers["epochs"].isin([int(e) for e in epochs]).fillna(False).astype(bool)
    if suites is not None:
        keep &= papers["pretrain_dataset"].str.casefold().isin({rec["dataset"].casefold() for rec in records})
    return papers[keep]


PAIR_COLUMNS = ["cell", "line", "paper", "table", "paper_value", "paper_std", "paper_n", "delta", "delta_low",
                "delta_high", "welch_p", "source"]


def pair_with_papers(cells: pd.DataFrame, papers: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pairs: one row per paired cell, unmatched paper rows with ``reason``)."""
    pairs, reasons, taken = [], {}, {}
    for i, row in papers.iterrows():
        cand, reason = pairing_candidates(row, cells) if not cells.empty else (cells, "no completed run")
        if reason:
            reasons[i] = reason
            continue
        free = [j for j in cand.index if j not in taken]
        if not free:
            other = papers.loc[taken[cand.index[0]]]
            reasons[i] = (f"the same cell is paired with {other['paper']} {other['table']} (CSV line "
                          f"{other['line']})")
            continue
        paper_n = PAPER_RUNS.get((row["paper"], row["table"]))
        std = None if pd.isna(row["std"]) else float(row["std"])
        for j in free:
            taken[j] = i
            cell = cells.loc[j]
            delta = stats.delta_interval(list(cell["values"]), row["value"], std, paper_n)
            welch = stats.welch_test(cell["mean"], cell["std"], cell["n"], row["value"], std, paper_n) \
                if std is not None and paper_n else stats.WelchTest(math.nan, math.nan, math.nan)
            pairs.append((j, int(row["line"]), row["paper"], row["table"], float(row["value"]),
                          math.nan if std is None else std, paper_n, delta.delta, delta.ci_low, delta.ci_high,
                          welch.p_value, f"{row['paper']} {row['table']}"))
    unmatched = papers.loc[sorted(reasons)].copy()
    unmatched["reason"] = [reasons[i] for i in unmatched.index]
    return pd.DataFrame(pairs, columns=PAIR_COLUMNS), unmatched.reset_index(drop=True)


# ------------------------------------------------------------------------------------- paper layouts


@dataclass(frozen=True)
class Layout:
    """A paper's table shape: rows and columns are tuples of CSV field values; ours beside the paper's."""

    paper: str
    table: str
    title: str
    row_fields: tuple[str, ...]
    rows: tuple[tuple, ...]
    col_fields: tuple[str, ...]
    cols: tuple[tuple, ...]
    col_labels: tuple[str, ...]
    note: str = ""


_BLOCKS = ("B2", "B3", "B4", "avg")
LAYOUTS = (
    Layout("carl-carp-dissertation", "Table 5.2", "Dissertation Table 5.2: linear evaluation top-1 "
                                                  "(ResNet-18)",
           ("method",), (("Supervised",), ("BYOL",), ("SimCLR",), ("SwAV",), ("CARL",)),
           ("eval_dataset", "epochs", "metric"),
           tuple((d, e, "top1") for d in ("CIFAR-10", "CIFAR-100", "STL-10") for e in (100, 200)),
           tuple(f"{d} {e} ep." for d in ("CIFAR-10", "CIFAR-100", "STL-10") for e in (100, 200))),
    Layout("carl-carp-dissertation", "Table 5.3",
           "Dissertation Table 5.3: transfer, semi-supervised and fine-tuning top-1 (ResNet-18, 200 epochs)",
           ("method",), (("Supervised",), ("BYOL",), ("SimCLR",), ("CARL",)),
           ("pretrain_dataset", "eval_dataset", "protocol"),
           (("CIFAR-10", "CIFAR-100", "transfer_linear"), ("CIFAR-100", "CIFAR-10", "transfer_linear"),
            ("STL-10", "STL-10", "semi_1pct"), ("STL-10", "STL-10", "semi_10pct"),
            ("STL-10", "STL-10", "finetune_100pct")),
           ("C-10 → C-100", "C-100 → C-10", "STL-10 1%", "STL-10 10%", "STL-10 100%"),
           "Supervised in the label-subset columns: trained on the labelled images only (ours: Supervised "
           "(labelled subset only), from random weights)."),
    Layout("self-classifier-reimplementation", "Table 1",
           "Self-Classifier reimplementation Table 1: clustering with the K = classes head (ResNet-18)",
           ("eval_dataset",), (("MNIST",), ("CIFAR-10",), ("CIFAR-100-20",), ("STL-10",)),
           ("metric",), (("NMI",), ("AMI",), ("ARI",), ("ACC",)), ("NMI", "AMI", "ARI", "ACC")),
    Layout("self-classifier", "Table 2",
           "Self-Classifier Table 2: clustering with the 3x over-clustering head (ResNet-18, 800 epochs)",
           ("eval_dataset",), (("CIFAR-10",), ("CIFAR-100-20",)),
           ("metric",), (("NMI",), ("AMI",), ("ARI",)), ("NMI", "AMI", "ARI")),
    Layout("sslpp", "Table III", "SSL++ Table III: NIN block classifier top-1",
           ("eval_dataset", "method"),
           tuple((d, m) for d in ("CIFAR-10", "STL-10") for m in ("Supervised", "Random", "Rotation",
                                                                   "SSL++ (Rotation)")),
           ("protocol",), tuple((f"block_classifier_{b}",) for b in _BLOCKS), _BLOCKS),
    Layout("sslpp", "Table V", "SSL++ Table V: kNN (K = 10) top-1 per block",
           ("eval_dataset", "method"),
           tuple((d, m) for d in ("CIFAR-10", "STL-10") for m in ("Supervised", "Random", "Rotation",
                                                                   "SSL++ (Rotation)")),
           ("protocol",), tuple((f"knn_k10_{b}",) for b in _BLOCKS), _BLOCKS),
)


def _matches(papers: pd.DataFrame, fields: tuple[str, ...], values: tuple) -> pd.Series:
    mask = pd.Series(True, index=papers.index)
    for f, v in zip(fields, values):
        mask &= (papers[f].astype(object) == v) if f != "epochs" else \
            (papers[f] == v).fillna(False).astype(bool)
    return mask


def layout_cells(layout: Layout, papers: pd.DataFrame, pairs: pd.DataFrame) -> list[list[tuple]]:
    """Per layout row, per column: (paper CSV rows, paired cell indices)."""
    mine = papers[(papers["paper"] == layout.paper) & (papers["table"] == layout.table)]
    out = []
    for row in layout.rows:
        in_row = mine[_matches(mine, layout.row_fields, row)]
        cols = []
        for col in layout.cols:
            hit = in_row[_matches(in_row, layout.col_fields, col)]
            lines = set(hit["line"])
            cells = [int(c) for c, line in zip(pairs["cell"], pairs["line"]) if line in lines]
            cols.append((hit, cells))
        out.append(cols)
    return out
