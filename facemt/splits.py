"""Splits of a data table: subject-disjoint folds (no person on both sides),
stratified random folds, and the validation split of ``fit``."""

from __future__ import annotations

import logging
import warnings
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

from facemt.errors import FacemtError
from facemt.tasks import TASK_NAMES

log = logging.getLogger(__name__)


def person_groups(table: pd.DataFrame) -> np.ndarray:
    """Group label per row: the person where known, else the row itself (its own group).

    Person ids belong to their source: when the table joins several sources
    (``--data`` given more than once), person ``01`` of one set and person
    ``01`` of another are two people, never one group in a split.
    """
    persons = table["person"].tolist()
    sources = table["source"].tolist() if "source" in table else [None] * len(table)
    several = len({s for s, p in zip(sources, persons) if p is not None}) > 1
    return np.array([f"row:{i}" if p is None else f"person:{s}/{p}" if several else f"person:{p}"
                     for i, (s, p) in enumerate(zip(sources, persons))], dtype=object)


def stratify_key(table: pd.DataFrame, tasks: Sequence[str] = TASK_NAMES) -> np.ndarray:
    """One string per row joining the row's labels, to stratify splits on."""
    parts = [table[t].fillna("?").astype(str) if t in table else pd.Series("?", index=table.index) for t in tasks]
    key = parts[0]
    for p in parts[1:]:
        key = key + "|" + p
    return key.to_numpy()


def subject_folds(
    table: pd.DataFrame, n_splits: int, seed: int, tasks: Sequence[str] = ("age_group", "gender")
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``n_splits`` (train, test) row-position pairs in which no person is on both sides.

    Rows without a person are their own group. Folds are stratified on the
    person-constant labels (age group and gender by default) so that each test
    fold sees a mix of them where the data allows.
    """
    groups = person_groups(table)
    n_groups = len(set(groups))
    n_splits = max(2, min(n_splits, n_groups))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            folds = list(splitter.split(np.zeros(len(table)), stratify_key(table, tasks), groups))
        except ValueError:  # every label combination rarer than n_splits: group only
            folds = list(GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(
                np.zeros(len(table)), groups=groups))
    for train_idx, test_idx in folds:
        assert not set(groups[train_idx]) & set(groups[test_idx]), "a person is on both sides of a split"
    return folds


def validation_split(table: pd.DataFrame, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out about ``fraction`` of the rows for validation, subject-disjoint
    when persons are known: whole persons, as near the fraction as they allow
    (at least one person on each side). ``fraction=0`` gives no validation rows.

    A fraction of 1/K (0.5, 0.25, 0.2, 0.1, ...) holds out the first of K
    stratified subject-disjoint folds; any other fraction takes persons in a
    seeded order that alternates between age group x gender strata until the
    held-out rows come nearest to the fraction.
    """
    everything = np.arange(len(table))
    groups = person_groups(table)
    if fraction <= 0 or len(set(groups)) < 2:
        return everything, everything[:0]
    folds = 1 / fraction
    if abs(folds - round(folds)) < 1e-6:
        train_idx, val_idx = subject_folds(table, int(round(folds)), seed)[0]
        return np.sort(train_idx), np.sort(val_idx)
    held = np.isin(groups, _persons_for(table, groups, fraction, seed))
    return everything[~held], everything[held]


def _persons_for(table: pd.DataFrame, groups: np.ndarray, fraction: float, seed: int) -> list[str]:
    """The groups (persons) whose rows together come nearest to ``fraction`` of the table."""
    rng = np.random.default_rng(seed)
    key = stratify_key(table, ("age_group", "gender"))
    first = pd.DataFrame({"group": groups, "key": key}).drop_duplicates("group")
    strata = [list(rng.permutation(g["group"].to_numpy())) for _, g in first.groupby("key", sort=True)]
    strata = [strata[i] for i in rng.permutation(len(strata))]
    order = [s[i] for i in range(max(map(len, strata))) for s in strata if i < len(s)]  # round robin
    sizes = pd.Series(groups).value_counts()
    held = np.cumsum([sizes[g] for g in order])[:-1]  # at least one person stays for training
    best = int(np.argmin(np.abs(held - fraction * len(table))))
    return order[:best + 1]


def random_folds(
    table: pd.DataFrame, n_splits: int, seed: int, test_size: float | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified random (train, test) splits ignoring persons: ``n_splits`` folds,
    or one split with ``test_size`` of the rows held out (the original 70/30 protocol)."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    if not test_size and n_splits > len(table):
        raise FacemtError(f"--folds {n_splits}: random folds need at least one test image each, and there are "
                          f"only {len(table)} images")
    key = stratify_key(table)
    counts = pd.Series(key).value_counts()
    # Classes too rare to stratify on are merged into one bucket.
    key = np.where(pd.Series(key).map(counts).to_numpy() >= max(2, n_splits), key, "rare")
    rows = np.arange(len(table))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if test_size:
            try:
                train, test = train_test_split(rows, test_size=test_size, random_state=seed, stratify=key)
            except ValueError:
                train, test = train_test_split(rows, test_size=test_size, random_state=seed)
            return [(np.sort(train), np.sort(test))]
        splitter = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return list(splitter.split(rows, key))


def make_folds(
    table: pd.DataFrame, split: str, n_splits: int, seed: int, test_size: float | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Folds for one protocol: ``subject`` (grouped by person; leave-one-person-out
    when there are no more persons than folds) or ``random``."""
    if split == "random":
        return random_folds(table, n_splits, seed, test_size)
    if split != "subject":
        raise FacemtError(f"unknown split {split!r}: choose subject, random or both")
    groups = person_groups(table)
    if table["person"].isna().any():
        log.warning("%d rows have no person: each counts as its own person", int(table["person"].isna().sum()))
    n_groups = len(set(groups))
    if n_groups < 2:
        raise FacemtError("subject-disjoint evaluation needs at least two persons")
    if test_size:
        n_splits = max(2, int(round(1 / test_size)))
        return subject_folds(table, n_splits, seed)[:1]
    if n_groups <= n_splits:
        from sklearn.model_selection import LeaveOneGroupOut

        folds = list(LeaveOneGroupOut().split(np.zeros(len(table)), groups=groups))
    else:
        folds = subject_folds(table, n_splits, seed)
    for train, test in folds:
        if set(groups[train]) & set(groups[test]):
            raise AssertionError("a person is on both sides of a split")
    return folds


def more_validation_groups(table: pd.DataFrame, val_rows: Sequence[int], groups: int,
                           seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Up to ``groups - 1`` more (training, validation) splits of ``table`` beside fit's own (whose
    validation rows are ``val_rows``): each holds out as many persons as fit's own validation persons, drawn
    in a seeded order from the others, disjoint from fit's and from each other's; fewer where the persons
    run out (the last group can be smaller). Rows without a person are their own group, as in every split."""
    names = person_groups(table)
    own = set(names[np.asarray(val_rows, dtype=int)])
    if not own:
        return []
    rest = sorted(set(names) - own)
    np.random.default_rng(seed).shuffle(rest)
    out = []
    for g in range(groups - 1):
        held = set(rest[g * len(own):(g + 1) * len(own)])
        if not held:
            break
        is_val = np.isin(names, list(held))
        out.append((np.flatnonzero(~is_val), np.flatnonzero(is_val)))
    return out
