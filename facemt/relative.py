"""Person-relative expression: read a face's expression from how it differs from the same person's
other pictures.

Posed stimulus sets (FACES, JAFFE) show every person with several expressions. Much of what the
network sees in one picture is the person (the shape of a mouth, brows that always look angry);
subtracting the mean trunk feature of that person's pictures leaves mostly the expression. A
logistic regression on those centred features, fitted by ``facemt fit`` on the training persons,
answers expression when pictures come grouped by person (``evaluate``, ``cv``, ``predict
--person-from``), for persons with at least :attr:`PersonRelative.min_pictures` pictures; the
network's own expression head answers every other face. It only helps where a person's pictures
span the expressions (a person photographed only smiling is centred on a smile), which is why fit
uses it only when it beats the network's head on the validation persons.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from facemt.tasks import TASKS

if TYPE_CHECKING:
    from facemt.model import MultiTaskNet
    from facemt.transforms import PreprocessConfig

#: the head it answers
TASK = "expression"
#: inverse regularisation strength of the logistic regression (strong: a few hundred pictures, ~1000 features)
C = 0.01
#: the fewest pictures of a person the classifier answers (fewer: the mean is mostly the face itself)
MIN_PICTURES = 3
#: a class the training pictures never showed gets this logit (exp() of it is 0 in float32)
ABSENT = -1e4


class PersonRelative(nn.Module):
    """The fitted person-relative expression classifier: standardisation of the centred trunk features
    and a linear map to the classes of :data:`TASK` (schema order). Its buffers travel in the run's
    ``model.safetensors`` (``relative.*``); ``config.json`` ``person_relative`` holds ``min_pictures``."""

    def __init__(self, features: int, min_pictures: int = MIN_PICTURES) -> None:
        super().__init__()
        k = TASKS[TASK].num_classes
        self.min_pictures = int(min_pictures)
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("scale", torch.ones(features))
        self.register_buffer("weight", torch.zeros(k, features))
        self.register_buffer("bias", torch.zeros(k))

    def probabilities(self, features: np.ndarray, persons: Sequence[object | None]) -> np.ndarray:
        """N x classes probabilities for trunk ``features`` (:func:`trunk_features`); rows of a face whose
        person is unknown or has fewer than ``min_pictures`` pictures among them are NaN (the network's
        own head answers those)."""
        centred, ok = centre(features, persons, self.min_pictures)
        out = np.full((len(features), len(self.bias)), np.nan, dtype=np.float32)
        if ok.any():
            x = (torch.from_numpy(centred[ok]) - self.mean.cpu()) / self.scale.cpu()
            out[ok] = torch.softmax(x @ self.weight.cpu().T + self.bias.cpu(), dim=1).numpy()
        return out


def centre(features: np.ndarray, persons: Sequence[object | None], min_pictures: int) -> tuple[np.ndarray, np.ndarray]:
    """``features`` minus the mean of the same person's rows, and which rows have a person with at
    least ``min_pictures`` rows (the others are left as they are and should not be used)."""
    keys = np.array(["" if p is None or (isinstance(p, float) and np.isnan(p)) else str(p) for p in persons])
    out = np.array(features, dtype=np.float32, copy=True)
    ok = np.zeros(len(keys), dtype=bool)
    for person in np.unique(keys[keys != ""]):
        rows = keys == person
        if rows.sum() >= min_pictures:
            out[rows] -= out[rows].mean(axis=0)
            ok[rows] = True
    return out, ok


def trunk_features(model: "MultiTaskNet", images: Sequence[np.ndarray], preprocess: "PreprocessConfig",
                   device: str = "cpu", batch_size: int = 64) -> np.ndarray:
    """N x F trunk features of prepared face images, averaged with their mirror image (a face and
    its mirror are the same expression; averaging halves the framing noise)."""
    from facemt.transforms import build_transform

    transform = build_transform(preprocess, "none")
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.stack([transform.array(im) for im in images[start : start + batch_size]]))
            batch = batch.to(device)
            out.append(((model.trunk(batch) + model.trunk(batch.flip(-1))) / 2).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.trunk.num_features), dtype=np.float32)


def fit_person_relative(features: np.ndarray, persons: Sequence[object | None], labels: np.ndarray,
                        min_pictures: int = MIN_PICTURES) -> PersonRelative | None:
    """Fit the classifier on training pictures (``labels``: class indices of :data:`TASK`, -1 where
    unknown). None when fewer than two classes are labelled on persons with ``min_pictures`` pictures.
    Centring uses every picture of a person, labelled or not."""
    from sklearn.linear_model import LogisticRegression

    centred, ok = centre(features, persons, min_pictures)
    use = ok & (labels >= 0)
    classes = np.unique(labels[use])
    if len(classes) < 2:
        return None
    x = centred[use]
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    clf = LogisticRegression(C=C, max_iter=3000).fit((x - mean) / scale, labels[use])
    head = PersonRelative(x.shape[1], min_pictures)
    weight, bias = head.weight.numpy(), head.bias.numpy()  # views: filled in place
    bias[:] = ABSENT
    if len(classes) == 2:  # sklearn's binary model: one row, for the second class
        weight[classes[1]], bias[classes[1]], bias[classes[0]] = clf.coef_[0], clf.intercept_[0], 0.0
    else:
        weight[clf.classes_], bias[clf.classes_] = clf.coef_, clf.intercept_
    head.mean.copy_(torch.from_numpy(mean))
    head.scale.copy_(torch.from_numpy(scale))
    return head


def with_person_relative(model: "MultiTaskNet", arrays: Sequence[np.ndarray], preprocess: "PreprocessConfig",
                         persons: Sequence[object | None] | None, own: np.ndarray) -> np.ndarray:
    """``own`` (the network's expression probabilities for the prepared faces ``arrays``) with the rows
    ``model``'s person-relative classifier answers (persons with enough pictures among ``arrays``)
    replaced by its answers; ``own`` as it is when the model carries none or ``persons`` is None."""
    if model.relative is None or persons is None or not len(arrays):
        return own
    device = next(model.parameters()).device
    relative = model.relative.probabilities(trunk_features(model, arrays, preprocess, device), persons)
    return np.where(np.isnan(relative), own, relative)
