"""Splits, metrics and reports."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from facemt.tasks import TASK_NAMES


def person_groups(table: pd.DataFrame) -> np.ndarray:
    """Group label per row: the person where known, else the row itself (its own group)."""
    return np.array(
        [f"person:{p}" if p is not None else f"row:{i}" for i, p in enumerate(table["person"])], dtype=object
    )


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
        folds = list(splitter.split(np.zeros(len(table)), stratify_key(table, tasks), groups))
    for train_idx, test_idx in folds:
        assert not set(groups[train_idx]) & set(groups[test_idx]), "a person is on both sides of a split"
    return folds


def validation_split(table: pd.DataFrame, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out about ``fraction`` of the rows for validation, subject-disjoint
    when persons are known. ``fraction=0`` gives no validation rows."""
    everything = np.arange(len(table))
    if fraction <= 0 or len(person_groups(table)) < 2 or len(set(person_groups(table))) < 2:
        return everything, everything[:0]
    train_idx, val_idx = subject_folds(table, int(round(1 / fraction)), seed)[0]
    return np.sort(train_idx), np.sort(val_idx)
