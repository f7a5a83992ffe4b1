"""Loading a run folder and predicting all heads in one forward pass."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from facemt.checkpoint import load_checkpoint
from facemt.engine import predict_images, resolve_device
from facemt.errors import FacemtError
from facemt.images import ImageInput, as_rgb_image
from facemt.tasks import TASKS
from facemt.transforms import shrink


@dataclass
class Prediction:
    """All heads' answers for one image.

    Attributes:
        source: the file path, or None for in-memory images.
        labels: task -> predicted class name.
        probabilities: task -> {class name: probability}, summing to 1 per task.
        error: set (and labels empty) when the image could not be read.
        face: index of the face in the image (0 = largest) when faces were detected.
        box: that face's (x, y, width, height) in the original image's pixels.
        no_face: detection found no face (labels empty).
    """

    source: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    probabilities: dict[str, dict[str, float]] = field(default_factory=dict)
    error: str | None = None
    face: int | None = None
    box: tuple[int, int, int, int] | None = None
    no_face: bool = False

    @property
    def status(self) -> str:
        """``ok``, ``no_face`` or ``error``."""
        return "error" if self.error else "no_face" if self.no_face else "ok"

    @property
    def age_group(self) -> str | None:
        return self.labels.get("age_group")

    @property
    def gender(self) -> str | None:
        return self.labels.get("gender")

    @property
    def expression(self) -> str | None:
        return self.labels.get("expression")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``{"path", "error", task: {"label", "probabilities"}}``."""
        out: dict[str, Any] = {"path": self.source, "status": self.status}
        if self.error:
            out["error"] = self.error
        if self.face is not None:
            out["face"] = self.face
            out["box"] = list(self.box) if self.box else None
        for task, label in self.labels.items():
            out[task] = {"label": label, "probabilities": self.probabilities[task]}
        return out


class Predictor:
    """A trained facemt model ready to predict.

    Args:
        run_dir: a folder written by ``facemt fit``.
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: images per forward pass.
    """

    def __init__(self, run_dir: str | os.PathLike, device: str = "auto", batch_size: int = 32) -> None:
        self.device = resolve_device(device)
        self.model, self.preprocess, self.config = load_checkpoint(run_dir, map_location=self.device)
        self.run_dir = Path(run_dir)
        self.batch_size = batch_size

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.model.tasks

    def _prepare(self, image: ImageInput) -> np.ndarray:
        return shrink(as_rgb_image(image, self.preprocess.working_side), self.preprocess)

    def _predictions(self, arrays: Sequence[np.ndarray], sources: Sequence[str | None]) -> list[Prediction]:
        probs = predict_images(self.model, arrays, self.preprocess, self.batch_size, self.device)
        out = []
        for i, src in enumerate(sources):
            labels, probabilities = {}, {}
            for task in self.tasks:
                classes = TASKS[task].classes
                p = probs[task][i]
                labels[task] = classes[int(np.argmax(p))]
                probabilities[task] = {c: float(v) for c, v in zip(classes, p)}
            out.append(Prediction(src, labels, probabilities))
        return out

    def predict(self, images: ImageInput | Sequence[ImageInput]) -> Prediction | list[Prediction]:
        """Predict every head for one image or a list of images, each taken as
        an already-cropped face (see :meth:`predict_faces` to detect faces).

        Args:
            images: a path, PIL image or HxWx3 uint8 array, or a list of them.

        Returns:
            one :class:`Prediction`, or a list for a list input.

        Raises:
            FacemtError: an image cannot be read.
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        arrays = [self._prepare(im) for im in items]
        sources = [str(im) if isinstance(im, (str, os.PathLike)) else None for im in items]
        results = self._predictions(arrays, sources)
        return results[0] if single else results

    def _units(self, path: str | os.PathLike | ImageInput, detect: bool, fallback: bool) -> list[tuple]:
        """(face index, box, prepared array) per face of one input; [] when no face."""
        image = as_rgb_image(path, None if detect else self.preprocess.working_side)
        if not detect:
            return [(None, None, shrink(image, self.preprocess))]
        from facemt.detect import face_crops

        crops = face_crops(image, self.preprocess.crop_margin)
        if not crops and fallback:
            return [(None, None, shrink(image, self.preprocess))]
        return [(i, box, shrink(crop, self.preprocess)) for i, (box, crop) in enumerate(crops)]

    def predict_faces(self, image: ImageInput, fallback: bool = False) -> list[Prediction]:
        """Detect faces in a photo and predict every head for each (largest first).

        Args:
            image: a path, PIL image or array.
            fallback: when no face is found, predict on the whole image instead
                of returning an empty list.
        """
        units = self._units(image, True, fallback)
        source = str(image) if isinstance(image, (str, os.PathLike)) else None
        preds = self._predictions([a for _, _, a in units], [source] * len(units)) if units else []
        for (face, box, _), p in zip(units, preds):
            p.face, p.box = face, box
        return preds

    def predict_files(
        self, paths: Iterable[str | os.PathLike], detect: bool = False, fallback: bool = False
    ) -> Iterator[Prediction]:
        """Stream predictions for many files, in input order and in batches.

        Args:
            paths: image files.
            detect: one prediction per detected face (with its box) instead of
                one per file; a file without a face yields one ``no_face`` result.
            fallback: with ``detect``, predict the whole image when no face is found.

        An unreadable file yields a Prediction with ``error`` set instead of
        stopping the run. Memory is bounded by one batch.
        """
        slots: list[Prediction] = []
        arrays: list[np.ndarray] = []

        def flush() -> Iterator[Prediction]:
            waiting = [p for p in slots if p.status == "ok" and not p.labels]
            if waiting:
                for p, done in zip(waiting, self._predictions(arrays, [p.source for p in waiting])):
                    p.labels, p.probabilities = done.labels, done.probabilities
            yield from slots
            slots.clear()
            arrays.clear()

        for path in paths:
            try:
                units = self._units(path, detect, fallback)
            except FacemtError as exc:
                slots.append(Prediction(str(path), error=str(exc)))
                units = None
            if units is not None and not units:
                slots.append(Prediction(str(path), no_face=True))
            for face, box, array in units or []:
                slots.append(Prediction(str(path), face=face, box=box))
                arrays.append(array)
            if len(arrays) >= self.batch_size:
                yield from flush()
        yield from flush()


def load(run_dir: str | os.PathLike, device: str = "auto", batch_size: int = 32) -> Predictor:
    """Load a run folder written by ``facemt fit``.

    Raises:
        FacemtError: the folder is not a valid facemt checkpoint.
    """
    return Predictor(run_dir, device=device, batch_size=batch_size)


__all__ = ["Prediction", "Predictor", "load"]
