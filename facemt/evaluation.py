"""Splits, metrics and reports."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import pandas as pd

from facemt.data import DataIndex, ImageCache, encode_targets, persons_in
from facemt.splits import make_folds, person_groups
from facemt.errors import FacemtError
from facemt.losses import expected_calibration_error
from facemt.tasks import PERSON_HEADS, TASKS, has_pairs, per_person

if TYPE_CHECKING:
    from facemt.engine import TrainConfig

log = logging.getLogger(__name__)


# ----------------------------------------------------------------- metrics

def head_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, macro-F1, per-class precision/recall, confusion
    matrix and ECE for one head (rows with label -1 are ignored)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support

    mask = y_true >= 0
    y, p = y_true[mask], probs[mask]
    labels = list(range(len(classes)))
    if len(y) == 0:
        return {"n": 0}
    pred = p.argmax(1)
    precision, recall, _, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    present = support > 0
    return {
        "n": int(len(y)),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": float(recall[present].mean()),
        # Over the classes present in the test labels: a class the test set lacks has no F1 to average.
        "macro_f1": float(f1_score(y, pred, labels=[i for i in labels if present[i]], average="macro",
                                   zero_division=0)),
        "ece": expected_calibration_error(y, p),
        "per_class": {
            c: {"precision": float(precision[i]), "recall": float(recall[i]), "support": int(support[i])}
            for i, c in enumerate(classes)
        },
        "confusion": confusion_matrix(y, pred, labels=labels).tolist(),
        "classes": list(classes),
    }


def evaluate_predictions(table: pd.DataFrame, probs: dict[str, np.ndarray]) -> dict[str, dict]:
    """:func:`head_metrics` for every head in ``probs`` against the table's labels."""
    targets = encode_targets(table, list(probs))
    return {t: head_metrics(targets[t], probs[t], TASKS[t].classes) for t in probs}


def evaluation_notes(config: dict, tasks: Sequence[str], table: pd.DataFrame) -> list[str]:
    """What a score of a saved model on labelled ``table`` leaves out or cannot
    reach: labelled heads the model lacks, and classes in the labels that the
    model never saw in training (its recorded ``class_counts``)."""
    notes = []
    missing = [t for t in TASKS if t not in tasks and table[t].notna().any()]
    if missing:
        notes.append(f"the data has {', '.join(missing)} labels, but the model has no such head: not scored")
    for task, counts in (config.get("class_counts") or {}).items():
        if task not in tasks:
            continue
        present = table[task].value_counts()
        unseen = [(c, int(present[c])) for c, n in zip(TASKS[task].classes, counts) if n == 0 and c in present]
        for c, n in unseen:
            notes.append(f"{task}: the model saw no {c!r} images in training; it can hardly get these {n} right")
    seen = seen_in_fit(config, table)
    if seen:
        trained, validated = seen
        notes.append(f"{trained + validated} of these {len(table)} images are in the data this run was fit on "
                     f"({trained} trained on, {validated} of its validation persons): "
                     "accuracy on them is no test of unseen faces; measure that with 'facemt cv'")
    return notes


def seen_in_fit(config: dict, table: pd.DataFrame) -> tuple[int, int] | None:
    """How many rows of ``table`` the run (its ``config``) was fit on: (trained on, of its validation
    persons), from the data sources ``facemt fit`` recorded, read again; None for a model not written by
    fit (the built-in base has its own held-out lists), when no row is among them, or when the sources
    can no longer be read or now hold another number of images than fit used (files added or removed
    since: which ones fit saw can no longer be told)."""
    from facemt.data import load_sources

    split = config.get("split") or {}
    if not config.get("sources") or "val_persons" not in split:
        return None
    try:
        fitted = load_sources(config["sources"]).table
    except (FacemtError, OSError):
        return None
    if len(fitted) != split.get("train_images", 0) + split.get("val_images", 0):
        return None
    persons = dict(zip(fitted["path"], fitted["person"]))
    shared = [p for p in table["path"] if p in persons]
    if not shared:
        return None
    held_out = set(split["val_persons"])
    validated = sum(persons[p] is not None and persons[p] in held_out for p in shared)
    return len(shared) - validated, validated


def person_consistency(table: pd.DataFrame, predicted: dict[str, np.ndarray],
                       heads: Sequence[str] = PERSON_HEADS) -> pd.DataFrame:
    """For every person with two or more pictures and every head of ``heads``: whether the
    predicted label changes across that person's pictures. Needs no true labels: any
    change is an error.

    Args:
        table: one row per picture with a ``person`` column (and ``source``, so that
            person ``01`` of two sets are two people).
        predicted: head -> predicted class name per row of ``table``.
        heads: the heads to check (those missing from ``predicted`` are skipped).

    Returns:
        one row per person and head: ``source, person, head, pictures, labels`` (how
        many different labels were given), ``changed`` (bool) and ``majority``
        (the share of the person's pictures with their most frequent label).
    """
    rows = []
    keys = table["source"].astype(str) if "source" in table else pd.Series("", index=table.index)
    persons = table["person"].astype(str)
    for head in [h for h in heads if h in predicted]:
        labels = pd.Series(np.asarray(predicted[head]), index=table.index)
        for (source, person), idx in labels.groupby([keys, persons]).groups.items():
            values = labels.loc[idx]
            if len(values) < 2:
                continue
            counts = values.value_counts()
            rows.append({"source": source, "person": person, "head": head, "pictures": len(values),
                         "labels": len(counts), "changed": len(counts) > 1,
                         "majority": float(counts.iloc[0] / len(values))})
    return pd.DataFrame(rows, columns=["source", "person", "head", "pictures", "labels", "changed", "majority"])


def recall_by(table: pd.DataFrame, predicted: dict[str, np.ndarray], head: str, by: str) -> pd.DataFrame:
    """Recall of ``head`` for each of its true classes within each value of column ``by``
    (gender recall per expression, say): columns ``by, head, n, recall``; rows without
    both labels are left out."""
    known = table[head].notna() & table[by].notna()
    frame = pd.DataFrame({"by": table.loc[known, by].astype(str), "class": table.loc[known, head].astype(str),
                          "right": np.asarray(predicted[head])[known.to_numpy()] == table.loc[known, head].to_numpy()})
    out = frame.groupby(["by", "class"]).agg(n=("right", "size"), recall=("right", "mean")).reset_index()
    return out.rename(columns={"by": by, "class": head})


# --------------------------------------------------------- cross-validation

SPLITS = ("subject", "random", "both")
RANDOM_SPLIT_WARNING = (
    "random split with known persons: the same person appears in training and test, so age group "
    "and gender accuracy measure person recognition (identity leak); use --split subject for honest numbers"
)


def paired_interval(diff: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of paired differences and its two-sided t-interval (NaN bounds for < 2 pairs)."""
    from scipy import stats

    d = np.asarray(diff, dtype=np.float64)
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(d.mean())
    if len(d) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return mean, mean - half, mean + half


def _spread(accuracy: pd.Series, name: str) -> dict:
    """``accuracy``'s mean and std over (seed, fold) as ``name_mean`` / ``name_std``."""
    return {f"{name}_mean": accuracy.mean(), f"{name}_std": accuracy.std(ddof=1) if len(accuracy) > 1 else 0.0}


def _paired(a: pd.Series, b: pd.Series, diff: str) -> dict:
    """a - b paired over (seed, fold): the mean and its 95 % interval as ``diff_mean`` / ``diff_ci_*``."""
    mean, low, high = paired_interval((a - b.reindex(a.index)).dropna())
    return {f"{diff}_mean": mean, f"{diff}_ci_low": low, f"{diff}_ci_high": high}


#: cv's records of a head read per person (:func:`facemt.tasks.per_person`): model -> its name there
PER_PERSON = {"multitask": "per-person", "zero-shot": "zero-shot per-person", "fit": "fit per-person"}


@dataclass
class CVResult:
    """Everything a cross-validation produced.

    Attributes:
        records: one row per protocol x seed x fold x model x head with the
            test metrics (accuracy, balanced_accuracy, macro_f1, ece, n_test,
            majority_accuracy) and the test persons.
        histories: per-epoch curves of every trained model (train and test fold).
        confusion: (protocol, model, head) -> summed confusion matrix.
        config: the training configuration and protocol settings.
        warnings: messages a user must see (e.g. identity leak).
    """

    records: pd.DataFrame
    histories: pd.DataFrame
    confusion: dict[tuple[str, str, str], np.ndarray]
    config: dict
    warnings: list[str] = field(default_factory=list)
    #: with ``explain``: per head and true class the mean map of the multi-task models' test faces
    #: (:func:`facemt.explain.class_average_maps`) and ``mean_face``, the average test face they lie on.
    class_maps: dict | None = None

    def summary(self) -> pd.DataFrame:
        """Per protocol and head: multi-task and single-task mean/std accuracy, the
        paired difference (multi - single) with a 95% t-interval over folds x
        seeds, and the majority-class baseline; when training started from a
        facemt model, that model untouched (``zero_shot_*``) and what
        fine-tuning added to it (``gain_*``: multi-task - zero-shot, paired); what
        ``facemt fit`` writes (``fit_*``, ``fit_gain_*`` over the untouched model); the
        person-relative expression classifier (``person_relative_*``, ``relative_gain_*``
        over the head); age group and gender read per test person (``per_person_*``,
        ``per_person_gain_*`` over each picture alone, and the untouched model read per
        person: ``zero_shot_per_person_*``, ``per_person_zero_gain_*``; fit's model read per person:
        ``fit_per_person_*``, ``fit_per_person_gain_*`` over the untouched model read per person)."""
        rows = []
        for (protocol, head), g in self.records.groupby(["protocol", "head"], sort=False):
            acc = {m: a.set_index(["seed", "fold"])["accuracy"] for m, a in g.groupby("model", sort=False)}
            mt = acc["multitask"]
            row = {"protocol": protocol, "head": head, "pairs": int(len(mt)), **_spread(mt, "multitask"),
                   "majority_mean": g[g["model"] == "multitask"]["majority_accuracy"].mean()}
            if "single" in acc:
                row.update(_spread(acc["single"], "single"), **_paired(mt, acc["single"], "diff"))
            if "zero-shot" in acc:
                row.update(_spread(acc["zero-shot"], "zero_shot"), **_paired(mt, acc["zero-shot"], "gain"))
            if "fit" in acc:  # what `facemt fit` writes, trained on the fold's training persons
                row.update(_spread(acc["fit"], "fit"))
                if "zero-shot" in acc:
                    row.update(_paired(acc["fit"], acc["zero-shot"], "fit_gain"))
            if "person-relative" in acc:  # its gain over the multi-task head: the same network, read per person
                relative = acc["person-relative"]
                row.update(_spread(relative, "person_relative"), **_paired(relative, mt, "relative_gain"))
            together = acc.get(PER_PERSON["multitask"])
            if together is not None:  # age group and gender: one answer from all of a test person's pictures
                row.update(_spread(together, "per_person"), **_paired(together, mt, "per_person_gain"))
                untouched = acc.get(PER_PERSON["zero-shot"])
                if untouched is not None:
                    row.update(_spread(untouched, "zero_shot_per_person"),
                               **_paired(together, untouched, "per_person_zero_gain"))
                fitted = acc.get(PER_PERSON["fit"])
                if fitted is not None:
                    row.update(_spread(fitted, "fit_per_person"))
                    if untouched is not None:
                        row.update(_paired(fitted, untouched, "fit_per_person_gain"))
            rows.append(row)
        out = pd.DataFrame(rows)
        protocols = set(out["protocol"]) if len(out) else set()
        if {"subject", "random"} <= protocols:
            piv = out.pivot(index="head", columns="protocol", values="multitask_mean")
            out["identity_leak_gap"] = out["head"].map(piv["random"] - piv["subject"])
        return out

    def to_json(self) -> dict:
        """JSON-ready form of the whole result."""
        clean = lambda df: json.loads(df.to_json(orient="records"))  # noqa: E731  (NaN -> null)
        return {
            "config": self.config,
            "warnings": self.warnings,
            "summary": clean(self.summary()),
            "records": clean(self.records),
            "confusion": [
                {"protocol": p, "model": m, "head": h, "classes": list(TASKS[h].classes), "matrix": c.tolist()}
                for (p, m, h), c in self.confusion.items()
            ],
        }


#: What the ``majority`` column means, in reports and README. The training fold's majority class is no
#: honest bar under subject-disjoint folds: on a balanced set, leave-one-person-out always trains on more
#: persons of the other gender, so it scores 0 % and any model looks like it learned. The whole set's
#: most frequent class is the best a constant answer can do over all folds together.
BASELINE = ("majority class: always answering the most frequent class of the whole labelled set "
            "(over all folds, this is that class's share: the best any constant answer can score)")


@dataclass(frozen=True)
class _Run:
    """One model to train and test in a cross-validation."""

    protocol: str
    seed: int
    fold: int
    train_rows: np.ndarray
    test_rows: np.ndarray
    model: str  # multitask, fit (what `facemt fit` writes) or single
    tasks: tuple[str, ...]

    @property
    def label(self) -> str:
        single = f" {self.tasks[0]}" if self.model == "single" else ""
        return f"{self.protocol} seed {self.seed} fold {self.fold + 1} {self.model}{single}"

    @property
    def history_name(self) -> str:
        return f"single:{self.tasks[0]}" if self.model == "single" else self.model


def _record(table: pd.DataFrame, y: np.ndarray, run: _Run, model_name: str, head: str, metrics: dict) -> dict:
    """One row of :attr:`CVResult.records`: a model's test metrics on one head and fold, next to the
    accuracy of always answering the most frequent class of the whole labelled set (see :data:`BASELINE`)."""
    from facemt.engine import class_counts

    majority = int(np.argmax(class_counts({head: y}, np.arange(len(y)))[head]))
    test_y = y[run.test_rows]
    test_y = test_y[test_y >= 0]
    persons = sorted({p for p in table["person"].iloc[run.test_rows] if p is not None})
    return {
        "protocol": run.protocol, "seed": run.seed, "fold": run.fold, "model": model_name, "head": head,
        "accuracy": metrics["accuracy"], "balanced_accuracy": metrics["balanced_accuracy"],
        "macro_f1": metrics["macro_f1"], "ece": metrics["ece"], "n_test": metrics["n"],
        "majority_accuracy": float((test_y == majority).mean()), "test_persons": " ".join(persons),
    }


def cross_validate(
    index: DataIndex,
    config: TrainConfig,
    folds: int = 5,
    split: str = "subject",
    seeds: int = 1,
    baselines: bool = True,
    test_size: float | None = None,
    cache: ImageCache | None = None,
    callback: Callable[[str, dict], None] | None = None,
    explain: str | None = None,
    fit_model: bool = True,
) -> CVResult:
    """Train and test the multi-task model and (with ``baselines``) one single-task
    model per head on identical folds and seeds. When training starts from a
    facemt model (``init_from``: the built-in base model by default), that
    model is also scored untouched on every test fold (records with model
    ``zero-shot``), so the report shows what fine-tuning added.

    Args:
        index: labelled images.
        config: training settings shared by every model (``seed`` is the first seed).
        folds: number of folds (subject: leave-one-person-out when persons <= folds).
        split: ``subject``, ``random`` or ``both``.
        seeds: repeats with seeds ``config.seed .. config.seed + seeds - 1``
            (each seed draws new folds and new initialisations).
        baselines: also train single-task models.
        test_size: hold out this fraction once per seed instead of K folds.
        cache: decoded images shared by every model.
        callback: receives ``run_start`` / ``run_end`` events plus every
            training event of :func:`facemt.engine.train`.
        explain: an explanation method (:data:`facemt.explain.METHODS`): every
            multi-task model also maps its test faces' evidence for their true
            class per head; ``class_maps`` holds the class averages.
        fit_model: also run :func:`facemt.engine.fit` itself on every fold's
            training persons (its own validation persons among them, the
            never-worse rule, the refit when ``config.refit``, the
            person-relative step) and score
            the model it writes (records with model ``fit``): what ``facemt
            fit`` gives a user with these images. What fit chose on each fold
            is in ``config["fit_folds"]``.

    Returns:
        a :class:`CVResult`.

    Raises:
        FacemtError: bad protocol settings or unusable data.
    """
    from facemt.checkpoint import load_checkpoint, run_name
    from facemt.engine import initial_weights, input_size, resolve_device, resolve_tasks

    _check_protocol(split, folds, seeds, test_size)
    config.validate()
    if explain:
        from facemt.explain import check_method

        check_method(explain)
    tasks = resolve_tasks(index, config.tasks)
    plan, folds_run, messages = _plan(index, config, tasks, folds, split, seeds, baselines, test_size, fit_model)
    cache = cache or ImageCache()
    scorer = _Scorer(index.table, encode_targets(index.table, tasks), cache, config.batch_size)
    explained = _Explained(explain) if explain else None
    # Training that starts from a facemt model (the built-in base by default) is also scored without any
    # training on each test fold: what that model gives out of the box, paired with what fine-tuning adds.
    start = initial_weights(config)
    untouched = load_checkpoint(start, map_location=resolve_device(config.device)) if start else None
    histories, fitted = [], []
    for i, run in enumerate(plan):
        if callback:
            callback("run_start", {"run": i + 1, "runs": len(plan), "label": run.label, "epochs": config.epochs})
        if untouched is not None and run.model == "multitask":
            model, preprocess, _ = untouched
            scorer.score(model, preprocess, run, "zero-shot", [t for t in tasks if t in model.tasks])
        if run.model == "fit":
            fitted.append(_fit_fold(index, config, run, scorer, cache, callback))
        else:
            histories.append(_train_fold(index, config, run, scorer, cache, callback, explained))
        if callback:
            callback("run_end", {"run": i + 1, "runs": len(plan), "label": run.label})
    settings = {
        "train": config.to_dict(), "folds": folds, "folds_run": folds_run, "split": split, "seeds": seeds, "baselines": baselines,
        "test_size": test_size, "tasks": list(tasks), "dataset": index.summary(), "images_decoded": cache.decoded,
        "framings": len(cache.framings), "image_size": input_size(config, start),
        "zero_shot": run_name(start) if start else None,  # the model training started from
    }
    if fitted:
        settings["fit_folds"] = fitted
    if explained is not None:
        settings["explain"] = explain
    return CVResult(pd.DataFrame(scorer.records), pd.concat(histories, ignore_index=True), scorer.confusion, settings,
                    messages, explained.class_maps() if explained is not None else None)


def _check_protocol(split: str, folds: int, seeds: int, test_size: float | None) -> None:
    if split not in SPLITS:
        raise FacemtError(f"unknown split {split!r}: choose {', '.join(SPLITS)}")
    if seeds < 1 or folds < 2:
        raise FacemtError("--seeds must be >= 1 and --folds >= 2")
    if test_size is not None and not 0 < test_size < 1:
        raise FacemtError("--test-size must be between 0 and 1")


def _train_fold(index: DataIndex, config: "TrainConfig", run: _Run, scorer: "_Scorer", cache: ImageCache,
                callback: Callable[[str, dict], None] | None, explained: "_Explained | None") -> pd.DataFrame:
    """Train one model of the plan a fixed number of epochs on the fold's training rows, score it on its
    test rows (and the multi-task model's person-relative reading and maps); returns its history."""
    from facemt.engine import train

    result = train(index, replace(config, tasks=run.tasks, seed=run.seed), run.train_rows, run.test_rows,
                   cache=cache, callback=callback, select_best=False)
    scorer.score(result.model, result.preprocess, run, run.model, run.tasks)
    if run.model == "multitask" and "expression" in run.tasks and config.person_relative != "off":
        _score_person_relative(scorer, result, run)
    if explained is not None and run.model == "multitask":
        explained.add(result, run, scorer)
    ids = {"protocol": run.protocol, "seed": run.seed, "fold": run.fold, "model": run.history_name}
    return pd.concat([pd.DataFrame(ids, index=result.history.index), result.history], axis=1)


def _fit_subset(index: DataIndex, run: _Run) -> DataIndex:
    return DataIndex(index.table.iloc[run.train_rows].reset_index(drop=True), [])


def _fit_fold(index: DataIndex, config: "TrainConfig", run: _Run, scorer: "_Scorer", cache: ImageCache,
              callback: Callable[[str, dict], None] | None) -> dict:
    """``facemt fit`` itself on the fold's training persons (it holds out its own validation persons among
    them, applies the never-worse rule, refits with ``config.refit`` and takes the person-relative step, as it
    does for a user),
    the model it writes scored on the fold's test persons as model ``fit``; returns what fit chose."""
    from facemt.engine import fit

    result = fit(_fit_subset(index, run), replace(config, seed=run.seed), cache=cache, callback=callback)
    scorer.score(result.model, result.preprocess, run, "fit", [t for t in run.tasks if t in result.model.tasks])
    step = result.person_relative or {}
    return {"protocol": run.protocol, "seed": run.seed, "fold": run.fold, "best_epoch": result.best_epoch,
            "refit": result.refit is not None, "answered_by_start": dict(result.kept),
            "never_worse_skipped": result.never_worse.get("skipped"),  # e.g. another image size than the start's
            "person_relative": step.get("variant") if step.get("used") else None}


def _plan(index: DataIndex, config: "TrainConfig", tasks: Sequence[str], folds: int, split: str, seeds: int,
          baselines: bool, test_size: float | None, fit_model: bool = False
          ) -> tuple[list[_Run], dict[str, int], list[str]]:
    """Every model to train (one per protocol, seed, fold and model kind), the folds each protocol got, and
    the warnings for the report; a fold whose training rows leave a head with one class is an error now."""
    from facemt.engine import fit_split, resolve_tasks

    table = index.table
    protocols = ["subject", "random"] if split == "both" else [split]
    messages = []
    if "random" in protocols and table["person"].notna().any():
        messages.append(RANDOM_SPLIT_WARNING)
        log.info(RANDOM_SPLIT_WARNING)
    models = [("multitask", tasks)] + ([("fit", tasks)] if fit_model else [])
    models += [("single", (t,)) for t in tasks] if baselines and len(tasks) > 1 else []
    splits = {(protocol, seed): make_folds(table, protocol, folds, seed, test_size)
              for protocol in protocols for seed in range(config.seed, config.seed + seeds)}
    folds_run = {protocol: len(splits[protocol, config.seed]) for protocol in protocols}
    for protocol, n in folds_run.items():
        if not test_size and n != folds:
            persons = len(set(person_groups(table)))
            messages.append(f"{protocol} split: {n} folds, not {folds}: only {persons} persons, so each fold tests "
                            "one person (leave-one-person-out)")
    plan = [_Run(protocol, seed, k, train_rows, test_rows, model_name, model_tasks)
            for (protocol, seed), protocol_folds in splits.items()
            for k, (train_rows, test_rows) in enumerate(protocol_folds)
            for model_name, model_tasks in models]
    for run in plan:  # the rule fit applies (a head needs two classes), for every fold before any training
        try:
            if run.model == "fit":  # what fit checks before training, on the fold's training persons
                fit_split(_fit_subset(index, run), replace(config, seed=run.seed))
            else:
                resolve_tasks(index, run.tasks, run.train_rows)
        except FacemtError as exc:
            hint = ", or --no-fit-model" if run.model == "fit" else ""
            raise FacemtError(f"{run.label}: {exc} (fewer --folds, more persons, or --tasks without it{hint})") from None
    return plan, folds_run, messages


class _Scorer:
    """Scores models on their run's test fold: one record per head, confusion matrices summed per
    (protocol, model, head)."""

    def __init__(self, table: pd.DataFrame, targets: dict[str, np.ndarray], cache: ImageCache, batch_size: int) -> None:
        self.table, self.targets, self.cache, self.batch_size = table, targets, cache, batch_size
        self.records: list[dict] = []
        self.confusion: dict[tuple[str, str, str], np.ndarray] = {}

    def test_images(self, run: _Run, preprocess) -> list[np.ndarray]:
        return self.cache.load([self.table["path"].iloc[j] for j in run.test_rows], preprocess)[0]

    def score(self, model, preprocess, run: _Run, model_name: str, heads: Sequence[str]) -> None:
        from facemt.engine import predict_images
        from facemt.relative import with_person_relative

        device = next(model.parameters()).device
        images = self.test_images(run, preprocess)
        probs = predict_images(model, images, preprocess, self.batch_size, device)
        test = self.table.iloc[run.test_rows]
        persons = persons_in(test)
        if "expression" in probs:  # a run carrying the person-relative classifier reads each test person's faces together
            probs["expression"] = with_person_relative(model, images, preprocess, persons, probs["expression"])
        self._add(run, model_name, heads, test, probs)
        if model_name in PER_PERSON and has_pairs(persons):  # age group and gender: one answer per test person
            pooled = {t: per_person(probs[t], persons) for t in PERSON_HEADS if t in probs and t in heads}
            self._add(run, PER_PERSON[model_name], list(pooled), test, pooled)

    def _add(self, run: _Run, model_name: str, heads: Sequence[str], test: pd.DataFrame,
             probs: dict[str, np.ndarray]) -> None:
        metrics = evaluate_predictions(test, probs)
        for head in heads:
            if metrics[head]["n"]:
                self.records.append(_record(self.table, self.targets[head], run, model_name, head, metrics[head]))
                key = (run.protocol, model_name, head)
                self.confusion[key] = self.confusion.get(key, 0) + np.array(metrics[head]["confusion"])


def _score_person_relative(scorer: _Scorer, result, run: _Run) -> None:
    """The person-relative expression classifier (:mod:`facemt.relative`) fitted on the fold's training
    persons through the multi-task model's trunk and scored on its test persons as model ``person-relative``
    (cv has no validation persons to choose it by, as fit does: it is reported beside the head)."""
    from facemt.relative import MIN_PICTURES, fit_person_relative, trunk_features

    model, rows = result.model, list(run.train_rows)
    images = scorer.cache.load([scorer.table["path"].iloc[j] for j in rows], result.preprocess)[0]
    features = trunk_features(model, images, result.preprocess, next(model.parameters()).device)
    model.relative = fit_person_relative(features, persons_in(scorer.table.iloc[rows]),
                                         scorer.targets["expression"][rows], MIN_PICTURES)
    if model.relative is not None:
        scorer.score(model, result.preprocess, run, "person-relative", ["expression"])
    model.relative = None


class _Explained:
    """Every multi-task model's evidence maps for its test faces' true classes, averaged per class at the end."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.maps: dict[str, list] = {}
        self.labels: dict[str, list] = {}
        self.mean, self.faces = 0.0, 0

    def add(self, result, run: _Run, scorer: _Scorer) -> None:
        from facemt.explain import dataset_maps

        images = scorer.test_images(run, result.preprocess)
        maps, mean = dataset_maps(result.model, images, result.preprocess,
                                  {t: scorer.targets[t][run.test_rows] for t in run.tasks}, self.method, scorer.batch_size)
        for t in run.tasks:
            self.maps.setdefault(t, []).append(maps[t])
            self.labels.setdefault(t, []).append(scorer.targets[t][run.test_rows])
        self.mean += mean * len(images)
        self.faces += len(images)

    def class_maps(self) -> dict[str, Any]:
        from facemt.explain import class_average_maps

        return {"heads": class_average_maps({t: np.concatenate(v) for t, v in self.maps.items()},
                                            {t: np.concatenate(v) for t, v in self.labels.items()}),
                "mean_face": self.mean / max(1, self.faces), "method": self.method}

