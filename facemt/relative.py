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

Three classifiers are tried (:data:`VARIANTS`): on the centred features alone (``centred``: persons who
show every expression), on the features and the centred features side by side (``both``: persons who
show only one or two expressions, where the centred features say little), and ``both`` multiplied
with the network's own expression probabilities (``both x head``: the two as a product of experts).
:func:`choose` picks one on persons held out from its fit, or keeps the network's head.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn

from facemt.errors import FacemtError
from facemt.tasks import TASKS, person_keys

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
#: the classifiers :func:`choose` tries: name -> (what it reads, whether it multiplies in the network's head)
VARIANTS: dict[str, tuple[str, bool]] = {"centred": ("centred", False), "both": ("both", False),
                                         "both x head": ("both", True)}
#: the name :func:`choose` gives the network's own head
HEAD = "head"


class PersonRelative(nn.Module):
    """The fitted person-relative expression classifier (one of :data:`VARIANTS`): standardisation of
    what it reads and a linear map to the classes of :data:`TASK` (schema order). Its buffers travel in
    the run's ``model.safetensors`` (``relative.*``); ``config.json`` ``person_relative`` holds
    ``min_pictures`` and ``variant``."""

    def __init__(self, features: int, min_pictures: int = MIN_PICTURES, variant: str = "centred") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise FacemtError(f"unknown person-relative classifier {variant!r} (known: {', '.join(VARIANTS)}); "
                              "a newer facemt wrote this run")
        k = TASKS[TASK].num_classes
        self.min_pictures, self.variant = int(min_pictures), variant
        self.inputs, self.with_head = VARIANTS[variant]
        width = features * (2 if self.inputs == "both" else 1)
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("scale", torch.ones(width))
        self.register_buffer("weight", torch.zeros(k, width))
        self.register_buffer("bias", torch.zeros(k))

    def probabilities(self, features: np.ndarray, persons: Sequence[object | None],
                      own: np.ndarray | None = None) -> np.ndarray:
        """N x classes probabilities for trunk ``features`` (:func:`trunk_features`); rows of a face whose
        person is unknown or has fewer than ``min_pictures`` pictures among them are NaN (the network's
        own head answers those). ``own``: the network's expression probabilities of the same faces,
        needed by a variant that multiplies them in."""
        x, ok = design(features, persons, self.min_pictures, self.inputs)
        out = np.full((len(features), len(self.bias)), np.nan, dtype=np.float32)
        if ok.any():
            x = (torch.from_numpy(x[ok]) - self.mean.cpu()) / self.scale.cpu()
            logits = x @ self.weight.cpu().T + self.bias.cpu()
            if self.with_head:
                if own is None:
                    raise ValueError(f"the {self.variant!r} person-relative classifier needs the head's probabilities")
                logits = logits + torch.from_numpy(np.log(np.clip(own[ok], 1e-12, 1.0))).float()
            out[ok] = torch.softmax(logits, dim=1).numpy()
        return out


def centre(features: np.ndarray, persons: Sequence[object | None], min_pictures: int) -> tuple[np.ndarray, np.ndarray]:
    """``features`` minus the mean of the same person's rows, and which rows have a person with at
    least ``min_pictures`` rows (the others are left as they are and should not be used)."""
    keys = person_keys(persons)
    out = np.array(features, dtype=np.float32, copy=True)
    ok = np.zeros(len(keys), dtype=bool)
    for person in np.unique(keys[keys != ""]):
        rows = keys == person
        if rows.sum() >= min_pictures:
            out[rows] -= out[rows].mean(axis=0)
            ok[rows] = True
    return out, ok


def design(features: np.ndarray, persons: Sequence[object | None], min_pictures: int,
           inputs: str) -> tuple[np.ndarray, np.ndarray]:
    """What a classifier reading ``inputs`` (``centred`` or ``both``) sees, and which rows it may answer
    (:func:`centre`)."""
    centred, ok = centre(features, persons, min_pictures)
    if inputs == "both":
        return np.hstack([np.asarray(features, dtype=np.float32), centred]), ok
    return centred, ok


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
                        min_pictures: int = MIN_PICTURES, variant: str = "centred") -> PersonRelative | None:
    """Fit the classifier ``variant`` (:data:`VARIANTS`) on training pictures (``labels``: class indices
    of :data:`TASK`, -1 where unknown). None when fewer than two classes are labelled on persons with
    ``min_pictures`` pictures. Centring uses every picture of a person, labelled or not. A variant that
    multiplies in the network's head is fitted alone (the two are independent experts)."""
    from sklearn.linear_model import LogisticRegression

    head = PersonRelative(np.shape(features)[1], min_pictures, variant)
    x, ok = design(features, persons, min_pictures, head.inputs)
    use = ok & (labels >= 0)
    classes = np.unique(labels[use])
    if len(classes) < 2:
        return None
    x = x[use]
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    clf = LogisticRegression(C=C, max_iter=3000).fit((x - mean) / scale, labels[use])
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
    relative = model.relative.probabilities(trunk_features(model, arrays, preprocess, device), persons, own)
    return np.where(np.isnan(relative), own, relative)


def _scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and mean log-loss of ``probs`` on ``labels``."""
    hit = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    return {"accuracy": float((probs.argmax(1) == labels).mean()), "log_loss": float(-np.log(hit).mean())}


def choose(features: np.ndarray, persons: Sequence[object | None], labels: np.ndarray, own: np.ndarray,
           held_out: np.ndarray, always: bool = False, others: Sequence[dict] = ()) -> tuple[PersonRelative | None, dict]:
    """Fit every variant (:data:`VARIANTS`) on the rows not ``held_out`` and score each, and the network's
    head (``own``: its expression probabilities of the held-out rows), on the held-out rows they answer; the best
    is the most accurate, then the lowest log-loss (the head among them). Return the best variant refitted
    on every row, or None where the head is best (``always``: the best variant even then), and what was
    measured: ``scores`` (name -> accuracy and log-loss), ``val_images`` scored, ``best`` (a name or
    :data:`HEAD`), ``reason``, and ``variant`` (the one returned).

    ``others``: what this function measured on other groups of held-out persons (each with a model trained
    without them: fit's ``--validation-groups``); the choice is then made on every group's pictures together
    (:func:`pooled_scores`; ``pooled`` in what is returned) over the candidates every group scored."""
    persons = np.asarray(persons, dtype=object)
    fitted = {name: fit_person_relative(features[~held_out], persons[~held_out], labels[~held_out],
                                        MIN_PICTURES, name) for name in VARIANTS}
    fitted = {name: clf for name, clf in fitted.items() if clf is not None}
    if not fitted:
        return None, {"reason": f"fewer than two expressions labelled on persons with {MIN_PICTURES}+ pictures"}
    answers = {name: clf.probabilities(features[held_out], persons[held_out], own)
               for name, clf in fitted.items()}
    y = labels[held_out]
    scored = ~np.isnan(next(iter(answers.values()))).any(axis=1) & (y >= 0)
    info: dict = {}
    if scored.any():
        info["scores"] = {name: _scores(p[scored], y[scored]) for name, p in answers.items()}
        info["scores"][HEAD] = _scores(own[scored], y[scored])
        info["val_images"] = int(scored.sum())
    pooled = pooled_scores([info, *others]) if others else None
    if pooled:
        info["pooled"] = pooled
    decide = pooled or info
    if not decide.get("scores"):
        info["reason"] = f"no held-out person with {MIN_PICTURES}+ labelled pictures to decide on"
        best = next(iter(fitted)) if always else None
    else:
        scores = {k: v for k, v in decide["scores"].items() if k == HEAD or k in fitted}
        best = best_candidate(scores)
        where = (f"the {decide['groups']} groups of held-out persons ({decide['val_images']} pictures)" if pooled
                 else "the held-out persons")
        info.update(best=best, reason=f"the network's head is best on {where}" if best == HEAD else
                    f"{best!r} is best on {where}")
        if best == HEAD:
            best = best_candidate({k: v for k, v in scores.items() if k != HEAD}) if always else None
    if best is None:
        return None, info
    return fit_person_relative(features, persons, labels, MIN_PICTURES, best), {**info, "variant": best}


def best_candidate(scores: dict[str, dict[str, float]]) -> str | None:
    """The most accurate of ``scores`` (name -> accuracy and log-loss), then the lowest log-loss, then the
    network's head (:data:`HEAD`) before a classifier; None when there is none."""
    return min(scores, key=lambda k: (-scores[k]["accuracy"], scores[k]["log_loss"], k != HEAD), default=None)


def pooled_scores(infos: Sequence[dict]) -> dict | None:
    """Accuracy and log-loss per candidate over several groups' held-out pictures together (each group's
    ``scores`` weighted by its ``val_images``, as :func:`choose` records them), for the candidates every
    scored group has; None when no group scored any."""
    infos = [i for i in infos if i and i.get("scores") and i.get("val_images")]
    if not infos:
        return None
    names = [k for k in infos[0]["scores"] if all(k in i["scores"] for i in infos)]
    n = sum(i["val_images"] for i in infos)
    total = lambda k, m: sum(i["scores"][k][m] * i["val_images"] for i in infos) / n  # noqa: E731
    # rounded: the same count of correct pictures is the same accuracy, however the groups add up
    scores = {k: {"accuracy": round(total(k, "accuracy"), 9), "log_loss": total(k, "log_loss")} for k in names}
    return {"scores": scores, "val_images": n, "groups": len(infos)}
