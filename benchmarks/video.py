"""Video throughput on 2 CPU cores: decoding alone, and `predict_video` (detection, framing, network,
tracking) at the default sampling (every frame up to 10 per second) and at every frame, on a generated
clip (a drawn face sliding across a 640 x 480 frame, MJPG) or on --video FILE.

    python benchmarks/video.py [--video FILE] [--seconds 10] [--fps-in 30] [--results benchmarks/RESULTS.md]

A benchmark, not a test: nothing here asserts. Frames per second are sampled frames predicted per
wall-clock second; "x real time" is seconds of video per second of work.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import publish  # noqa: E402

import facemt  # noqa: E402
from facemt.synth import draw_face, make_person  # noqa: E402
from facemt.video import iter_frames, open_video, predict_video  # noqa: E402


def generated_clip(path: Path, seconds: float, fps: float, size=(640, 480)) -> Path:
    rng = np.random.default_rng(0)
    face = np.asarray(draw_face(make_person(1, "middle", "female", rng), "happiness", rng, (200, 250)))
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    frames = int(seconds * fps)
    for i in range(frames):
        canvas = np.full((size[1], size[0], 3), 110, np.uint8)
        x = int(20 + (size[0] - 240) * i / max(1, frames - 1))
        canvas[110:360, x:x + 200] = face
        writer.write(cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def decode_opencv(path: Path) -> int:
    capture = cv2.VideoCapture(str(path))
    frames = 0
    while capture.isOpened():
        ok, bgr = capture.read()
        if not ok:
            break
        cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        frames += 1
    capture.release()
    return frames


def decode_pyav(path: Path) -> int:
    import av

    frames = 0
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                frame.to_ndarray(format="rgb24")
                frames += 1
    except av.error.FFmpegError:
        pass
    return frames


def decoders(folder: Path, clip: Path, seconds: float, fps: float) -> list[str]:
    """OpenCV against PyAV (when installed): decoding speed on the clip as MJPG/AVI and MPEG-4/MP4, and
    how many frames each reads from the same files cut in half."""
    try:
        import av  # noqa: F401
    except ImportError:
        return ["", "PyAV is not installed: `pip install av` to compare decoders."]
    mp4 = folder / "clip.mp4"
    writer = cv2.VideoWriter(str(mp4), cv2.VideoWriter_fourcc(*"mp4v"), fps, (640, 480))
    for _, _, rgb in iter_frames(clip, fps=fps):
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    lines = ["", "| file | decoder | frames read | frames/s |", "|---|---|---|---|"]
    files = [clip, mp4]
    for f in (clip, mp4):
        cut = folder / f"cut{f.suffix}"
        cut.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        files.append(cut)
    for f in files:
        for name, decode in (("OpenCV", decode_opencv), ("PyAV", decode_pyav)):
            started = time.perf_counter()
            frames = decode(f)
            seconds_taken = time.perf_counter() - started
            label = f"{f.suffix[1:]} (cut in half)" if f.stem == "cut" else f.suffix[1:]
            lines.append(f"| {label} | {name} | {frames} | {frames / seconds_taken:.0f} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--video", type=Path, help="a video to measure on (default: a generated clip)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of the generated clip")
    p.add_argument("--fps-in", type=float, default=30.0, help="frame rate of the generated clip")
    p.add_argument("--results", default="benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        video = args.video or generated_clip(Path(tmp) / "clip.avi", args.seconds, args.fps_in)
        decoding = decoders(Path(tmp), video, args.seconds, args.fps_in) if args.video is None else []
        capture, info = open_video(video)
        capture.release()
        length = info.frames / info.fps
        started = time.perf_counter()
        decoded = sum(1 for _ in iter_frames(video, fps=info.fps))
        decode_s = time.perf_counter() - started
        model = facemt.load()
        rows = []
        for label, fps in (("default (up to 10 per second)", None), ("every frame", info.fps)):
            started = time.perf_counter()
            out = list(predict_video(model, video, fps=fps))
            seconds = time.perf_counter() - started
            frames = len({r.frame for r in out})
            tracks = len({r.track for r in out if r.track is not None})
            rows.append((label, frames, seconds, tracks, sum(r.status == "ok" for r in out)))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    command = "python benchmarks/video.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"\n### Video throughput at commit {commit}\n", "```", command, "```", "",
             f"{'generated clip' if args.video is None else args.video.name}: {info.width} x {info.height}, "
             f"{info.fps:g} frames/s, {info.frames} frames ({length:.1f} s); engine {model.engine}, 2 CPU cores. "
             f"Decoding alone (OpenCV): {decoded / decode_s:.0f} frames/s.", "",
             "| sampling | frames predicted | faces | tracks | seconds | frames/s | x real time |",
             "|---|---|---|---|---|---|---|"]
    for label, frames, seconds, tracks, faces in rows:
        lines.append(f"| {label} | {frames} | {faces} | {tracks} | {seconds:.1f} | {frames / seconds:.1f} | "
                     f"{length / seconds:.2f} |")
    publish(lines + decoding, args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
