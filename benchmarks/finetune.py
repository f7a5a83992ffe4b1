"""The fine-tuning study: what ``facemt fit`` should do with a user's few dozen to few hundred studio
photos so that the model it writes beats the model it starts from (the built-in base by default).

    python benchmarks/finetune.py --data-root ../shared/data [--only defaults,epochs-8,...]
                                  [--set NAME=DIR|CSV ...] [--folds 5] [--persons N] [--csv out.csv]
                                  [--results RESULTS.md]

Sets, each taken as "the user's photos": persons the base model never trained on. JAFFE (all 10 women),
and the studio test persons (``benchmarks/studio_test_persons.txt``) of CK+, CFD, and NimStim + RaFD
together (one lab's mixed stimuli); ``--set NAME=PATH`` adds any labelled folder or CSV (a FACES copy),
``--no-shared`` leaves the shared ones out. Each set: ``--folds`` subject-disjoint folds (seed 0).

In every fold, every variant runs exactly what ``facemt fit`` runs on the training persons (a
person-disjoint validation split of them, the best epoch by validation accuracy) and is scored on the
test persons: ``untouched`` (the start model as it is), ``tuned`` (the fine-tuned heads, the
never-worse rule off: ``--no-keep-start``), ``blend`` (the two together: their mean log-probability per
head, renormalised), ``wise-A`` (the two averaged in weight space, A the fine-tuned share), ``fit`` (what
fit writes: a head that fine-tuning did not improve on the validation persons, or that the set does not
label, answered by the start model), ``step`` (fit with its person-relative step) and the person-relative
classifiers on either trunk (``relative-*``).
Variants change one thing against fit's defaults. Reported: per set, head and variant the mean test
accuracy and paired differences over folds with 95 % t-intervals (against untouched, against defaults).
A benchmark, not a test: nothing here asserts.

``--manifests DIR`` only writes each set as a CSV manifest (``DIR/NAME.csv``: path, person and labels),
which ``facemt cv --data DIR/NAME.csv`` reads as a user's folder: its *what fit writes* column is this
study's ``step`` arm run by the package itself.
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import publish  # noqa: E402
from studio import SPLIT_FILE, read_split, studio_index, test_rows  # noqa: E402

from facemt.checkpoint import load_checkpoint  # noqa: E402
from facemt.config import TrainConfig  # noqa: E402
from facemt.data import DataIndex, ImageCache, encode_targets, index_jaffe, load_sources, persons_in  # noqa: E402
from facemt.engine import (decode_images, fit, heads_to_keep, initial_weights, keep_start,  # noqa: E402
                           person_relative_step, val_probabilities)
from facemt.inference import predict_images  # noqa: E402
from facemt.evaluation import evaluate_predictions, paired_interval  # noqa: E402
from facemt.relative import (MIN_PICTURES, VARIANTS as CLASSIFIERS, best_candidate, fit_person_relative,  # noqa: E402
                             pooled_scores, trunk_features, with_person_relative)
from facemt.splits import make_folds, more_validation_groups, validation_split  # noqa: E402
from facemt.tasks import TASKS  # noqa: E402

#: one change at a time against fit's defaults (TrainConfig fields); "epochs" is read first
VARIANTS: dict[str, dict] = {
    "defaults": {},
    "linear-probe": {"head_warmup_epochs": -1},  # the backbone frozen for every step (see _config)
    "lp-ft": {"head_warmup_epochs": 5},
    "epochs-8": {"epochs": 8},
    "layer-decay-0.7": {"layer_decay": 0.7},
    "backbone-0.3x": {"backbone_lr_scale": 0.3},
    "lr-0.3x": {"lr": 3e-4},
    "label-smoothing-0.1": {"label_smoothing": 0.1},
    "augment-light": {"augment": "light"},
    "jitter-consistency-1": {"jitter_consistency": 1.0},
    "image-160": {"image_size": 160},
    "mixup-0.2": {"mixup": 0.2},  # fit's default from the study on (the CSVs' "defaults" rows before it: no mixup)
    "no-mixup": {"mixup": 0.0},
    "cutmix-1": {"cutmix": 1.0},
    "distill-1": {"distill": 1.0},
    "freeze-norm": {"freeze_norm": True},
    "freeze-norm+distill-1": {"freeze_norm": True, "distill": 1.0},
    "refit": {"refit": True},
}


def shared_sets(root: Path, split: Path = SPLIT_FILE) -> dict[str, DataIndex]:
    """The shared sets whose persons the base never trained on (``split``: the studio test persons)."""
    sets = {}
    if (root / "jaffe").is_dir():
        sets["jaffe"] = index_jaffe(root / "jaffe")
    studio = studio_index(root).table
    studio = studio.iloc[test_rows(studio, read_split(split))].reset_index(drop=True)
    for name, sources in (("ckplus48", ["ckplus48"]), ("cfd", ["cfd"]), ("nimstim+rafd", ["nimstim", "rafd"])):
        table = studio[studio["source"].isin(sources)].reset_index(drop=True)
        if len(table):
            sets[name] = DataIndex(table, [])
    return sets


def subset(index: DataIndex, persons: int, seed: int = 0) -> DataIndex:
    """``index`` cut to ``persons`` persons drawn at random (every picture of each)."""
    names = sorted(index.table["person"].dropna().unique())
    chosen = set(np.random.default_rng(seed).choice(names, size=persons, replace=False))
    return DataIndex(index.table[index.table["person"].isin(chosen)].reset_index(drop=True), [])


def _config(base: TrainConfig, change: dict) -> TrainConfig:
    config = replace(base, **change)
    if change.get("head_warmup_epochs") == -1:
        config = replace(config, head_warmup_epochs=config.epochs - 0.01)
    return config


def _probs(model, preprocess, table: pd.DataFrame, cache: ImageCache) -> dict[str, np.ndarray]:
    return val_probabilities(model, preprocess, DataIndex(table, []), cache, "cpu")


def log_loss(probs: dict[str, np.ndarray], table: pd.DataFrame) -> dict[str, float]:
    """Mean negative log-likelihood of ``table``'s labels per head of ``probs`` (heads without labels left out)."""
    targets = encode_targets(table, list(probs))
    out = {}
    for t, p in probs.items():
        y = targets[t]
        if (y >= 0).any():
            out[t] = float(-np.log(np.clip(p[y >= 0, y[y >= 0]], 1e-12, 1.0)).mean())
    return out


def _scores(table: pd.DataFrame, probs: dict[str, np.ndarray], heads) -> dict[str, tuple[float, int]]:
    metrics = evaluate_predictions(table, {h: p for h, p in probs.items() if h in heads})
    return {h: (m["accuracy"], m["n"]) for h, m in metrics.items() if m["n"]}


def blend(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per head both models have: the renormalised geometric mean of their probabilities (mean log-probability)."""
    out = {}
    for h in a.keys() & b.keys():
        g = np.exp((np.log(np.clip(a[h], 1e-12, 1)) + np.log(np.clip(b[h], 1e-12, 1))) / 2)
        out[h] = g / g.sum(1, keepdims=True)
    return out


#: the fine-tuned weights' shares in the ``wise-*`` arms (the rest the start model's)
WISE = (0.25, 0.5, 0.75)


def interpolate(start, tuned, alpha: float):
    """The start and the fine-tuned network averaged in weight space (``alpha`` the fine-tuned share, every
    parameter and normalisation statistic the two share in name and shape; the rest the fine-tuned one's):
    WiSE-FT, Wortsman et al. 2022. Temperatures are the fine-tuned model's."""
    out = copy.deepcopy(tuned)
    a, b = start.state_dict(), tuned.state_dict()
    out.load_state_dict({k: (1 - alpha) * a[k] + alpha * v if k in a and a[k].shape == v.shape
                         and v.is_floating_point() else v for k, v in b.items()})
    return out


def run_fold(index: DataIndex, train_rows, test_rows_, config: TrainConfig, cache: ImageCache, start) -> list[dict]:
    """One variant on one fold: untouched, tuned, blend (their mean log-probability), ``wise-A`` (the two
    averaged in weight space, :func:`interpolate`) and fit (never-worse rule) test accuracy per labelled
    head, with the validation evidence of each (``val_arm``: a wise arm's validation accuracy)."""
    heads = [t for t in TASKS if index.table[t].iloc[test_rows_].notna().any()]
    test = index.table.iloc[test_rows_].reset_index(drop=True)
    sub = DataIndex(index.table.iloc[train_rows].reset_index(drop=True), [])
    val = sub.table.iloc[validation_split(sub.table, config.val_fraction, config.seed)[1]].reset_index(drop=True)
    # the study scores the person-relative classifier itself (person_relative below), on both trunks
    result = fit(sub, replace(config, keep_start=False, person_relative="off"), cache=cache)
    start_model, start_preprocess, _ = start
    probs = {}
    for name, table in (("test", test), ("val", val)):
        probs[name] = {"untouched": _probs(start_model, start_preprocess, table, cache),
                       "tuned": _probs(result.model, result.preprocess, table, cache)}
        probs[name]["blend"] = blend(probs[name]["untouched"], probs[name]["tuned"])
    wise = [f"wise-{a}" for a in WISE] if start_preprocess == result.preprocess else []
    for arm, alpha in zip(wise, WISE):
        net = interpolate(start_model, result.model, alpha)
        for name, table in (("test", test), ("val", val)):
            probs[name][arm] = _probs(net, result.preprocess, table, cache)
    val_arm = {} if config.refit else {arm: _scores(val, probs["val"][arm], heads) for arm in wise}
    # a refit model trained on the validation persons too: its validation answers are no evidence
    val_blend = {} if config.refit else _scores(val, probs["val"]["blend"], heads)
    nll = {arm: {} if config.refit and arm == "tuned" else log_loss(probs["val"][arm], val)
           for arm in ("untouched", "tuned")}
    rows = [(arm, _scores(test, probs["test"][arm], heads)) for arm in ("untouched", "tuned", "blend", *wise)]
    relative = person_relative(sub.table, val, test, {"tuned": result, "start": start}, cache)
    rows += [(arm, scores) for arm, (scores, _) in relative.items()]
    val_relative = {arm: v for arm, (_, v) in relative.items()}
    step = None
    if keep_start(result, start_model, start_preprocess) is None:  # what fit does with the rule on
        rows.append(("fit", _scores(test, _probs(result.model, result.preprocess, test, cache), heads)))
        step = fit_step(result, sub, val, test, config, cache)
        rows += [("step", step[0])] if step else []
    return [{"arm": arm, "head": h, "accuracy": acc, "n": n, "kept": h in result.kept,
             "best_epoch": result.best_epoch, "val_tuned": result.metrics.get(f"val_{h}_acc"),
             "val_untouched": result.untouched.get(h),  # the rule's evidence, to weigh other rules later
             "val_n": result.val_faces.get(h), "start_all": result.untouched_all.get(h),
             "val_blend": val_blend.get(h, (None,))[0], "val_nll_tuned": nll["tuned"].get(h),
             "val_nll_untouched": nll["untouched"].get(h), "val_relative": val_relative.get(arm),
             "val_arm": val_arm.get(arm, {}).get(h, (None,))[0],
             "step_choice": step[1] if step and arm == "step" else None,
             **(step[2] if step and arm == "step" else {})}
            for arm, scores in rows for h, (acc, n) in scores.items()]


def evidence_fold(index: DataIndex, train_rows, config: TrainConfig, cache: ImageCache, groups: int) -> list[dict]:
    """More evidence for fit's two choices (the never-worse rule, the person-relative step) on one fold: fit
    run again (the same settings) with each of ``groups`` other validation groups held out instead of its own,
    each as many persons as fit's own validation persons, drawn from the rest of the training persons
    (disjoint from fit's and from each other). Recorded per group and head: the fine-tuned and the start
    model's validation accuracy and faces (``val_tuned``, ``val_untouched``, ``val_n``) and the step's
    candidates' (``step_val_*``, ``step_nll_*``, ``step_n``). No test scores: :func:`pooled_evidence` reads
    them from the fold's own run (the ``defaults`` rows of the same seed)."""
    sub = DataIndex(index.table.iloc[train_rows].reset_index(drop=True), [])
    own = validation_split(sub.table, config.val_fraction, config.seed)[1]
    out = []
    for g, (rows, val_rows) in enumerate(more_validation_groups(sub.table, own, groups + 1, config.seed), 1):
        held = set(sub.table["person"].iloc[val_rows])
        result = fit(sub, replace(config, person_relative="auto"), cache=cache, rows=(rows, val_rows))
        info = result.person_relative or {}
        step = {f"step_{kind}_{name.replace(' ', '_')}": score[key] for name, score in info.get("scores", {}).items()
                for kind, key in (("val", "accuracy"), ("nll", "log_loss"))}
        for h in result.tasks:
            out.append({"arm": "evidence", "group": g, "persons": " ".join(sorted(map(str, held))), "head": h,
                        "val_tuned": result.metrics.get(f"val_{h}_acc"),
                        "val_untouched": result.untouched.get(h), "val_n": result.val_faces.get(h),
                        "kept": h in result.kept, "best_epoch": result.best_epoch,
                        **({**step, "step_n": info.get("val_images")} if h == "expression" else {})})
    return out


def fit_step(result, sub: DataIndex, val: pd.DataFrame, test: pd.DataFrame, config: TrainConfig,
             cache: ImageCache) -> tuple[dict, str, dict] | None:
    """Fit's person-relative step (facemt.engine.person_relative_step, fit's default ``auto``) on the model
    fit writes: test scores of expression, what it chose (a variant, or ``head``) and every candidate's
    evidence (:func:`step_candidates`); None without expression labels."""
    if test["expression"].isna().all():
        return None
    is_val = sub.table["path"].isin(set(val["path"])).to_numpy()
    person_relative_step(result, sub, (np.flatnonzero(~is_val), np.flatnonzero(is_val)),
                         replace(config, person_relative="auto"), None, cache)
    images = decode_images(DataIndex(test, []), result.preprocess, cache, None)
    own = predict_images(result.model, images, result.preprocess)["expression"]
    probs = with_person_relative(result.model, images, result.preprocess, persons_in(test), own)
    result.model.relative = None
    info = result.person_relative
    detail = step_candidates(result, sub, test, info, cache)
    return _scores(test, {"expression": probs}, ["expression"]), info.get("variant", info.get("best", "-")), detail


def step_candidates(result, sub: DataIndex, test: pd.DataFrame, info: dict, cache: ImageCache) -> dict:
    """Every candidate of fit's step: its validation accuracy and log-loss (``step_val_*``, ``step_nll_*``;
    the head's too) and, for each classifier, its test accuracy had fit carried it (refitted on every
    picture fit was given, as fit does: ``step_test_*``), to weigh other ways of choosing later."""
    detail = {}
    for name, score in info.get("scores", {}).items():
        key = name.replace(" ", "_")
        detail[f"step_val_{key}"], detail[f"step_nll_{key}"] = score["accuracy"], score["log_loss"]
    images = {name: decode_images(DataIndex(t, []), result.preprocess, cache, None)
              for name, t in (("fit", sub.table), ("test", test))}
    features = {name: trunk_features(result.model, im, result.preprocess) for name, im in images.items()}
    own = predict_images(result.model, images["test"], result.preprocess)["expression"]
    labels = encode_targets(sub.table, ["expression"])["expression"]
    for name in CLASSIFIERS:
        clf = fit_person_relative(features["fit"], persons_in(sub.table), labels, MIN_PICTURES, name)
        if clf is not None:
            result.model.relative = clf
            probs = with_person_relative(result.model, images["test"], result.preprocess, persons_in(test), own)
            detail[f"step_test_{name.replace(' ', '_')}"] = _scores(test, {"expression": probs}, ["expression"])[
                "expression"][0]
    result.model.relative = None
    return detail


def person_relative(train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame, models: dict,
                    cache: ImageCache) -> dict[str, tuple[dict, float | None]]:
    """The person-relative expression classifier (facemt.relative) on the trunk of each model (the
    fine-tuned one, the start one), fitted on fit's training persons (``relative-*``) or on every
    person fit was given (``relative-*-all``): per arm, (test scores of expression, validation accuracy).
    Faces of persons with too few pictures are answered by that model's own expression head."""
    if test["expression"].isna().all():
        return {}
    val_persons = set(val["person"])
    out = {}
    for name, model in models.items():
        net, preprocess = (model.model, model.preprocess) if name == "tuned" else model[:2]
        tables = {"train": train, "test": test}
        feats = {k: trunk_features(net, decode_images(DataIndex(t, []), preprocess, cache, None), preprocess)
                 for k, t in tables.items()}
        y = encode_targets(train, ["expression"])["expression"]
        own = _probs(net, preprocess, test, cache)["expression"]
        is_val = train["person"].isin(val_persons).to_numpy()
        for suffix, rows in (("", ~is_val), ("-all", np.ones(len(train), bool))):
            head = fit_person_relative(feats["train"][rows], train["person"][rows].tolist(), y[rows])
            if head is None:
                continue
            val_acc = None
            if suffix == "":
                p = head.probabilities(feats["train"][is_val], train["person"][is_val].tolist())
                yv, ok = y[is_val], ~np.isnan(p).any(axis=1) & (y[is_val] >= 0)
                val_acc = float((p[ok].argmax(1) == yv[ok]).mean()) if ok.any() else None
            p = head.probabilities(feats["test"], test["person"].tolist())
            p = np.where(np.isnan(p), own, p)
            out[f"relative-{name}{suffix}"] = (_scores(test, {"expression": p}, ["expression"]), val_acc)
    return out


def summarize(records: pd.DataFrame) -> pd.DataFrame:
    """Per set, head and variant: mean accuracies and paired differences (95 % t-intervals over folds)."""
    out = []
    key = ["set", "head", "variant"]
    wide = records.pivot_table(index=key + ["fold"], columns="arm", values="accuracy").reset_index()
    defaults = wide[wide["variant"] == "defaults"].set_index(["set", "head", "fold"])
    for (name, head, variant), g in wide.groupby(key, sort=False):
        g = g.set_index("fold")
        row = {"set": name, "head": head, "variant": variant, "folds": len(g),
               "untouched": g["untouched"].mean(), "tuned": g["tuned"].mean()}
        row["tuned_gain"], row["tuned_low"], row["tuned_high"] = paired_interval((g["tuned"] - g["untouched"]).dropna())
        if "blend" in g and g["blend"].notna().any():
            row["blend"] = g["blend"].mean()
            row["blend_gain"], row["blend_low"], row["blend_high"] = paired_interval((g["blend"] - g["untouched"]).dropna())
        if "fit" in g and g["fit"].notna().any():
            row["fit"] = g["fit"].mean()
            row["fit_gain"], row["fit_low"], row["fit_high"] = paired_interval((g["fit"] - g["untouched"]).dropna())
        if variant != "defaults" and (name, head) in defaults.index.droplevel("fold"):
            ref = defaults.loc[(name, head)]["tuned"]
            d = (g["tuned"] - ref.reindex(g.index)).dropna()
            row["vs_defaults"], row["vs_low"], row["vs_high"] = paired_interval(d)
        out.append(row)
    return pd.DataFrame(out).sort_values(["set", "head"], kind="stable").reset_index(drop=True)


def pooled(records: pd.DataFrame) -> pd.DataFrame:
    """Per variant, over every set, labelled head and fold together: tuned minus the defaults (all heads,
    and expression alone), and what fit writes minus untouched with the count of cells below untouched.
    The cells of one fold share a model, so the intervals are rough (pairs are not independent)."""
    wide = records.pivot_table(index=["set", "head", "variant", "fold"], columns="arm", values="accuracy")
    wide = wide.dropna(subset=["tuned"]).reset_index()
    ref = wide[wide["variant"] == "defaults"].set_index(["set", "head", "fold"])["tuned"]
    out = []
    for variant, g in wide.groupby("variant", sort=False):
        g = g.set_index(["set", "head", "fold"])
        row = {"variant": variant, "cells": len(g)}
        if variant != "defaults":
            d = (g["tuned"] - ref.reindex(g.index)).dropna()
            row["all"] = paired_interval(d)
            row["expression"] = paired_interval(d[d.index.get_level_values("head") == "expression"])
        if "fit" in g:
            gain = (g["fit"] - g["untouched"]).dropna()
            row["fit"], row["below"] = paired_interval(gain), int((gain < -1e-9).sum())
        out.append(row)
    return pd.DataFrame(out)


#: fit's own tie-break (an accuracy tie on the validation persons keeps the start), then the others weighed:
#: the fine-tuned head when its validation accuracy is one validation face (1/n) or more above the start model's
#: on every face fit was given; the lower validation log-loss; always the fine-tuned head
FIT_RULE = "start"
OVERALL_RULE = "fine-tuned if 1 face over the start overall"
TIE_RULES = (FIT_RULE, OVERALL_RULE, "log-loss", "fine-tuned")
#: fit's rule, then fit's person-relative step: the classifier (refitted on every person fit was given,
#: arm ``relative-tuned-all``) answers expression when its validation accuracy (arm ``relative-tuned``)
#: beats that of the head the rule chose
RELATIVE_RULE = "start, then person-relative"
RELATIVE_ARM = "relative-tuned-all"
#: the arm of the model fit writes with its person-relative step as fit runs it (three classifiers, from part 6)
STEP_ARM = "step"


def start_on_fit_faces(wide: pd.DataFrame) -> pd.Series:
    """Per (set, variant, head, fold) cell: the start model's accuracy on the faces fit was given in that fold,
    i.e. every other fold's test persons (fit's training and validation persons), from the recorded test
    scores: exactly what fit measures as ``untouched_all``. NaN where a variant lacks folds that other
    variants of the set have (a run cut short)."""
    hits = wide["untouched"] * wide["n"]
    cell = [wide.index.get_level_values(k) for k in ("set", "variant", "head")]
    folds = wide["n"].groupby(cell).transform("size")
    most = folds.groupby([cell[0], cell[2]]).transform("max")
    out = (hits.groupby(cell).transform("sum") - hits) / (wide["n"].groupby(cell).transform("sum") - wide["n"])
    return out.where(folds == most)


def rules(records: pd.DataFrame) -> pd.DataFrame:
    """What each tie-break of the never-worse rule would have answered in every (set, variant, fold, head)
    cell with validation evidence, from the recorded validation scores: test accuracy minus untouched."""
    keys = ["set", "variant", "fold", "head"]
    wide = records.pivot_table(index=keys, columns="arm", values="accuracy")
    cols = ["val_tuned", "val_untouched", "val_nll_tuned", "val_nll_untouched"]
    if not set(cols) <= set(records.columns):
        return pd.DataFrame()
    wide = wide.join(records[records["arm"] == "untouched"].set_index(keys)["n"])
    wide = wide.reorder_levels(["set", "variant", "head", "fold"])
    wide["start_all"] = start_on_fit_faces(wide)
    recorded = cols + ["val_n"] if "val_n" in records.columns else cols  # val_n: since part 3 (backfilled before)
    evidence = records[records["arm"] == "tuned"].set_index(keys)[recorded].reorder_levels(wide.index.names)
    wide = wide.join(evidence).dropna(subset=["tuned", *cols[:2]])
    if "val_n" not in wide:
        wide["val_n"] = np.nan
    if "val_relative" in records.columns:
        relative = records[records["arm"] == "relative-tuned"].set_index(keys)["val_relative"].rename("val_rel")
        wide = wide.join(relative.reorder_levels(wide.index.names))
    out = []
    for (name, variant, head, fold), r in wide.iterrows():
        for rule in TIE_RULES:
            if rule == "log-loss" and pd.isna(r["val_nll_tuned"]):
                continue  # not recorded: a refit model, or a run before log-losses were
            losses = {"fine-tuned": ({head: -np.inf}, {head: 0.0}),
                      "log-loss": ({head: r["val_nll_tuned"]}, {head: r["val_nll_untouched"]})}.get(rule)
            known = rule == OVERALL_RULE and np.isfinite(r["start_all"]) and r["val_n"] > 0
            overall = ({head: r["start_all"]}, {head: int(r["val_n"])}) if known else None
            kept = heads_to_keep({f"val_{head}_acc": r["val_tuned"]}, {head: r["val_untouched"]}, [head], [head],
                                 overall=overall, losses=losses)
            answer = r["untouched"] if head in kept else r["tuned"]
            out.append({"rule": rule, "set": name, "variant": variant, "fold": fold, "head": head,
                        "untouched": r["untouched"], "gain": answer - r["untouched"]})
            if rule == FIT_RULE and pd.notna(r.get("val_rel")) and pd.notna(r.get(RELATIVE_ARM)):
                chosen = r["val_untouched"] if head in kept else r["val_tuned"]
                answer = r[RELATIVE_ARM] if r["val_rel"] > chosen else answer
                out.append({**out[-1], "rule": RELATIVE_RULE, "gain": answer - r["untouched"]})
    return pd.DataFrame(out)


def _pct(mean, low=None, high=None) -> str:
    if mean is None or not np.isfinite(mean):
        return "-"
    text = f"{100 * mean:+.1f}" if low is not None else f"{100 * mean:.1f}"
    if low is not None and np.isfinite(low):
        text += f" [{100 * low:+.1f}, {100 * high:+.1f}]"
    return text


def markdown(summary: pd.DataFrame, records: pd.DataFrame, title: str, command: str) -> list[str]:
    lines = [f"\n### {title}\n", "```", command, "```", "",
             "| set | head | variant | untouched % | tuned % | tuned - untouched | blend % | blend - untouched | "
             "fit % (never-worse) | fit - untouched | tuned - defaults |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        get = lambda name: getattr(r, name, float("nan"))  # noqa: E731
        lines.append(f"| {r.set} | {r.head} | {r.variant} | {_pct(r.untouched)} | {_pct(r.tuned)} | "
                     f"{_pct(r.tuned_gain, r.tuned_low, r.tuned_high)} | {_pct(get('blend'))} | "
                     f"{_pct(get('blend_gain'), get('blend_low'), get('blend_high'))} | {_pct(get('fit'))} | "
                     f"{_pct(get('fit_gain'), get('fit_low'), get('fit_high'))} | "
                     f"{_pct(get('vs_defaults'), get('vs_low'), get('vs_high'))} |")
    lines += ["", "Differences are percentage points, paired over folds, with 95 % t-intervals.", "",
              "Pooled over sets, labelled heads and folds (rough intervals: the heads of a fold share a model):", "",
              "| variant | cells | tuned - defaults, every head | tuned - defaults, expression | "
              "fit - untouched | cells with fit below untouched |", "|---|---|---|---|---|---|"]
    for r in pooled(records).to_dict("records"):
        cell = lambda key: _pct(*r[key]) if isinstance(r.get(key), tuple) else "-"  # noqa: E731
        lines.append(f"| {r['variant']} | {r['cells']} | {cell('all')} | {cell('expression')} | {cell('fit')} | "
                     f"{r.get('below', '-')} |")
    tie = rules(records)
    if len(tie):
        lines += ["", "The never-worse rule's tie-break (an accuracy tie on the validation persons), recomputed from the "
                  "recorded validation scores; fit minus untouched over every cell with validation evidence, and the "
                  "issue's two targets: the lowest mean of a set's head (>= 0 wanted) and the share of the distance "
                  "from untouched to 100 % closed on expression per set (half wanted on average):", "",
                  "| variant | a tie goes to | mean gain | cells below untouched | cells above | lowest set and head | "
                  "expression: distance to 100 % closed |", "|---|---|---|---|---|---|---|"]
        for (variant, rule), g in tie.groupby(["variant", "rule"], sort=False):
            per = g.groupby(["set", "head"])["gain"].mean()
            closed = {s_: e["gain"].mean() / (1 - e["untouched"].mean())
                      for s_, e in g[g["head"] == "expression"].groupby("set") if e["untouched"].mean() < 1}
            worst = per.idxmin()
            lines.append(f"| {variant} | {rule} | {_pct(*paired_interval(g['gain']))} | "
                         f"{int((g['gain'] < -1e-9).sum())} of {len(g)} | {int((g['gain'] > 1e-9).sum())} | "
                         f"{worst[0]} {worst[1]} {100 * per.min():+.1f} | "
                         + ", ".join(f"{k} {100 * v:.0f} %" for k, v in closed.items())
                         + (f" (mean {100 * np.mean(list(closed.values())):.0f} %)" if closed else "") + " |")
    return lines


def over_draws(frames: list[pd.DataFrame], variant: str = "defaults", rule: str = FIT_RULE,
               arm: str | None = None) -> list[str]:
    """Fit's rule (a tie keeps the start; ``RELATIVE_RULE``: then the person-relative step of part 5) over
    several draws of folds (one ``--csv`` per ``--seed``), per set and head: fit minus untouched over every
    (draw, fold), with the issue's two targets. A cell without the step's evidence (no such arm recorded)
    keeps fit's answer; ``arm`` (e.g. :data:`STEP_ARM`): where recorded, that arm's test accuracy answers."""
    cells = []
    for draw, records in enumerate(frames):
        records = records[records["variant"] == variant]
        tie = rules(records)
        fit_cells = tie[tie["rule"] == FIT_RULE].set_index(["set", "fold", "head"])
        chosen = tie[tie["rule"] == rule].set_index(["set", "fold", "head"])
        fit_cells.loc[chosen.index, "gain"] = chosen["gain"]
        if arm is not None:
            answered = records[records["arm"] == arm].set_index(["set", "fold", "head"])["accuracy"]
            answered = answered[answered.index.isin(fit_cells.index)]
            fit_cells.loc[answered.index, "gain"] = answered - fit_cells.loc[answered.index, "untouched"]
        cells.append(fit_cells.reset_index().assign(draw=draw))
    every = pd.concat(cells)
    lines = ["| set | head | fold results | untouched % | fit - untouched | below untouched | "
             "expression: distance to 100 % closed |", "|---|---|---|---|---|---|---|"]
    for (name, head), g in every.groupby(["set", "head"]):
        base = g["untouched"].mean()
        closed = g["gain"].mean() / (1 - base) if head == "expression" and base < 1 else None
        lines.append(f"| {name} | {head} | {len(g)} | {_pct(g['untouched'].mean())} | "
                     f"{_pct(*paired_interval(g['gain']))} | {int((g['gain'] < -1e-9).sum())} | "
                     f"{'-' if closed is None else f'{100 * closed:.0f} %'} |")
    sets = every[every["head"] == "expression"].groupby("set")[["untouched", "gain"]].mean()
    sets = sets[sets["untouched"] < 1]
    if len(sets):  # the issue's "on average": per set, or of the sets' mean accuracy
        lines += ["", f"Expression over {len(sets)} sets: the mean of the sets' shares closed "
                  f"{100 * (sets['gain'] / (1 - sets['untouched'])).mean():.0f} %; the share closed of the sets' mean "
                  f"accuracy ({_pct(sets['untouched'].mean())} -> {_pct((sets['untouched'] + sets['gain']).mean())} %) "
                  f"{100 * sets['gain'].mean() / (1 - sets['untouched']).mean():.0f} %."]
    return lines


def pooled_evidence(run: pd.DataFrame, evidence: pd.DataFrame, groups: int | None = None) -> pd.DataFrame:
    """Per set, fold and labelled head of ``run`` (a study CSV's ``defaults`` rows): the test accuracy of the
    start model (``untouched``), of what fit writes deciding on its own validation persons (``own``: the
    recorded ``fit`` arm, or ``step`` for expression where recorded) and deciding on those persons and the
    first ``groups`` of :func:`evidence_fold`'s groups together (``pooled``): the never-worse rule on the
    pooled correct counts (a tie keeps the start), then the step's candidate with the most pooled correct
    answers (a tie: the lower mean log-loss; the head first). The fold's own validation faces for the step
    are counted as ``val_n`` (every person of the sets it applies to has 3+ pictures)."""
    run = run[run["variant"] == "defaults"]
    out = []
    for (name, fold), g in run.groupby(["set", "fold"]):
        acc = g.pivot_table(index="head", columns="arm", values="accuracy")
        ev = evidence[(evidence["set"] == name) & (evidence["fold"] == fold)]
        ev = ev[ev["group"] <= groups] if groups else ev
        tuned_rows = g[g["arm"] == "tuned"].set_index("head")
        for h in acc.index:
            step = g[(g["arm"] == STEP_ARM) & (g["head"] == h)]
            r = tuned_rows.loc[h] if h in tuned_rows.index else None
            evidence_here = r is not None and pd.notna(r["val_n"]) and r["val_n"] > 0
            if len(step):
                own = step["accuracy"].iloc[0]
            elif "fit" in acc and pd.notna(acc.loc[h, "fit"]):
                own = acc.loc[h, "fit"]
            else:  # fit's rule recomputed (draws whose fit rows were dropped): a tie keeps the start
                own = acc.loc[h, "untouched" if not evidence_here or r["val_tuned"] <= r["val_untouched"] else "tuned"]
            cell = {"set": name, "fold": fold, "head": h, "untouched": acc.loc[h, "untouched"], "own": own,
                    "pooled": own, "groups": 0}
            e = ev[ev["head"] == h]
            if not evidence_here or not len(e):
                out.append(cell)
                continue
            tuned = r["val_tuned"] * r["val_n"] + (e["val_tuned"] * e["val_n"]).sum()
            start = r["val_untouched"] * r["val_n"] + (e["val_untouched"] * e["val_n"]).sum()
            keep = tuned <= start + 1e-6
            answer = acc.loc[h, "untouched" if keep else "tuned"]
            if len(step) and "step_n" in e:
                answer = _pooled_step(step.iloc[0], r, e, keep, answer)
            out.append({**cell, "pooled": answer, "groups": len(e), "kept": keep})
    return pd.DataFrame(out)


def _pooled_step(step: pd.Series, r: pd.Series, e: pd.DataFrame, keep: bool, head_test: float) -> float:
    """The step's choice on pooled evidence as fit makes it with ``--validation-groups``
    (:func:`facemt.relative.pooled_scores`, :func:`facemt.relative.best_candidate`) and its test accuracy:
    fit's own group with its head as the pooled never-worse rule left it (``keep``), each other group with
    its head as that group's own fit left it (``step_val_head``)."""
    names = ["head", *(c for c in CANDIDATES[1:] if pd.notna(step.get(f"step_val_{c}")))]
    own = {"val_images": r["val_n"], "scores": {
        c: {"accuracy": r["val_untouched" if keep else "val_tuned"] if c == "head" else step[f"step_val_{c}"],
            "log_loss": step[f"step_nll_{c}"]} for c in names}}
    groups = [{"val_images": g["step_n"], "scores": {
        c: {"accuracy": g[f"step_val_{c}"], "log_loss": g[f"step_nll_{c}"]}
        for c in names if pd.notna(g.get(f"step_val_{c}"))}} for _, g in e.iterrows()]
    best = best_candidate(pooled_scores([own, *groups])["scores"])
    return head_test if best == "head" else step[f"step_test_{best}"]


def evidence_lines(cells: pd.DataFrame) -> list[str]:
    """Per set and head: fit deciding on its own validation persons against deciding on pooled evidence."""
    lines = ["| set | head | fold results | untouched % | fit (own evidence) - untouched | fit (pooled evidence) - "
             "untouched | pooled - own | below untouched (own / pooled) | expression: distance closed (own / pooled) |",
             "|---|---|---|---|---|---|---|---|---|"]
    shares = {"own": [], "pooled": []}
    for (name, head), g in cells.groupby(["set", "head"]):
        base = g["untouched"].mean()
        closed = {k: (g[k].mean() - base) / (1 - base) for k in shares} if head == "expression" and base < 1 else {}
        for k, v in closed.items():
            shares[k].append(v)
        lines.append(f"| {name} | {head} | {len(g)} | {_pct(base)} | {_pct(*paired_interval(g['own'] - g['untouched']))} | "
                     f"{_pct(*paired_interval(g['pooled'] - g['untouched']))} | "
                     f"{_pct(*paired_interval(g['pooled'] - g['own']))} | {int((g['own'] < g['untouched'] - 1e-9).sum())} / "
                     f"{int((g['pooled'] < g['untouched'] - 1e-9).sum())} | "
                     + (f"{100 * closed['own']:.0f} % / {100 * closed['pooled']:.0f} %" if closed else "-") + " |")
    if shares["own"]:
        lines += ["", f"Expression, the mean of the sets' shares of the distance to 100 % closed: own evidence "
                  f"{100 * np.mean(shares['own']):.0f} %, pooled {100 * np.mean(shares['pooled']):.0f} %."]
    return lines


def step_choices(frames: list[pd.DataFrame], variant: str = "defaults") -> list[str]:
    """How often fit's person-relative step chose each classifier (or the head), per set, over the draws."""
    steps = pd.concat([f[(f["arm"] == STEP_ARM) & (f["variant"] == variant)] for f in frames if "step_choice" in f])
    return ["What the step chose, per set over every fold result: " + "; ".join(
        f"{name} " + ", ".join(f"{choice} {n}" for choice, n in g["step_choice"].value_counts().items())
        for name, g in steps.groupby("set")) + "."]


#: the step's candidates as the study's columns name them (``step_val_*``, ``step_nll_*``, ``step_test_*``)
CANDIDATES = ("head", *(c.replace(" ", "_") for c in CLASSIFIERS))


def step_rules(frames: list[pd.DataFrame], variant: str = "defaults") -> list[str]:
    """Ways of choosing among the step's candidates, from the evidence the step arm records (draws
    without it are left out): per set, the mean test expression accuracy of fit's choice (the most
    accurate on validation, then the lowest log-loss), of the lowest validation log-loss alone, of each
    candidate always, and of the best on the test persons (hindsight: no rule can reach it)."""
    cells = []
    for f in frames:
        if "step_test_centred" not in f:
            continue
        f = f[f["variant"] == variant]
        head = f[f["arm"] == "fit"].set_index(["set", "fold", "head"])["accuracy"]
        for _, r in f[f["arm"] == STEP_ARM].iterrows():
            test = {c: head.get((r["set"], r["fold"], r["head"])) if c == "head" else r.get(f"step_test_{c}")
                    for c in CANDIDATES}
            scored = [c for c in CANDIDATES if pd.notna(test[c]) and pd.notna(r.get(f"step_nll_{c}"))]
            if not scored:
                continue
            cells.append({"set": r["set"], "fit's choice": r["accuracy"],
                          "lowest validation log-loss": test[min(scored, key=lambda c: (r[f"step_nll_{c}"], c != "head"))],
                          **{f"always {c.replace('_', ' ')}": test[c] for c in scored},
                          "best on test (hindsight)": max(test[c] for c in scored)})
    if not cells:
        return []
    table = pd.DataFrame(cells).groupby("set").agg(["mean", "count"])
    columns = list(dict.fromkeys(c for c, _ in table.columns))
    lines = ["| set | fold results | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for name, r in table.iterrows():
        lines.append(f"| {name} | {int(r[(columns[0], 'count')])} | "
                     + " | ".join("-" if pd.isna(r[(c, 'mean')]) else _pct(r[(c, "mean")]) for c in columns) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", type=Path)
    p.add_argument("--split", type=Path, default=SPLIT_FILE, help="the studio test persons (default %(default)s)")
    p.add_argument("--no-shared", action="store_true", help="only the --set sets")
    p.add_argument("--set", action="append", default=[], metavar="NAME=PATH", help="another labelled set")
    p.add_argument("--only", default="defaults,epochs-8,linear-probe,lp-ft,lr-0.3x,label-smoothing-0.1,"
                   "layer-decay-0.7,augment-light", help=f"variants, comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--sets", help="only these sets, comma-separated")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--persons", type=int, help="each set cut to this many persons (drawn with seed 0; sets with no "
                                                "more persons left out): a user with fewer photos")
    p.add_argument("--seed", type=int, default=0, help="draws the folds, the --persons and fit's seed (default "
                                                        "%(default)s): another seed, another study of the same sets")
    p.add_argument("--model", default="base", help="the start model (fit --init-from)")
    p.add_argument("--train", default="", help="fit options as KEY=VALUE,... for every variant (e.g. epochs=2)")
    p.add_argument("--csv", type=Path, help="write every fold's scores here as they come")
    p.add_argument("--results", type=Path)
    p.add_argument("--summarize", type=Path, metavar="CSV", help="only write the table of a --csv (a run cut short)")
    p.add_argument("--draws", type=Path, nargs="+", metavar="CSV", help="only write fit's defaults over these --csv "
                   "files, one per --seed, pooled")
    p.add_argument("--manifests", type=Path, metavar="DIR", help="only write each set as DIR/NAME.csv for facemt cv")
    p.add_argument("--evidence", type=int, metavar="K", help="only run fit again on each fold with K other groups "
                   "of validation persons (evidence_fold), writing their validation scores to --csv")
    p.add_argument("--pooled", type=Path, nargs=2, action="append", metavar=("RUN_CSV", "EVIDENCE_CSV"),
                   help="only compare fit deciding on its own validation persons with deciding on them and an "
                        "--evidence run's groups (repeatable: one pair per --seed)")
    args = p.parse_args(argv)
    if args.pooled:
        cells = pd.concat([pooled_evidence(pd.read_csv(a), pd.read_csv(b)) for a, b in args.pooled])
        lines = ["\n### Fit's choices on more evidence\n", "```", f"python benchmarks/finetune.py {' '.join(argv)}",
                 "```", "", *evidence_lines(cells)]
        if args.results:
            publish(lines, args.results)
        else:
            print("\n".join(lines))
        return 0
    if args.draws:
        frames = [pd.read_csv(f) for f in args.draws]
        lines = [f"\n### Fit's defaults over {len(args.draws)} draws of folds\n", "```",
                 f"python benchmarks/finetune.py {' '.join(argv)}", "```", "", *over_draws(frames)]
        if any("val_relative" in f.columns for f in frames):
            lines += ["", "With fit's person-relative step (expression read against each test person's other "
                      "pictures where it beat the chosen head on the validation persons):", "",
                      *over_draws(frames, rule=RELATIVE_RULE)]
        if any(STEP_ARM in set(f["arm"]) for f in frames):
            lines += ["", "With fit's person-relative step as fit runs it now (the best of three classifiers and the "
                      "head on the validation persons; draws without the arm keep fit's answer):", "",
                      *over_draws(frames, arm=STEP_ARM), "", *step_choices(frames)]
            rules_ = step_rules(frames)
            if rules_:
                lines += ["", "Ways of choosing among the step's candidates (mean test expression accuracy %, "
                          "fold results with every candidate's evidence):", "", *rules_]
        if args.results:
            publish(lines, args.results)
        else:
            print("\n".join(lines))
        return 0
    if args.summarize:
        return _publish(pd.read_csv(args.summarize), argv, f"from {args.summarize}", args.results)
    variants = [v.strip() for v in args.only.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    sets = {} if args.no_shared or args.data_root is None else shared_sets(args.data_root, args.split)
    sets.update({name: load_sources([path]) for name, path in (s.split("=", 1) for s in args.set)})
    if args.sets:
        sets = {k: v for k, v in sets.items() if k in args.sets.split(",")}
    if args.persons:
        sets = {f"{k}[{args.persons}]": subset(v, args.persons, args.seed) for k, v in sets.items()
                if v.table["person"].nunique() > args.persons}
    if args.manifests:
        return write_manifests(sets, args.manifests)
    base = TrainConfig(init_from=args.model, device="cpu", seed=args.seed)
    base = replace(base, **{k: type(getattr(base, k))(v) for k, v in (kv.split("=") for kv in args.train.split(",") if kv)})
    start = load_checkpoint(initial_weights(base), map_location="cpu")
    cache, records, started = ImageCache(), [], time.perf_counter()
    folds = {name: make_folds(index.table, "subject", args.folds, args.seed) for name, index in sets.items()}
    if args.evidence:
        for name, index in sets.items():
            for k, (train_rows, _) in enumerate(folds[name]):
                print(f"{name} evidence fold {k + 1}/{len(folds[name])} ({time.perf_counter() - started:.0f} s)", flush=True)
                for row in evidence_fold(index, train_rows, base, cache, args.evidence):
                    records.append({"set": name, "variant": "defaults", "fold": k, **row})
                if args.csv:
                    pd.DataFrame(records).to_csv(args.csv, index=False)
        print(f"{len(records)} evidence rows ({time.perf_counter() - started:.0f} s)")
        return 0
    for variant in variants:  # variant by variant: a run cut short still has every set for the first ones
        for name, index in sets.items():
            for k, (train_rows, test) in enumerate(folds[name]):
                print(f"{name} {variant} fold {k + 1}/{len(folds[name])} ({time.perf_counter() - started:.0f} s)", flush=True)
                for row in run_fold(index, train_rows, test, _config(base, VARIANTS[variant]), cache, start):
                    records.append({"set": name, "variant": variant, "fold": k, **row})
                if args.csv:
                    pd.DataFrame(records).to_csv(args.csv, index=False)
    return _publish(pd.DataFrame(records), argv, f"from `{args.model}` ({time.perf_counter() - started:.0f} s)",
                    args.results)


def write_manifests(sets: dict[str, DataIndex], folder: Path) -> int:
    """Each set as ``folder/NAME.csv`` (path, person and the three labels), the folder ``facemt cv`` reads."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, index in sets.items():
        path = folder / f"{name}.csv"
        index.table[["path", "person", *TASKS]].to_csv(path, index=False)
        print(f"{path}: {len(index.table)} pictures of {index.table['person'].nunique()} persons")
    return 0


def _publish(records: pd.DataFrame, argv: list[str], what: str, results: Path | None) -> int:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                            text=True).stdout.strip()
    lines = markdown(summarize(records), records, f"Fine-tuning study {what} at commit {commit}",
                     f"python benchmarks/finetune.py {' '.join(argv)}")
    if results:
        publish(lines, results)
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
