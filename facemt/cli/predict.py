"""``facemt predict`` (photos and videos) and ``facemt merge-predictions``."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from facemt.errors import FacemtError
from facemt.config import CROP_POLICIES, PERSON_FROM
from facemt.tasks import TASK_NAMES, TASKS

from facemt.cli.common import (
    EXIT_OK, EXIT_PARTIAL, EPILOG, bars, timing, crop_override, add_engine_arg, add_tta_arg, add_prior_arg,
    add_model_arg,
)


_VIDEO_COLUMNS = ["frame", "time_s", "track"]


def _csv_header(video: bool = False) -> list[str]:
    header = ["path", *(_VIDEO_COLUMNS if video else []), "status", "face", "framing", "score",
              "box_x", "box_y", "box_w", "box_h", *(["landmarks"] if video else []), "error"]
    for t in TASK_NAMES:
        header += [t] + [f"{t}_p_{c}" for c in TASKS[t].classes]
    return header


def _csv_row(p) -> dict[str, Any]:
    row: dict[str, Any] = {"path": p.source, "status": p.status, "error": p.error or "",
                           "face": "" if p.face is None else p.face, "framing": p.framing or "",
                           "score": "" if p.score is None else p.score}
    for k, v in zip(("box_x", "box_y", "box_w", "box_h"), p.box or ("", "", "", "")):
        row[k] = v
    for k in _VIDEO_COLUMNS:
        value = getattr(p, k, None)
        row[k] = "" if value is None else round(value, 4) if k == "time_s" else value
    row["landmarks"] = json.dumps(p.landmarks) if p.landmarks else ""
    for t, label in p.labels.items():
        row[t] = label
        row.update({f"{t}_p_{c}": f"{v:.6f}" for c, v in p.probabilities[t].items()})
    return row


class _Sink:
    """Writes predictions as they come: CSV or JSON lines to a file (atomically, on
    success) or CSV to stdout; keeps what the table or a JSON array needs."""

    def __init__(self, fmt: str, path: Path | None, tasks: Sequence[str], video: bool = False) -> None:
        self.fmt, self.path, self.kept = fmt, path, []
        self.header = [h for h in _csv_header(video) if h.split("_p_")[0] not in set(TASK_NAMES) - set(tasks)]
        self.tmp = None
        if path is not None:
            from facemt.files import make_temp

            path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = make_temp(path)
            self.file = open(self.tmp, "w", newline="", encoding="utf-8")
        else:
            self.file = sys.stdout
        self.writer = csv.DictWriter(self.file, fieldnames=self.header, extrasaction="ignore") if fmt == "csv" else None
        if self.writer:
            self.writer.writeheader()

    def write(self, p) -> None:
        if self.fmt == "csv":
            self.writer.writerow(_csv_row(p))
        elif self.fmt == "jsonl":
            self.file.write(json.dumps(p.to_dict()) + "\n")
        else:
            self.kept.append(p)  # table or JSON array: needs them all

    def close(self, ok: bool) -> None:
        if self.fmt == "json":
            self.file.write(json.dumps([p.to_dict() for p in self.kept], indent=2) + "\n")
        if self.path is None:
            self.file.flush()
            return
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        try:
            if not ok:
                return
            os.replace(self.tmp, self.path)
        except OSError as exc:
            raise FacemtError(f"--out {self.path}: cannot write there ({exc.strerror or exc})") from None
        finally:
            Path(self.tmp).unlink(missing_ok=True)


def cmd_predict(args: argparse.Namespace, out: Console, err: Console) -> int:
    from facemt.inference import load
    from facemt.video import is_video_file, iter_media_files

    out_path = Path(args.out) if args.out else None
    if out_path is not None:
        suffix = out_path.suffix.lower()
        if suffix not in (".csv", ".jsonl"):
            raise FacemtError(f"--out {out_path}: use a .csv or .jsonl file name")
        fmt = suffix[1:]
    else:
        fmt = "json" if args.json else "csv" if args.csv else "table"
    _split_predict_inputs(args)
    shard = _predict_shard(args)
    if shard is not None and out_path is None:
        raise FacemtError("a sharded prediction writes a part file: give --out FILE.csv or FILE.jsonl")
    from facemt.checkpoint import resolve_run

    if not resolve_run(args.model).is_dir():  # the cheap checks first: a typo is said before any work
        raise FacemtError(f"{args.model}: no such run folder (give the --out folder of 'facemt fit')")
    files = all_files = iter_media_files(args.inputs)
    if not files:
        raise FacemtError("no image or video files found in the given inputs")
    videos = any(is_video_file(f) for f in all_files)
    _check_video_options(args, videos)
    _check_person_options(args, videos, shard, all_files)
    if shard is not None:
        from facemt.shards import part_path, take_shard

        files = take_shard(all_files, *shard)
        out_path = part_path(out_path, *shard)
    from facemt.files import check_writable

    if out_path is not None:
        check_writable(out_path, args.overwrite)
    if args.plot:
        check_writable(args.plot, args.overwrite, flag="--plot")
    predictor = load(args.model, device=args.device, batch_size=args.batch_size, crop=crop_override(args),
                     engine=args.engine, tta=args.tta, prior=args.prior, jitter=args.jitter)
    if args.person_from in PERSON_FROM and not predictor.person_relative:
        err.print(f"note: {predictor.run_dir} carries no person-relative expression classifier (facemt fit fits one "
                  "where it helps), so --person-from reads only age group and gender per person",
                  markup=False, highlight=False)
    if shard is not None:
        err.print(f"shard {shard[0]}/{shard[1]}: {len(files)} of {len(all_files)} files -> {out_path}",
                  markup=False, highlight=False)
    detect = predictor.preprocess.policy.detects
    if detect:
        from facemt.faces import default_detector

        default_detector()  # fail now, not per file, if the detector model is damaged
    sink = _Sink(fmt, out_path, predictor.tasks, video=videos)
    counts, timeline = _predict_to(sink, predictor, files, args, out_path, err)
    if shard is not None:
        from facemt.shards import write_manifest

        write_manifest(out_path, *shard, all_files, files, predictor.options(
            fallback=args.fallback, min_face=args.min_face, max_faces=args.max_faces,
            **({"fps": args.fps, "smooth": args.smooth, "per_track": args.person_from == "track"} if videos else {})))
    if args.plot:
        from facemt.video import plot_timeline, to_frame

        plot_timeline(to_frame(timeline, predictor.tasks), args.plot)
        err.print(f"timeline written to {args.plot}", markup=False, highlight=False)
    if fmt == "table":
        out.print(_prediction_table(sink.kept, predictor.tasks, detect))
    summary = (f"{len(files)} file(s): {counts['ok']} prediction(s), {counts['no_face']} without a face, "
               f"{counts['error']} unreadable")
    if out_path is not None:
        summary += f"; written to {out_path}"
    if out_path is not None or counts["error"] or counts["no_face"] or fmt == "table":
        err.print(summary, markup=False, highlight=False)
    return EXIT_PARTIAL if counts["error"] else EXIT_OK


def _check_video_options(args: argparse.Namespace, videos: bool) -> None:
    """--fps, --smooth and --plot are for videos, and must be positive."""
    given = [flag for flag, value in (("--fps", args.fps), ("--smooth", args.smooth), ("--plot", args.plot))
             if value is not None]
    if given and not videos:
        raise FacemtError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to videos, "
                          "and no video is among the inputs")
    for flag, value in (("--fps", args.fps), ("--smooth", args.smooth)):
        if value is not None and not value > 0:
            raise FacemtError(f"{flag} must be a positive number (got {value})")


def _check_person_options(args: argparse.Namespace, videos: bool, shard, files: Sequence[Path]) -> None:
    """--person-from name|folder reads every picture of a person together: photos only, one face each, one
    process, and every file name must say its person; --person-from track is for videos (checked before any
    work)."""
    if not args.person_from:
        return
    if args.person_from == "track":
        if not videos:
            raise FacemtError("--person-from track reads each face track of a video as one person, and no video "
                              "is among the inputs")
        return
    clash = [flag for flag, on in (("a video input", videos), ("--shard or torchrun", shard is not None),
                                   ("--max-faces", args.max_faces is not None)) if on]
    if clash:
        raise FacemtError(f"--person-from reads the largest face of each photo with the same person's other photos: "
                          f"it does not go with {', '.join(clash)} (for videos: --person-from track)")
    from facemt.data import person_of

    for f in files:
        person_of(f, args.person_from)


def _units(predictor, files: Sequence[Path], fps: float | None) -> int:
    """Progress units: one per photo, one per sampled frame of a video."""
    from facemt.video import expected_samples, is_video_file, open_video

    total = 0
    for f in files:
        if not is_video_file(f):
            total += 1
            continue
        try:
            capture, info = open_video(f)
            capture.release()
            total += max(1, expected_samples(info, fps))
        except FacemtError:
            total += 1
    return total


def _predictions(predictor, files: Sequence[Path], args: argparse.Namespace):
    """Every row of photos and videos in file order: runs of photos in batches,
    each video streamed; an unreadable or truncated video ends with an error row."""
    from facemt.video import VideoPrediction, is_video_file, predict_video

    options = {"fallback": args.fallback, "min_face": args.min_face, "max_faces": args.max_faces}
    if args.person_from in PERSON_FROM:  # every picture of a person read together: see _check_person_options
        from facemt.data import person_of

        yield from predictor.predict_persons(files, [person_of(f, args.person_from) for f in files],
                                             fallback=args.fallback, min_face=args.min_face)
        return
    photos: list[Path] = []
    for f in [*files, None]:
        if f is not None and not is_video_file(f):
            photos.append(f)
            continue
        if photos:
            yield from predictor.predict_files(photos, **options)
            photos = []
        if f is not None:
            try:
                yield from predict_video(predictor, f, fps=args.fps, smooth=args.smooth,
                                         per_track=args.person_from == "track", **options)
            except FacemtError as exc:
                yield VideoPrediction(str(f), error=str(exc))


def _predict_to(sink: "_Sink", predictor, files: Sequence[Path], args: argparse.Namespace, out_path: Path | None,
                err: Console) -> tuple[dict[str, int], list]:
    """Stream the rows into ``sink`` with a progress bar; returns the counts per status
    and the video rows a ``--plot`` needs."""
    counts = {"ok": 0, "no_face": 0, "error": 0}
    timeline: list = []
    total = _units(predictor, files, args.fps)
    started = time.monotonic()
    done, finished, last = 0, False, None
    try:
        with bars(err, TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("eta"), TimeRemainingColumn(), transient=out_path is None,
                  disable=total < 2 * args.batch_size) as progress:
            task = progress.add_task("predict", total=total)
            for p in _predictions(predictor, files, args):
                counts[p.status] += 1
                if p.error:
                    err.print(f"error: {p.error}", markup=False, highlight=False)
                sink.write(p)
                frame = getattr(p, "frame", None)
                if args.plot and frame is not None:
                    timeline.append(p)
                if (p.source, frame) != last and not (p.error and frame is None and last and last[0] == p.source):
                    done, last = done + 1, (p.source, frame)
                    progress.update(task, completed=min(done, total))
                    if out_path is not None and not err.is_terminal and done % 500 == 0:
                        err.print(f"predicted {done}/{total} files and frames{timing(started, done, total)}",
                                  markup=False, highlight=False)
        finished = True
    finally:
        sink.close(finished)
    return counts, timeline


def _prediction_table(kept, tasks: Sequence[str], detect: bool) -> Table:
    table = Table()
    table.add_column("file")
    if detect:
        table.add_column("face box (x, y, w, h)")
    for t in tasks:
        table.add_column(t)
    for p in kept:
        name = Path(p.source).name if p.source else "-"
        if getattr(p, "frame", None) is not None:
            name += f" @ {p.time_s:.2f} s" + (f", track {p.track}" if p.track is not None else "")
        if p.status != "ok":
            if p.status == "no_face":
                table.add_row(name, "no face found", *["-"] * len(tasks))
            continue
        cells = [f"{p.labels[t]} ({p.probabilities[t][p.labels[t]]:.2f})" for t in tasks]
        box = [f"face {p.face}: {', '.join(map(str, p.box))}" if p.box else "whole image"] if detect else []
        table.add_row(name, *box, *cells)
    return table


def _predict_shard(args: argparse.Namespace) -> tuple[int, int] | None:
    """--shard K/N, or this process's rank under torchrun; None for the whole input."""
    from facemt.shards import parse_shard

    if args.shard:
        return parse_shard(args.shard)
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")) + 1, size) if size > 1 else None


def cmd_merge_predictions(args: argparse.Namespace, out: Console, err: Console) -> int:
    from facemt.shards import find_parts, merge_parts

    from facemt.files import check_writable

    check_writable(args.out, args.overwrite)
    parts = args.parts or find_parts(args.out)
    done = merge_parts(parts, args.out)
    if args.json:
        print(json.dumps({"out": args.out, **done}))
    else:
        err.print(f"merged {done['shards']} shard(s): {done['files']} files, {done['rows']} rows -> {args.out}",
                  markup=False, highlight=False)
    return EXIT_OK


def _split_predict_inputs(args: argparse.Namespace) -> None:
    """``facemt predict RUN IMAGE...`` (the older form): a leading run folder is the model."""
    first = Path(args.inputs[0])
    if len(args.inputs) > 1 and (first / "config.json").is_file():
        if args.model is not None:
            raise FacemtError(f"two models given: {first} and --model {args.model}")
        args.model, args.inputs = str(first), args.inputs[1:]




def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this group's commands."""
    p = sub.add_parser("predict", help="predict all heads for images or folders", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="IMAGE|VIDEO|DIR",
                   help="image or video files or folders (a run folder given first is taken as --model)")
    add_model_arg(p)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON (one object per face or image)")
    fmt.add_argument("--csv", action="store_true", help="print CSV (one row per face or image)")
    fmt.add_argument("--out", metavar="FILE.csv|FILE.jsonl",
                     help="stream results to a CSV or JSON-lines file (written atomically; for large folders)")
    p.add_argument("--crop", choices=CROP_POLICIES,
                   help="override the run's crop policy (align, box or none; default: the one it was trained with)")
    p.add_argument("--no-detect", action="store_true", help="same as --crop none: each image is already a face")
    p.add_argument("--fallback", action="store_true", help="when no face is found, predict on the whole image")
    p.add_argument("--min-face", type=int, default=0, metavar="PX", help="ignore faces narrower than PX pixels")
    p.add_argument("--max-faces", type=int, metavar="N", help="at most N faces per image (the largest)")
    p.add_argument("--batch-size", type=int, default=32, help="default %(default)s")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default %(default)s)")
    add_engine_arg(p)
    add_tta_arg(p)
    add_prior_arg(p)
    video = p.add_argument_group("videos")
    video.add_argument("--fps", type=float, metavar="N",
                       help="frames per second to predict (default: every frame, up to 10 per second)")
    video.add_argument("--smooth", type=float, metavar="SECONDS",
                       help="smooth each face track's probabilities over time (exponential, this time constant; "
                            "default off)")
    video.add_argument("--plot", metavar="FILE.png",
                       help="draw each track's probabilities over time (expression as stacked areas)")
    p.add_argument("--person-from", choices=(*PERSON_FROM, "track"),
                   help="each photo's person, from its file 'name' (FACES or JAFFE names) or its 'folder': a "
                        "person's photos get one age group and gender (from all of them), and with a run fit with "
                        "the person-relative classifier, expression is read against the same person's other photos "
                        "(3 or more); the largest face of each photo. Videos: 'track': each face track is one "
                        "person, with one age group and gender from all its frames (a video's rows come when it "
                        "ends)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out or --plot file")
    p.add_argument("--shard", metavar="K/N",
                   help="predict only the K-th of N shards of the sorted file list, into FILE.part-K-of-N.csv "
                        "beside --out (under torchrun: the process's rank; join with merge-predictions)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("merge-predictions", help="join the parts of a sharded predict into one file",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="*", metavar="PART",
                   help="part files (default: every finished FILE.part-K-of-N beside --out)")
    p.add_argument("--out", required=True, metavar="FILE.csv|FILE.jsonl",
                   help="the merged file (written only when every input appears exactly once)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_merge_predictions)
