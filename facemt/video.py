"""Videos: frames decoded with OpenCV, sampled in time, faces tracked across
frames and every face's three labels predicted, streamed row by row.

A video row is a :class:`VideoPrediction`: a photo's :class:`Prediction`
plus the frame number, its time and the face's ``track`` (the same person
keeps one track id while they stay in the picture). Frames are predicted
exactly as a photo is (the same detector, framing and batches), so a frame's
labels equal ``predict`` on that frame saved as a lossless image, within
:data:`facemt.inference.PROBABILITY_TOLERANCE`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import cv2
import numpy as np

from facemt.errors import FacemtError
from facemt.faces import box_iou
from facemt.inference import Prediction, _answers, _frame
from facemt.tasks import PERSON_HEADS, TASKS, per_person

if TYPE_CHECKING:
    import pandas as pd

    from facemt.inference import Predictor

# FFmpeg prints its own decoder complaints on stderr; facemt says what went wrong in one line itself
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

#: File name extensions read as videos (any case).
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv"})

#: With no ``fps`` asked for, every frame is used up to this many per second.
DEFAULT_MAX_FPS = 10.0

#: Two faces in consecutive sampled frames are one track when they match at least this well (:func:`match`).
TRACK_MATCH = 0.3

#: A track not seen for this many seconds ends; a face found later gets a new id.
TRACK_GAP_S = 1.0


def is_video_file(path: str | os.PathLike) -> bool:
    """Whether ``path``'s extension is a video's (:data:`VIDEO_EXTENSIONS`)."""
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


@dataclass
class VideoPrediction(Prediction):
    """One face in one sampled frame of a video (or a frame without a face).

    Attributes:
        frame: the frame's number in the video, from 0.
        time_s: the frame's time in seconds.
        track: the face's track id in this video, from 0 (None without a face).
    """

    frame: int | None = None
    time_s: float | None = None
    track: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(frame=self.frame, time_s=None if self.time_s is None else round(self.time_s, 4), track=self.track)
        return out


@dataclass
class VideoInfo:
    """What the container says of a video."""

    fps: float
    frames: int
    width: int
    height: int


def open_video(path: str | os.PathLike) -> tuple[cv2.VideoCapture, VideoInfo]:
    """Open a video for decoding.

    Raises:
        FacemtError: the file does not exist or no decoder reads it.
    """
    path = Path(path)
    if not path.is_file():
        raise FacemtError(f"{path}: no such video file")
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise FacemtError(f"{path}: cannot read this video (damaged, truncated, or a codec OpenCV lacks)")
    fps = capture.get(cv2.CAP_PROP_FPS)
    info = VideoInfo(fps if fps and math.isfinite(fps) and fps > 0 else 25.0,
                     max(0, int(capture.get(cv2.CAP_PROP_FRAME_COUNT))),
                     int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    return capture, info


def sample_rate(info: VideoInfo, fps: float | None) -> float:
    """Frames per second that are predicted: ``fps`` (at most the video's), or with
    None every frame up to :data:`DEFAULT_MAX_FPS`."""
    if fps is not None and (not math.isfinite(fps) or fps <= 0):
        raise FacemtError(f"--fps must be a positive number of frames per second (got {fps})")
    return min(info.fps, fps if fps is not None else DEFAULT_MAX_FPS)


def expected_samples(info: VideoInfo, fps: float | None) -> int:
    """How many frames :func:`iter_frames` yields for a complete video (0 when the length is unknown)."""
    rate = sample_rate(info, fps)
    return sum(1 for i in range(info.frames) if _slot(i, info.fps, rate) > _slot(i - 1, info.fps, rate))


def _slot(index: int, fps: float, rate: float) -> int:
    """The sampling interval a frame falls in; a frame is sampled when it opens a new one."""
    return -1 if index < 0 else math.floor(index / fps * rate + 1e-6)


def iter_frames(path: str | os.PathLike, fps: float | None = None) -> Iterator[tuple[int, float, np.ndarray]]:
    """Decode a video and yield ``(frame number, time in seconds, HxWx3 RGB uint8)``
    for the sampled frames, one at a time (the video is never held in memory).

    Raises:
        FacemtError: the video cannot be opened, or it ends before the frame
            count its container states (truncated); frames before that are
            yielded first.
    """
    capture, info = open_video(path)
    rate = sample_rate(info, fps)
    index = 0
    try:
        while True:
            ok = capture.grab()
            if not ok:
                break
            if _slot(index, info.fps, rate) > _slot(index - 1, info.fps, rate):
                ok, bgr = capture.retrieve()
                if not ok or bgr is None:
                    break
                yield index, index / info.fps, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        capture.release()
    if info.frames and index < info.frames - 1:
        raise FacemtError(f"{path}: the video ends at frame {index} of the {info.frames} it states "
                          "(truncated or damaged); the frames before were predicted")


def match(a: Sequence[float], b: Sequence[float]) -> float:
    """How well two (x, y, width, height) boxes can be one face: their intersection over
    union, or, for a face that moved further than its boxes overlap, one minus the
    distance of their centres in face widths, whichever is larger."""
    size = (a[2] + a[3] + b[2] + b[3]) / 4
    distance = math.hypot(a[0] + a[2] / 2 - b[0] - b[2] / 2, a[1] + a[3] / 2 - b[1] - b[3] / 2)
    return max(box_iou(a, b), 1 - distance / size if size > 0 else 0.0)


class Tracker:
    """Face tracks across sampled frames: each face (largest first) takes the free
    track whose last box it matches best (:func:`match`, at least ``min_match``);
    a track unseen for ``gap_s`` seconds ends."""

    def __init__(self, gap_s: float = TRACK_GAP_S, min_match: float = TRACK_MATCH) -> None:
        self.gap_s, self.min_match = gap_s, min_match
        self.tracks: dict[int, tuple[tuple[int, int, int, int], float]] = {}  # id -> (last box, last time)
        self.next_id = 0

    def assign(self, boxes: Sequence[tuple[int, int, int, int]], time_s: float) -> list[int]:
        """Track ids for the faces of one frame, in the order of ``boxes``."""
        self.tracks = {k: v for k, v in self.tracks.items() if time_s - v[1] <= self.gap_s}
        free = dict(self.tracks)
        ids = []
        for box in boxes:
            scores = {k: match(box, last) for k, (last, _) in free.items()}
            best = max(scores, key=scores.get, default=None)
            if best is None or scores[best] < self.min_match:
                best, self.next_id = self.next_id, self.next_id + 1
            else:
                del free[best]
            self.tracks[best] = (box, time_s)
            ids.append(best)
        return ids


class Smoother:
    """Exponential smoothing of each track's probabilities over time (time constant
    ``seconds``): causal, so rows can still be streamed."""

    def __init__(self, seconds: float) -> None:
        if not math.isfinite(seconds) or seconds <= 0:
            raise FacemtError(f"--smooth must be a positive number of seconds (got {seconds})")
        self.seconds = seconds
        self.state: dict[int, tuple[float, dict[str, np.ndarray]]] = {}

    def __call__(self, row: VideoPrediction) -> None:
        probs = {t: np.array([row.probabilities[t][c] for c in TASKS[t].classes]) for t in row.probabilities}
        last = self.state.get(row.track)
        if last is not None:
            keep = math.exp(-(row.time_s - last[0]) / self.seconds)
            probs = {t: keep * last[1][t] + (1 - keep) * p for t, p in probs.items()}
        self.state[row.track] = (row.time_s, probs)
        row.labels, row.probabilities = _answers({t: p[None] for t, p in probs.items()}, 0)


def predict_video(
    predictor: "Predictor",
    path: str | os.PathLike,
    fps: float | None = None,
    smooth: float | None = None,
    fallback: bool = False,
    min_face: int = 0,
    max_faces: int | None = None,
    per_track: bool = False,
) -> Iterator[VideoPrediction]:
    """Stream one row per face per sampled frame of a video (a ``no_face`` row
    for a frame without a face), in frame order, batched like photos.

    Args:
        predictor: a loaded model (:func:`facemt.load`).
        path: the video file.
        fps: frames per second to predict (default: every frame, up to
            :data:`DEFAULT_MAX_FPS`).
        smooth: exponential smoothing of each track's probabilities with this
            time constant in seconds (None: off, each frame on its own).
        fallback, min_face, max_faces: as for photos (:meth:`Predictor.predict_files`).
        per_track: each track is one person: its rows share one age group and
            gender answer, from all its frames (:func:`facemt.tasks.per_person`
            over the frames' own probabilities, unsmoothed); expression stays
            each frame's. The rows then come when the video ends.

    Raises:
        FacemtError: the video cannot be read, or it is truncated (raised after
            the rows of the frames before).
    """
    smoother = Smoother(smooth) if smooth is not None else None
    tracker = Tracker()
    slots: list[VideoPrediction] = []
    arrays: list[np.ndarray] = []
    held: list[VideoPrediction] = []  # per_track: the video's rows, until every track is complete
    raw: dict[str, list[np.ndarray]] = {t: [] for t in PERSON_HEADS if per_track and t in predictor.tasks}

    def flush() -> Iterator[VideoPrediction]:
        waiting = [p for p in slots if p.status == "ok"]
        if waiting:
            probs = predictor.probabilities(arrays)
            for t in raw:
                raw[t].append(probs[t])
            for i, p in enumerate(waiting):
                p.labels, p.probabilities = _answers(probs, i)
                if smoother is not None and p.track is not None:
                    smoother(p)
        if per_track:
            held.extend(slots)
        else:
            yield from slots
        slots.clear()
        arrays.clear()

    source = str(path)
    try:
        for index, time_s, rgb in iter_frames(path, fps):
            units = _frame(rgb, predictor.preprocess, largest_only=False, fallback=fallback, min_face=min_face,
                           max_faces=max_faces)
            if not units:
                slots.append(VideoPrediction(source, no_face=True, frame=index, time_s=time_s))
            tracks = iter(tracker.assign([f.box for f, _ in units if f is not None], time_s))
            for i, (face, array) in enumerate(units):
                row = VideoPrediction(source, frame=index, time_s=time_s, track=next(tracks) if face else None)
                row.set_face(face, i if predictor.preprocess.policy.detects else None, predictor.preprocess)
                slots.append(row)
                arrays.append(array)
            if len(arrays) >= predictor.batch_size:
                yield from flush()
    finally:  # a truncated video keeps the rows of the frames before (the error follows them)
        yield from flush()
        if per_track:
            one_answer_per_track(held, {t: np.concatenate(r) for t, r in raw.items() if r})
            yield from held


def one_answer_per_track(rows: Sequence[VideoPrediction], probs: dict[str, np.ndarray]) -> None:
    """Give every track of ``rows`` one answer per head of ``probs`` (each head's probabilities of the ``ok``
    rows, in order): the track's pooled answer (:func:`facemt.tasks.per_person`)."""
    faces = [r for r in rows if r.status == "ok"]
    pooled = {t: per_person(p, [r.track for r in faces]) for t, p in probs.items()}
    for i, row in enumerate(faces):
        labels, probabilities = _answers(pooled, i)
        row.labels.update(labels)
        row.probabilities.update(probabilities)


def iter_media_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into a sorted list of image and video files
    (folders recursively, by extension).

    Raises:
        FacemtError: a path that does not exist.
    """
    from facemt.images import is_image_file

    out: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FacemtError(f"{p}: no such file or folder")
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file() and (is_image_file(q) or is_video_file(q))))
        else:
            out.append(p)
    return out


def plot_timeline(frame: "pd.DataFrame", path: str | os.PathLike, max_tracks: int = 6) -> None:
    """Each head's probabilities over time, one row of panels per track (the
    ``max_tracks`` longest of each video): age group and gender as lines,
    expression as stacked areas. Written atomically to ``path`` (PNG, PDF or SVG)."""
    from facemt.files import make_temp

    faces = frame[frame["status"] == "ok"].dropna(subset=["track"])
    if faces.empty:
        raise FacemtError(f"--plot {path}: no face was found in any sampled frame, nothing to draw")
    fig = timeline_figure(faces, max_tracks)
    import matplotlib.pyplot as plt  # after timeline_figure chose the Agg backend

    out = Path(path)
    tmp = make_temp(out)
    try:
        fig.savefig(tmp, format=out.suffix.lstrip(".").lower() or "png", dpi=120)
        os.replace(tmp, out)
    except (OSError, ValueError) as exc:
        raise FacemtError(f"--plot {out}: cannot write the figure ({exc})") from None
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


def timeline_figure(faces: "pd.DataFrame", max_tracks: int = 6):
    """The matplotlib figure of :func:`plot_timeline` for rows that all have a face and a track."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in TASKS if t in faces.columns]
    groups = []
    for video, rows in faces.groupby("path", sort=False):
        sizes = rows.groupby("track").size().sort_values(ascending=False)
        groups += [(video, track, rows[rows["track"] == track]) for track in sizes.index[:max_tracks]]
    fig, axes = plt.subplots(len(groups), len(tasks), figsize=(4.2 * len(tasks), 2.4 * len(groups) + 0.6),
                             squeeze=False, sharex="row")
    for row, (video, track, rows) in enumerate(groups):
        for col, task in enumerate(tasks):
            ax, classes = axes[row][col], TASKS[task].classes
            values = [rows[f"{task}_p_{c}"].to_numpy(float) for c in classes]
            if task == "expression":
                ax.stackplot(rows["time_s"], values, labels=classes, alpha=0.85)
            else:
                for c, v in zip(classes, values):
                    ax.plot(rows["time_s"], v, label=c)
            ax.set_ylim(0, 1)
            ax.set_title(f"{Path(video).name}, track {int(track)}: {task.replace('_', ' ')}", fontsize=9)
            ax.set_xlabel("time (s)")
            if row == 0:  # above the panels: inside, a legend would hide the probabilities it names
                ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.1), ncol=3, frameon=False)
    fig.tight_layout()
    return fig


def to_frame(rows: Sequence[VideoPrediction], tasks: Sequence[str]) -> "pd.DataFrame":
    """Video rows as a pandas DataFrame: ``path, frame, time_s, track, face, status,
    framing, score, box_x .. box_h, landmarks``, then per head its label and one
    ``{task}_p_{class}`` column per class."""
    import pandas as pd

    records = []
    for r in rows:
        rec: dict[str, Any] = {"path": r.source, "frame": r.frame, "time_s": r.time_s, "track": r.track,
                               "face": r.face, "status": r.status, "framing": r.framing, "score": r.score}
        rec.update(zip(("box_x", "box_y", "box_w", "box_h"), r.box or (None,) * 4))
        rec["landmarks"] = r.landmarks
        for t in tasks:
            rec[t] = r.labels.get(t)
            for c in TASKS[t].classes:
                rec[f"{t}_p_{c}"] = r.probabilities[t][c] if t in r.probabilities else np.nan
        records.append(rec)
    frame = pd.DataFrame.from_records(records)
    for column in ("frame", "track", "face", "box_x", "box_y", "box_w", "box_h"):
        if column in frame:
            frame[column] = frame[column].astype("Int64")
    return frame


__all__ = ["VIDEO_EXTENSIONS", "Tracker", "VideoPrediction", "is_video_file", "iter_frames", "iter_media_files",
           "plot_timeline", "predict_video", "to_frame"]
