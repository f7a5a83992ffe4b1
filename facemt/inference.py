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
    """

    source: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    probabilities: dict[str, dict[str, float]] = field(default_factory=dict)
    error: str | None = None

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
        out: dict[str, Any] = {"path": self.source}
        if self.error:
            out["error"] = self.error
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
        """Predict every head for one image or a list of images.

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

    def predict_files(self, paths: Iterable[str | os.PathLike]) -> Iterator[Prediction]:
        """Stream predictions for many files, in input order and in batches; an
        unreadable file yields a Prediction with ``error`` set instead of
        stopping the run. Memory is bounded by one batch."""
        slots: list[tuple[str, np.ndarray | None, str | None]] = []

        def flush() -> Iterator[Prediction]:
            ok = [(s, a) for s, a, _ in slots if a is not None]
            done = iter(self._predictions([a for _, a in ok], [s for s, _ in ok]) if ok else [])
            for source, array, error in slots:
                yield next(done) if array is not None else Prediction(source, error=error)
            slots.clear()

        for path in paths:
            try:
                slots.append((str(path), self._prepare(path), None))
            except FacemtError as exc:
                slots.append((str(path), None, str(exc)))
            if len(slots) >= self.batch_size:
                yield from flush()
        yield from flush()


def load(run_dir: str | os.PathLike, device: str = "auto", batch_size: int = 32) -> Predictor:
    """Load a run folder written by ``facemt fit``.

    Raises:
        FacemtError: the folder is not a valid facemt checkpoint.
    """
    return Predictor(run_dir, device=device, batch_size=batch_size)


__all__ = ["Prediction", "Predictor", "load"]
