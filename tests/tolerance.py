"""Comparing predictions made two ways (batchings, shards, engines): labels and rows exactly,
probabilities within a tolerance, as README's "Scaling out" promises."""

from __future__ import annotations

import csv
import io
from typing import Mapping, Sequence

from facemt.inference import PROBABILITY_TOLERANCE
from facemt.tasks import TASK_NAMES


def _check_head(where: str, label_a: str, label_b: str, probs_a: Mapping[str, float], probs_b: Mapping[str, float],
                tol: float) -> None:
    assert probs_a.keys() == probs_b.keys(), where
    worst = max(abs(float(probs_a[c]) - float(probs_b[c])) for c in probs_a)
    assert worst <= tol, f"{where}: probabilities differ by {worst:.2e} > {tol:.0e}"
    if label_a != label_b:  # allowed only for a tie at the promised precision
        gap = abs(float(probs_a[label_a]) - float(probs_a[label_b]))
        assert gap <= 2 * tol, f"{where}: {label_a} vs {label_b} (not a tie: {gap:.2e})"


def assert_same_predictions(a: Sequence, b: Sequence, tol: float = PROBABILITY_TOLERANCE) -> None:
    """Two lists of ``Prediction``: same sources, faces and labels in the same order; probabilities within ``tol``."""
    assert len(a) == len(b)
    for i, (p, q) in enumerate(zip(a, b)):
        assert (p.source, p.status, p.face, p.framing, p.box) == (q.source, q.status, q.face, q.framing, q.box), i
        assert p.labels.keys() == q.labels.keys(), i
        for t in p.labels:
            _check_head(f"row {i} {t}", p.labels[t], q.labels[t], p.probabilities[t], q.probabilities[t], tol)


def assert_same_csv(text_a: str, text_b: str, tol: float = PROBABILITY_TOLERANCE) -> None:
    """Two prediction CSVs: same header, same rows in the same order with the same non-numeric cells;
    probability cells within ``tol`` (plus the 6-decimal rounding of the file)."""
    rows_a, rows_b = (list(csv.DictReader(io.StringIO(t))) for t in (text_a, text_b))
    assert text_a.splitlines()[0] == text_b.splitlines()[0]
    assert len(rows_a) == len(rows_b)
    for i, (ra, rb) in enumerate(zip(rows_a, rows_b)):
        probability = {k for k in ra if "_p_" in k}
        heads = [t for t in TASK_NAMES if t in ra]
        assert {k: v for k, v in ra.items() if k not in probability | set(heads)} == \
               {k: v for k, v in rb.items() if k not in probability | set(heads)}, f"row {i}"
        for t in heads:
            if not ra[t] and not rb[t]:  # no face / unreadable: no numbers
                continue
            probs = [{k.split("_p_")[1]: r[k] for k in probability if k.startswith(f"{t}_p_")} for r in (ra, rb)]
            _check_head(f"row {i} ({ra['path']}) {t}", ra[t], rb[t], *probs, tol + 1e-6)
