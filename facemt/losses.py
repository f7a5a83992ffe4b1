"""Weighted, label-masked multi-task cross-entropy."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from facemt.errors import FacemtError
from facemt.tasks import class_prior, select_tasks  # noqa: F401  (class_prior: one prior for loss and prediction)

MISSING = -1


def parse_loss_weights(text: str | None, tasks: tuple[str, ...]) -> dict[str, float]:
    """Parse ``expression=2,gender=1`` into a weight per task (default 1.0).

    Raises:
        FacemtError: malformed pair, unknown or unselected task, negative weight.
    """
    weights = {t: 1.0 for t in tasks}
    if not text:
        return weights
    for pair in text.split(","):
        if not pair.strip():
            continue
        name, sep, value = pair.partition("=")
        name = name.strip()
        try:
            if not sep:
                raise ValueError
            weight = float(value)
        except ValueError:
            raise FacemtError(f"bad loss weight {pair.strip()!r}: write task=number, e.g. expression=2") from None
        select_tasks([name])
        if name not in tasks:
            raise FacemtError(f"loss weight for {name!r}, which is not among the trained tasks ({', '.join(tasks)})")
        if weight < 0 or weight != weight:
            raise FacemtError(f"loss weight for {name!r} must be >= 0, got {value.strip()}")
        weights[name] = weight
    return weights


class MultiTaskLoss(nn.Module):
    """Sum over heads of ``weight * cross_entropy`` on the rows that have that label.

    Rows whose target is -1 give that head no loss and no gradient, so data
    sets that carry only some labels can be trained together.

    With ``learned=True`` each head also gets a learned log-variance ``s``
    (homoscedastic uncertainty weighting, Kendall, Gal & Cipolla 2018): the
    head contributes ``weight * (exp(-s) * loss + s)``, so noisier heads are
    down-weighted automatically; the fixed weights still scale each head.

    With ``class_priors`` (task -> class frequencies of the training labels)
    the loss is logit-adjusted (Menon et al. 2021): ``log prior`` is added to
    the logits inside the loss only, so the raw logits the model outputs are
    those of a class-balanced prior. A head trained on 40 % neutral faces then
    does not answer "neutral" for every unclear face.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        label_smoothing: float = 0.0,
        learned: bool = False,
        class_priors: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.weights = dict(weights)
        self.label_smoothing = label_smoothing
        self.log_vars = nn.ParameterDict({t: nn.Parameter(torch.zeros(())) for t in self.weights}) if learned else None
        self.adjusted = tuple(class_priors or ())
        for task, prior in (class_priors or {}).items():
            self.register_buffer(f"log_prior_{task}", torch.log(prior / prior.sum()).float(), persistent=False)

    def forward(
        self,
        logits: Mapping[str, torch.Tensor],
        targets: Mapping[str, torch.Tensor],
        counts: Mapping[str, int] | None = None,
        processes: int = 1,
        soft: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns the total loss and the unweighted loss per head over this
        batch's labelled rows (0 when a head has none).

        Args:
            counts: labelled rows per head in the whole global batch, when this
                batch is one of ``processes`` shards whose gradients are averaged
                (data-parallel training). Each head's loss in the total is then
                its sum over this shard divided by ``counts[head] / processes``,
                so the averaged gradient is that of the global batch's mean loss
                however unevenly the labels fall on the shards.
            soft: per head, N x classes target distributions (crowd votes);
                a labelled row with one is trained against it (cross-entropy
                with the distribution), a row of NaN falls back to its label.
        """
        per_task: dict[str, torch.Tensor] = {}
        total = None
        for task, weight in self.weights.items():
            out, target = logits[task], targets[task]
            if task in self.adjusted:
                out = out + getattr(self, f"log_prior_{task}")
            labelled = target != MISSING
            n = int(labelled.sum())
            if n and soft is not None and task in soft:
                summed = self._soft_sum(out[labelled], target[labelled], soft[task][labelled])
                per_task[task] = summed.detach() / n
                loss = summed / (counts[task] / processes if counts is not None else n)
            elif n:
                summed = F.cross_entropy(out[labelled], target[labelled], label_smoothing=self.label_smoothing,
                                         reduction="sum")
                per_task[task] = summed.detach() / n
                loss = summed / (counts[task] / processes if counts is not None else n)
            else:
                per_task[task] = loss = out.sum() * 0.0
            labelled_anywhere = n > 0 if counts is None else counts[task] > 0
            if self.log_vars is not None and labelled_anywhere:
                s = self.log_vars[task]
                loss = torch.exp(-s) * loss + s
            total = weight * loss if total is None else total + weight * loss
        assert total is not None
        return total, per_task


    def _soft_sum(self, logits: torch.Tensor, target: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """Cross-entropy summed over rows against ``dist`` (or the smoothed label where ``dist`` is NaN)."""
        classes = logits.shape[1]
        hard = F.one_hot(target, classes).to(logits.dtype) * (1 - self.label_smoothing) + self.label_smoothing / classes
        dist = dist.to(logits.dtype)
        q = torch.where(torch.isnan(dist).any(1, keepdim=True), hard, dist)
        return -(q * F.log_softmax(logits, 1)).sum()


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, steps: int = 200) -> float:
    """The softmax temperature that minimises the negative log-likelihood of
    ``targets`` (temperature scaling, Guo et al. 2017); 1.0 without labels.

    Args:
        logits: N x C raw logits of one head.
        targets: N class indices (``MISSING`` rows are ignored).
    """
    labelled = targets != MISSING
    if not labelled.any():
        return 1.0
    logits, targets = logits[labelled].detach().double(), targets[labelled]
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, bins: int = 10) -> float:
    """ECE: the confidence-weighted gap between confidence and accuracy over equal-width bins."""
    if len(y_true) == 0:
        return float("nan")
    confidence = probs.max(1)
    correct = probs.argmax(1) == y_true
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lo) & (confidence <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)
