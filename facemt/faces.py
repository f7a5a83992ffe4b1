"""Faces: the YuNet detector (box, score, five landmarks), alignment to the
canonical face frame, and the crop policy.

This module is the one owner of how a picture becomes a face image: training
(the decode-once cache), evaluation, prediction, cross-validation and the
Python API all call :func:`extract_faces` with the policy stored in the run.

Crop policies:

- ``align``: detect, then rotate and scale the face with a similarity
  transform so that the eye centres land on fixed points of the canonical
  frame (:class:`CropPolicy` ``eye_y`` and ``eye_distance``): eyes level,
  the whole face from forehead to chin inside the network input;
- ``box``: detect, then a square crop of the detector box grown by ``margin``;
- ``none``: the picture is already a face; it is used whole.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from PIL import Image

from facemt.config import CropPolicy
from facemt.errors import FacemtError
from facemt.files import sha256_file

#: The YuNet face detector (OpenCV Zoo, MIT licence), shipped inside the package.
DETECTOR_FILE = "face_detection_yunet_2023mar.onnx"
DETECTOR_SHA256 = "8f2383e4dd3cfbb4553ea8718107fc0423210dc964f9f4280604804ed2552fa4"


@dataclass(frozen=True)
class Face:
    """One detected face.

    Attributes:
        box: (x, y, width, height) in the picture's pixels.
        score: detector confidence in [0, 1].
        landmarks: five (x, y) points in the picture's pixels: the eye on the
            picture's left, the other eye, the nose tip, the mouth corner on the
            picture's left, the other mouth corner.
    """

    box: tuple[int, int, int, int]
    score: float
    landmarks: tuple[tuple[float, float], ...]

    @property
    def eyes(self) -> tuple[tuple[float, float], tuple[float, float]]:
        return self.landmarks[0], self.landmarks[1]

    def to_dict(self) -> dict:
        return {"box": list(self.box), "score": round(self.score, 4),
                "landmarks": [[round(x, 1), round(y, 1)] for x, y in self.landmarks]}


def detector_path() -> Path:
    """Path of the packaged YuNet model file."""
    return Path(str(resources.files("facemt") / "assets" / DETECTOR_FILE))


def check_detector_file(path: str | Path) -> None:
    """Raise FacemtError unless ``path`` is the YuNet model with the pinned SHA-256."""
    path = Path(path)
    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise FacemtError(f"face detector model {path} cannot be read ({exc.strerror or exc}); reinstall facemt") from None
    if digest != DETECTOR_SHA256:
        raise FacemtError(
            f"face detector model {path} does not match its pinned SHA-256 (got {digest[:12]}..., "
            f"expected {DETECTOR_SHA256[:12]}...); reinstall facemt"
        )


#: The longer side every picture is scanned at by the default detector (see :class:`FaceDetector`).
DETECTION_SIDE = 416
#: Candidates overlapping a stronger one by more than this (intersection over union) are the same face.
NMS_OVERLAP = 0.3
#: Rounds of :func:`_vote`'s weighting, each by the overlap with the previous round's merged box.
VOTE_ROUNDS = 4
#: Candidates scoring this much below a face's strongest weigh nothing in :func:`_vote`. Averaging every
#: candidate (a margin of 1) was steadier still but moved the built-in model's framing away from the one it
#: was trained on (UTKFace held-out age group 81.0 -> 80.1 %; benchmarks/RESULTS.md, "NMS with voting").
VOTE_MARGIN = 0.05


class FaceDetector:
    """YuNet (``cv2.FaceDetectorYN``) at a canonical scale. Faces come back largest first.

    The picture is always rescaled (up or down) so that its longer side is
    ``side`` pixels, then padded, before it is scanned: the detector's input
    depends on the picture's content and aspect ratio, never on its pixel
    count, so the same photo saved at any size gets the same box and
    landmarks (in its own pixels). With ``mirror`` the left-right mirror
    image is scanned too and each face's box and landmarks are the mean of
    the two scans, which halves the detector's own landmark noise.

    YuNet proposes a face from several anchors, often two with the same
    score but landmarks a few pixels apart; plain non-maximum suppression
    keeps one, and which one can flip with a change of one grey level (the
    same photo saved at another size moved the eyes by 5 % of their distance
    that way). Each face is therefore the weighted mean of the candidates
    that overlap its strongest one and score nearly as high (:func:`_vote`):
    the weights shrink to zero at the overlap threshold and
    :data:`VOTE_MARGIN` below the strongest score, so near-ties are averaged
    and never flip, while a clear winner answers as before (the landmarks
    the built-in model was trained on).

    Args:
        model_path: the ONNX file; the packaged one by default (its SHA-256 is
            checked when the first detector of a process is built).
        score_threshold: faces scoring below it are not reported.
        side: the longer side every picture is scanned at.
        pad: every side is padded by this fraction of ``side`` (border
            replicated) before scanning, so faces that fill a tight crop are
            still found.
        mirror: also scan the mirror image and average the two.
    """

    _checked: set[str] = set()

    def __init__(
        self,
        model_path: str | Path | None = None,
        score_threshold: float = 0.6,
        side: int = DETECTION_SIDE,
        pad: float = 0.15,
        mirror: bool = True,
    ) -> None:
        path = Path(model_path) if model_path is not None else detector_path()
        if str(path) not in self._checked:
            check_detector_file(path)
            self._checked.add(str(path))
        if isinstance(side, bool) or not isinstance(side, int) or side < 32:
            raise FacemtError(f"detection side must be a whole number of at least 32 pixels (got {side!r})")
        self.path, self.score_threshold = path, score_threshold
        self.side, self.pad, self.mirror = side, pad, mirror
        self._local = threading.local()  # a cv2 detector keeps state per input size: one per thread

    def _net(self, size: tuple[int, int]):
        net = getattr(self._local, "net", None)
        if net is None:
            _quiet_opencv()
            try:
                # no suppression here: _vote merges the candidates
                net = cv2.FaceDetectorYN.create(str(self.path), "", size, self.score_threshold, 1.0, 5000)
            except (cv2.error, AttributeError) as exc:
                raise FacemtError(f"OpenCV cannot run the face detector ({exc}); install opencv-python-headless>=4.8") from None
            self._local.net = net
        net.setInputSize(size)
        return net

    def _canonical(self, bgr: np.ndarray) -> np.ndarray:
        """The picture rescaled so that its longer side is ``side``."""
        h, w = bgr.shape[:2]
        scale = self.side / max(w, h)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return cv2.resize(bgr, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)

    def _scan(self, bgr: np.ndarray) -> np.ndarray:
        """N x 15 YuNet rows (box x, y, w, h, five landmarks, score) in ``bgr``'s pixels."""
        pad = int(round(self.pad * self.side))
        padded = cv2.copyMakeBorder(bgr, pad, pad, pad, pad, cv2.BORDER_REPLICATE) if pad else bgr
        _, rows = self._net((padded.shape[1], padded.shape[0])).detect(np.ascontiguousarray(padded))
        rows = np.zeros((0, 15)) if rows is None else np.asarray(rows, dtype=np.float64)
        rows = _vote(rows, self.score_threshold)
        rows[:, [0, 1, *range(4, 14)]] -= pad  # points and the box's corner; not its size
        return rows

    def detect(self, image: Image.Image, min_face: int = 0, max_faces: int | None = None) -> list[Face]:
        """Detect faces in an RGB picture.

        Args:
            image: the picture.
            min_face: faces whose box is narrower than this many pixels (in the
                picture) are not reported.
            max_faces: report at most this many (the largest).
        """
        rgb = np.asarray(image.convert("RGB"))
        h, w = rgb.shape[:2]
        bgr = self._canonical(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        size = (bgr.shape[1], bgr.shape[0])
        rows = self._scan(bgr)
        if self.mirror and len(rows):
            rows = _average_mirrored(rows, _mirror_rows(self._scan(bgr[:, ::-1]), size[0]))
        # scan pixel centres -> picture pixel centres (the resize maps centres onto centres)
        fx, fy = w / size[0], h / size[1]
        faces = []
        for row in rows:
            x, y, bw, bh = row[0] * fx, row[1] * fy, row[2] * fx, row[3] * fy
            if bw < min_face:
                continue
            points = (row[4:14].reshape(5, 2) + 0.5) * (fx, fy) - 0.5
            box = (int(round(x)), int(round(y)), max(1, int(round(bw))), max(1, int(round(bh))))
            faces.append(Face(box, float(row[14]), tuple((float(a), float(b)) for a, b in points)))
        faces.sort(key=lambda f: f.box[2] * f.box[3], reverse=True)
        return faces[:max_faces] if max_faces is not None else faces


#: The five landmarks of a mirrored face, in the unmirrored order (the eyes and mouth corners swap).
_MIRRORED_POINTS = [1, 0, 2, 4, 3]


def _mirror_rows(rows: np.ndarray, width: int) -> np.ndarray:
    """YuNet rows found in a mirrored scan, in the unmirrored scan's pixels."""
    out = rows.copy()
    out[:, 0] = width - rows[:, 0] - rows[:, 2]
    points = rows[:, 4:14].reshape(-1, 5, 2)[:, _MIRRORED_POINTS].copy()
    points[..., 0] = width - 1 - points[..., 0]
    out[:, 4:14] = points.reshape(-1, 10)
    return out


def _vote(rows: np.ndarray, threshold: float, overlap: float = NMS_OVERLAP) -> np.ndarray:
    """Non-maximum suppression with voting over YuNet rows (x, y, w, h, five landmarks, score).

    The same faces as greedy suppression keeps (the strongest candidate, then
    the strongest that overlaps no kept one by more than ``overlap``), each
    with the box and landmarks averaged over the candidates it suppresses and
    itself, weighted by ``(score - floor) * (iou - overlap)``, where ``floor``
    is :data:`VOTE_MARGIN` below the strongest score (never below
    ``threshold``): a candidate at either limit weighs nothing, so none
    enters or leaves with a jump.
    ``iou`` is first the overlap with the strongest candidate, then (for
    :data:`VOTE_ROUNDS` rounds) with the merged box, which converges to the
    same face whichever of two equal candidates came first. Its score stays
    the strongest candidate's.
    """
    rows = rows[np.argsort(-rows[:, 14], kind="stable")]
    left = np.ones(len(rows), dtype=bool)
    kept = []
    for i, top in enumerate(rows):
        if not left[i]:
            continue
        iou = np.where(left, _ious(top[:4], rows[:, :4]), 0.0)
        members = left & (iou > overlap)
        members[i] = True
        group, merged = rows[members], top.copy()
        floor = max(threshold, top[14] - VOTE_MARGIN)  # a clear winner answers alone, near-ties are averaged
        for _ in range(VOTE_ROUNDS):  # overlaps with the merged box, not the strongest: the same whichever is first
            weights = np.clip(group[:, 14] - floor, 0, None) * np.clip(iou[members] - overlap, 0, None)
            if not weights.sum() > 0:
                break
            merged[:14] = weights @ group[:, :14] / weights.sum()
            iou[members] = _ious(merged[:4], group[:, :4])
        kept.append(merged)
        left &= ~members
    return np.array(kept, dtype=np.float64).reshape(-1, 15)


def _average_mirrored(rows: np.ndarray, mirrored: np.ndarray) -> np.ndarray:
    """Each face of ``rows`` averaged with the mirrored scan's face that overlaps it most
    (intersection over union above 0.5); a face without such a partner is kept as it is."""
    out = rows.copy()
    for i, row in enumerate(rows):
        if not len(mirrored):
            break
        overlap = [box_iou(row[:4], other[:4]) for other in mirrored]
        j = int(np.argmax(overlap))
        if overlap[j] > 0.5:
            out[i] = (row + mirrored[j]) / 2
    return out


def _ious(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one (x, y, width, height) box with each row of ``boxes``."""
    x0, y0 = np.maximum(box[0], boxes[:, 0]), np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[0] + box[2], boxes[:, 0] + boxes[:, 2])
    y1 = np.minimum(box[1] + box[3], boxes[:, 1] + boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    union = box[2] * box[3] + boxes[:, 2] * boxes[:, 3] - inter
    return np.divide(inter, union, out=np.zeros(len(boxes)), where=union > 0)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two (x, y, width, height) boxes."""
    return float(_ious(np.asarray(a, dtype=np.float64), np.asarray([b], dtype=np.float64)[:, :4])[0])


def _quiet_opencv() -> None:
    """OpenCV 5 logs a warning per detector about its DNN targets; facemt reports errors itself."""
    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:  # builds without the logging module
        pass


_DETECTOR: FaceDetector | None = None
_DETECTOR_LOCK = threading.Lock()


def default_detector() -> FaceDetector:
    """One shared detector per process (built, and its file checked, on first use)."""
    global _DETECTOR
    with _DETECTOR_LOCK:
        if _DETECTOR is None:
            _DETECTOR = FaceDetector()
        return _DETECTOR


def alignment_matrix(face: Face, policy: CropPolicy, side: int, input_size: int) -> np.ndarray:
    """The 2x3 similarity transform taking the picture to a ``side`` x ``side``
    face image whose centred ``input_size`` square is the canonical frame."""
    (lx, ly), (rx, ry) = face.eyes
    angle = np.arctan2(ry - ly, rx - lx)
    distance = max(np.hypot(rx - lx, ry - ly), 1e-6)
    scale = policy.eye_distance * input_size / distance
    cos, sin = scale * np.cos(-angle), scale * np.sin(-angle)
    rotation = np.array([[cos, -sin], [sin, cos]])
    eyes_mid = np.array([(lx + rx) / 2, (ly + ry) / 2])
    target = np.array([side / 2, side / 2 + (policy.eye_y - 0.5) * input_size])
    return np.hstack([rotation, (target - rotation @ eyes_mid)[:, None]])


def crop_box(image: Image.Image, box: tuple[int, int, int, int], margin: float) -> Image.Image:
    """A square crop around ``box`` grown by ``margin`` x its size on every side;
    parts outside the image are filled by replicating the border."""
    left, top, size = _box_crop(box, margin)
    arr = np.asarray(image)
    pad = max(0, -left, -top, left + size - arr.shape[1], top + size - arr.shape[0])
    if pad:
        arr = cv2.copyMakeBorder(arr, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    crop = arr[top + pad : top + pad + size, left + pad : left + pad + size]
    return Image.fromarray(np.ascontiguousarray(crop))


#: A shrinking alignment warp runs at this many times the output resolution, then is area-reduced.
SUPERSAMPLE = 4


def _box_crop(box: tuple[int, int, int, int], margin: float) -> tuple[int, int, int]:
    """``crop_box``'s square: left, top and side in the picture's pixels."""
    x, y, w, h = box
    side = max(w, h) * (1 + 2 * margin)
    cx, cy = x + w / 2, y + h / 2
    return int(round(cx - side / 2)), int(round(cy - side / 2)), max(1, int(round(side)))


def shrink(image: Image.Image, side: int) -> np.ndarray:
    """Resize so the shorter side is ``side`` (never enlarging, keeping the
    aspect ratio) and return HxWx3 uint8: what the decode-once cache holds."""
    w, h = image.size
    scale = side / min(w, h)
    if scale < 1:
        image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC, reducing_gap=3.0)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8))


def face_image(image: Image.Image, face: Face | None, policy: CropPolicy, side: int, input_size: int) -> np.ndarray:
    """One face of ``image`` framed by ``policy`` as HxWx3 uint8 (shorter side
    ``side``); ``face=None`` uses the whole picture."""
    if face is None:
        return shrink(image, side)
    if policy.mode == "box":
        return shrink(crop_box(image, face.box, policy.margin), side)
    return warp(np.asarray(image), alignment_matrix(face, policy, side, input_size), side)


def warp(picture: np.ndarray, matrix: np.ndarray, side: int) -> np.ndarray:
    """``side`` x ``side`` image of ``picture`` under the 2x3 similarity ``matrix``, the same at any photo size.

    ``cv2.warpAffine`` has no area interpolation (asked for ``INTER_AREA`` it
    silently interpolates bilinearly), so shrinking a large photo by a big
    factor in the warp would alias: fine false detail, like skin texture that
    small web photos never show, and an answer that changes with the photo's
    resolution. A shrinking warp is therefore done at :data:`SUPERSAMPLE` times
    the output resolution, from the part of the photo it needs shrunk with area
    interpolation to that scale first, and then area-reduced to ``side``;
    enlarging uses bicubic interpolation.
    """
    matrix = np.asarray(matrix, dtype=np.float64)
    scale = float(np.hypot(matrix[0, 0], matrix[0, 1]))
    if scale >= 1:
        return np.ascontiguousarray(cv2.warpAffine(picture, matrix, (side, side), flags=cv2.INTER_CUBIC,
                                                   borderMode=cv2.BORDER_REPLICATE))
    k = SUPERSAMPLE
    # output pixel i covers supersampled pixels k*i .. k*i + k - 1, whose centre is k*i + (k - 1) / 2
    fine = np.hstack([matrix[:, :2] * k, matrix[:, 2:] * k + (k - 1) / 2])
    fine_scale = scale * k
    if fine_scale < 1:
        corners = cv2.transform(np.array([[[0, 0], [side * k, 0], [0, side * k], [side * k, side * k]]], np.float64),
                                cv2.invertAffineTransform(fine))[0]
        pad = 2 / fine_scale  # the interpolation's neighbours, in photo pixels
        h, w = picture.shape[:2]
        x0, y0 = (max(0, int(np.floor(v - pad))) for v in corners.min(0))
        x1, y1 = min(w, int(np.ceil(corners[:, 0].max() + pad))), min(h, int(np.ceil(corners[:, 1].max() + pad)))
        if x1 > x0 and y1 > y0:  # else the face lies outside the photo: the plain warp replicates its border
            part = picture[y0:y1, x0:x1]
            size = (max(1, round(part.shape[1] * fine_scale)), max(1, round(part.shape[0] * fine_scale)))
            small = cv2.resize(part, size, interpolation=cv2.INTER_AREA)
            fx, fy = size[0] / part.shape[1], size[1] / part.shape[0]
            # a pixel (x, y) of ``small`` is photo pixel ((x + 0.5) / fx - 0.5 + x0, (y + 0.5) / fy - 0.5 + y0)
            to_photo = np.array([[1 / fx, 0, 0.5 / fx - 0.5 + x0], [0, 1 / fy, 0.5 / fy - 0.5 + y0], [0, 0, 1]])
            fine, picture = fine @ to_photo, small
    out = cv2.warpAffine(picture, fine, (side * k, side * k), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return np.ascontiguousarray(cv2.resize(out, (side, side), interpolation=cv2.INTER_AREA))


def face_to_photo(photo_size: tuple[int, int], face: Face | None, policy: CropPolicy, side: int,
                  input_size: int) -> np.ndarray:
    """3x3 affine matrix from a framed face image's pixels (what :func:`face_image`
    returns) back to the photo's pixels, for every crop policy."""
    if face is not None and policy.mode == "align":
        return np.vstack([cv2.invertAffineTransform(alignment_matrix(face, policy, side, input_size)), [0, 0, 1]])
    if face is not None and policy.mode == "box":
        left, top, size = _box_crop(face.box, policy.margin)
        width = height = size
    else:
        (width, height), left, top = photo_size, 0, 0
    scale = side / min(width, height)
    shrunk = (max(1, round(width * scale)), max(1, round(height * scale))) if scale < 1 else (width, height)
    return np.array([[width / shrunk[0], 0, left], [0, height / shrunk[1], top], [0, 0, 1]], dtype=np.float64)


def extract_faces(
    image: Image.Image,
    policy: CropPolicy,
    side: int,
    input_size: int,
    *,
    largest_only: bool = False,
    fallback: bool = False,
    min_face: int = 0,
    max_faces: int | None = None,
    detector: FaceDetector | None = None,
) -> list[tuple[Face | None, np.ndarray]]:
    """Every face of a picture, framed by the crop policy.

    Args:
        image: an RGB picture.
        policy: the run's crop policy (``none``: the whole picture is one face).
        side, input_size: the cached side and the network input side.
        largest_only: keep only the largest face.
        fallback: when no face is found, return the whole picture as one face
            (``Face`` None) instead of nothing.
        min_face, max_faces: see :meth:`FaceDetector.detect`.

    Returns:
        ``(face, HxWx3 uint8)`` pairs, largest face first; ``face`` is None when
        the whole picture was used.
    """
    if not policy.detects:
        return [(None, shrink(image, side))]
    faces = (detector or default_detector()).detect(image, min_face, 1 if largest_only else max_faces)
    if not faces:
        return [(None, shrink(image, side))] if fallback else []
    return [(f, face_image(image, f, policy, side, input_size)) for f in faces]


def framing(policy: CropPolicy, face: Face | None) -> str:
    """How a face image was made: ``aligned``, ``boxed`` or ``whole``."""
    if face is None:
        return "whole"
    return "aligned" if policy.mode == "align" else "boxed"


def eye_angle(points: Sequence[tuple[float, float]]) -> float:
    """Angle of the eye line in degrees (0 = level), from the first two landmarks."""
    (lx, ly), (rx, ry) = points[0], points[1]
    return float(np.degrees(np.arctan2(ry - ly, rx - lx)))
