"""Face detection (OpenCV Haar cascade shipped inside opencv-python-headless 4.x)
and the crop policy shared by training and prediction."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from facemt.errors import FacemtError

CASCADE = "haarcascade_frontalface_default.xml"


@dataclass(frozen=True)
class Face:
    """One detected face: ``box`` is (x, y, width, height) in the image's pixels."""

    box: tuple[int, int, int, int]
    score: float


class FaceDetector:
    """Frontal-face detector. Faces come back largest first.

    Args:
        min_size: smallest face side as a fraction of the image's shorter side.
        max_side: images are scanned at most this large (boxes are mapped back).
    """

    def __init__(self, min_size: float = 0.08, max_side: int = 800, min_neighbors: int = 5) -> None:
        path = Path(getattr(cv2, "data", None).haarcascades if hasattr(cv2, "data") else "") / CASCADE
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise FacemtError(
                f"face detector {CASCADE} not found in OpenCV (opencv-python-headless 4.x ships it; "
                "5.x does not): install 'opencv-python-headless<5' or use --no-detect"
            )
        self.min_size, self.max_side, self.min_neighbors = min_size, max_side, min_neighbors
        self._lock = threading.Lock()  # CascadeClassifier is not thread-safe

    def detect(self, image: Image.Image) -> list[Face]:
        """Detect faces in an RGB image."""
        w, h = image.size
        scale = min(1.0, self.max_side / max(w, h))
        small = image if scale == 1 else image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
        grey = cv2.equalizeHist(np.asarray(small.convert("L")))
        side = max(12, int(self.min_size * min(grey.shape)))
        with self._lock:
            boxes, _, weights = self._cascade.detectMultiScale3(
                grey, scaleFactor=1.1, minNeighbors=self.min_neighbors, minSize=(side, side), outputRejectLevels=True
            )
        faces = [
            Face(tuple(int(round(v / scale)) for v in box), float(np.ravel(weight)[0]) if np.size(weight) else 0.0)
            for box, weight in zip(boxes, weights if len(weights) else [None] * len(boxes))
        ]
        return sorted(faces, key=lambda f: f.box[2] * f.box[3], reverse=True)


_DETECTOR: FaceDetector | None = None


def default_detector() -> FaceDetector:
    """One shared detector per process."""
    global _DETECTOR
    if _DETECTOR is None:
        _DETECTOR = FaceDetector()
    return _DETECTOR


def crop_face(image: Image.Image, box: tuple[int, int, int, int], margin: float) -> Image.Image:
    """A square crop around ``box`` grown by ``margin`` x its size on every side;
    parts outside the image are filled by replicating the border."""
    x, y, w, h = box
    side = max(w, h) * (1 + 2 * margin)
    cx, cy = x + w / 2, y + h / 2
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    size = max(1, int(round(side)))
    arr = np.asarray(image)
    pad = max(0, -left, -top, left + size - arr.shape[1], top + size - arr.shape[0])
    if pad:
        arr = cv2.copyMakeBorder(arr, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    crop = arr[top + pad : top + pad + size, left + pad : left + pad + size]
    return Image.fromarray(np.ascontiguousarray(crop))


def face_crops(
    image: Image.Image, margin: float, detector: FaceDetector | None = None, largest_only: bool = False
) -> list[tuple[tuple[int, int, int, int], Image.Image]]:
    """``(box, crop)`` for each detected face (largest first); empty when none is found."""
    faces = (detector or default_detector()).detect(image)
    if largest_only:
        faces = faces[:1]
    return [(f.box, crop_face(image, f.box, margin)) for f in faces]
