"""Command line: ``facemt synth | check-data | fit | predict | merge-predictions | evaluate | cv | explain | export``. The only module that parses
arguments or prints."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from facemt import __version__
from facemt.errors import FacemtError
from facemt.config import AUGMENT_PRESETS, CROP_POLICIES, LOSS_WEIGHTINGS, PRIORS, TrainConfig
from facemt.engines import ENGINES
from facemt.tasks import TASK_NAMES, TASKS

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

EPILOG = """examples:
  facemt synth data/faces-demo --persons 12
  facemt fit --data data/faces-demo --out runs/demo --epochs 15 --image-size 96
  facemt fit --data faces.csv --out runs/expr --tasks expression
  facemt fit --data data/faces --out runs/mnv2 --backbone mobilenetv2_100 --pretrained-file weights.safetensors
  facemt predict photo.jpg                           # the built-in base model
  facemt predict --model runs/demo photos/ --out predictions.csv   # streams, one row per face
  facemt predict --model runs/demo crops/ --no-detect --json
  facemt predict photos/ --prior training --out p.csv    # classes as common as in the training data
  facemt export --model runs/demo --format onnx
  facemt explain photo.jpg --out explanations/        # per-head heat maps (one PNG per face)
  facemt explain photo.jpg --target expression=anger  # evidence for a chosen class
  facemt check-data --data data/faces-demo
  facemt fit --resume runs/demo                      # after Ctrl-C
  facemt evaluate --model runs/demo --data data/faces-test
  facemt cv --data data/faces-demo --out reports/demo --split both --seeds 2 --folds 3 --epochs 10 --image-size 64
"""


def _timing(started: float, done: int, total: int) -> str:
    """`` (elapsed 12 s, eta 40 s)`` for log lines written without a terminal."""
    elapsed = time.monotonic() - started
    eta = f", eta {elapsed / done * (total - done):.0f} s" if done else ""
    return f" (elapsed {elapsed:.0f} s{eta})"


class _Progress:
    """Turns the engine's callback events into rich progress bars on stderr."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self.decode_task = None
        self.train_task = None
        self.started = time.monotonic()

    def __enter__(self) -> "_Progress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.__exit__(*exc)

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        p = self.progress
        if event == "warnings":
            for w in info["warnings"]:
                p.console.print(f"warning: {w}", style="yellow", markup=False, highlight=False)
        elif event == "framing":
            for source, c in info["counts"].items():
                p.console.print(f"faces ({info['crop']}) in {source}: {c['aligned'] + c['boxed']} found, "
                                f"{c['whole']} used whole (no face found)", markup=False, highlight=False)
        elif event == "split":
            n = info["train_images"] + info["val_images"]
            persons = lambda k: f" of {info[k]} person(s)" if info[k] else ""  # noqa: E731
            p.console.print(f"validation: {info['val_images']} images{persons('val_persons')} "
                            f"({info['val_images'] / n:.0%} held out; --val-fraction {info['fraction']}), training: "
                            f"{info['train_images']} images{persons('train_persons')}", markup=False, highlight=False)
        elif event == "decode":
            if self.decode_task is None:
                self.decode_task = p.add_task("decode images", total=info["total"])
            p.update(self.decode_task, completed=info["done"])
        elif event == "epoch_start" and self.train_task is None:
            self.train_task = p.add_task("train", total=info["epochs"] * info["steps"])
        elif event == "step":
            p.update(self.train_task, advance=1, description=f"epoch {info['epoch']} loss {info['loss']:.3f}")
        elif event == "epoch_end":
            row = info["row"]
            parts = [f"epoch {info['epoch']:>3}/{info['epochs']}"]
            if not self.console.is_terminal:
                done = info["epoch"] - info.get("first_epoch", 1) + 1
                parts.append(_timing(self.started, done, info["epochs"] - info.get("first_epoch", 1) + 1).strip())
            for split in ("train", "val"):
                accs = [f"{t}={row[f'{split}_{t}_acc']:.2f}" for t in TASK_NAMES if f"{split}_{t}_acc" in row]
                if accs:
                    parts.append(f"{split} acc " + " ".join(accs))
            p.console.print("  ".join(parts))


_TRAIN_GROUPS = {"data": "data and faces", "model": "model and initial weights", "optim": "optimisation",
                 "augment": "augmentation"}

#: The training flags: (help group, TrainConfig field, argparse keywords). The flag is the field's name with
#: dashes and its default the field's default, so a new training option is one field plus one line here.
#: (The initial-weights choice below is one mutually exclusive group and written out.)
_TRAIN_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("data", "tasks", {"default": None, "help": f"comma-separated heads to train (default: every labelled one of "
                                                f"{','.join(TASK_NAMES)})"}),
    ("data", "balance_sources", {"action": "store_true", "help": "sample every --data source equally often per epoch"}),
    ("data", "crop", {"choices": CROP_POLICIES,
                      "help": "how each image becomes a face: align (detect, eyes level at fixed points), box (detect, "
                              "square box with --crop-margin) or none (images are already faces); stored in the run "
                              "and used again by predict and evaluate (default %(default)s)"}),
    ("data", "crop_margin", {"type": float, "help": "--crop box: margin as a fraction of the face box, each side "
                                                    "(default %(default)s)"}),
    ("data", "val_fraction", {"type": float, "help": "held-out share, split by person when persons are known "
                                                     "(default %(default)s)"}),
    ("model", "backbone", {"help": "timm model name (default %(default)s, the base model's; another starts from "
                                   "--pretrained-file/--pretrained or random weights)"}),
    ("model", "image_size", {"type": int, "help": "network input side in pixels (default: the initial model's, 112 "
                                                  "for the base model; else 128)"}),
    ("model", "dropout", {"type": float, "help": "before the heads (default %(default)s)"}),
    ("optim", "epochs", {"type": int, "help": "default %(default)s"}),
    ("optim", "batch_size", {"type": int, "help": "global batch: split across processes under torchrun "
                                                  "(default %(default)s)"}),
    ("optim", "lr", {"type": float, "help": "peak learning rate (default %(default)s)"}),
    ("optim", "backbone_lr_scale", {"type": float, "help": "backbone learning rate = --lr x this; heads get --lr "
                                                           "(default: 0.1 when starting from the base model or "
                                                           "--init-from RUN, else 1)"}),
    ("optim", "layer_decay", {"type": float, "help": "each backbone block before the last trains at this times "
                              "the rate of the block after it (default %(default)s: one rate)"}),
    ("optim", "weight_decay", {"type": float, "help": "AdamW weight decay (default %(default)s)"}),
    ("optim", "warmup_epochs", {"type": float, "help": "default %(default)s"}),
    ("optim", "head_warmup_epochs", {"type": float, "help": "train only the heads for this many epochs (the "
                                     "backbone's weights frozen), then everything (default %(default)s)"}),
    ("optim", "seed", {"type": int, "help": "default %(default)s"}),
    ("optim", "loss_weights", {"default": None, "metavar": "TASK=W,...",
                               "help": "e.g. expression=2,gender=1 (default 1 each)"}),
    ("optim", "loss_weighting", {"choices": LOSS_WEIGHTINGS, "help": "fixed weights, or learned uncertainty "
                                 "weighting (Kendall et al. 2018) (default %(default)s)"}),
    ("optim", "balance_classes", {"action": "store_true", "help": "logit-adjusted loss: predictions follow a "
                                  "class-balanced prior, not the training set's class frequencies "
                                  "('predict --prior' can switch either way later)"}),
    ("optim", "label_smoothing", {"type": float, "help": "default %(default)s"}),
    ("optim", "device", {"help": "auto, cpu or cuda (default %(default)s)"}),
    ("augment", "augment", {"choices": AUGMENT_PRESETS, "help": "default %(default)s"}),
]


def _add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    groups = {key: p.add_argument_group(title) for key, title in _TRAIN_GROUPS.items()}
    groups["data"].add_argument("--data", action="append", metavar="DIR|CSV",
                                help="folder of FACES-named images or a CSV manifest (repeatable; required)")
    for group, name, kwargs in _TRAIN_FLAGS:
        if kwargs.get("action") != "store_true":
            kwargs = {"default": getattr(d, name), **kwargs}
        groups[group].add_argument("--" + name.replace("_", "-"), dest=name, **kwargs)
    w = groups["model"].add_mutually_exclusive_group()
    w.add_argument("--init-from", metavar="RUN|base", default=d.init_from,
                   help="start from a facemt model: backbone and every head whose classes match (default: the "
                        "built-in face-trained base model, when --backbone is its backbone)")
    w.add_argument("--pretrained", action="store_true", help="ImageNet weights from the timm model hub (needs network)")
    w.add_argument("--pretrained-file", metavar="PATH", help="backbone weights from a local .safetensors/.pth file")
    w.add_argument("--no-pretrained", action="store_true", help="random initialisation")


def _as_options(message: str) -> str:
    """Spell TrainConfig field names in a message as the CLI options that set them."""
    import dataclasses
    import re

    for name in sorted((f.name for f in dataclasses.fields(TrainConfig)), key=len, reverse=True):
        message = re.sub(rf"(?<![\w-]){name}(?!\w)", "--" + name.replace("_", "-"), message)
    return message


def _train_config(args: argparse.Namespace) -> TrainConfig:
    from facemt.losses import parse_loss_weights
    from facemt.tasks import select_tasks

    values = {name: getattr(args, name) for _, name, _ in _TRAIN_FLAGS}
    values["tasks"] = select_tasks(args.tasks) if args.tasks else None
    values["loss_weights"] = parse_loss_weights(args.loss_weights, values["tasks"] or TASK_NAMES)
    config = TrainConfig(
        **values, pretrained=args.pretrained, pretrained_file=args.pretrained_file,
        init_from=None if (args.no_pretrained or args.pretrained or args.pretrained_file) else args.init_from,
    )
    try:
        config.validate()
    except FacemtError as exc:  # the library names fields; here they are options
        raise FacemtError(_as_options(str(exc))) from None
    from facemt.inference import resolve_device
    from facemt.model import check_backbone

    check_backbone(config.backbone)
    resolve_device(config.device)  # a missing GPU is said now, not after decoding
    return config


def _load_data(sources: Sequence[str], err: Console):
    from facemt.data import load_sources

    index = load_sources(sources)
    if index.skipped:
        err.print(f"skipped {len(index.skipped)} file(s), e.g. {index.skipped[0]} (facemt check-data --json lists all)",
                  style="yellow", markup=False, highlight=False)
    return index


def _print_summary(index, err: Console) -> None:
    s = index.summary()
    err.print(f"{s['images']} images, {s['persons']} persons")
    for task, counts in s["labels"].items():
        if counts["missing"] < s["images"]:
            err.print(f"  {task}: " + ", ".join(f"{c} {n}" for c, n in counts.items() if n))


def cmd_synth(args: argparse.Namespace, out: Console, err: Console) -> int:
    from facemt.synth import check_args, generate

    check_args(args.out, args.persons, (args.width, args.height))
    with Progress(TextColumn("synth"), BarColumn(), MofNCompleteColumn(), console=err) as progress:
        task = progress.add_task("synth", total=args.persons * 12)
        paths = generate(args.out, persons=args.persons, size=(args.width, args.height), seed=args.seed,
                         progress=lambda d, n: progress.update(task, completed=d, total=n))
    out.print(f"wrote {len(paths)} synthetic FACES-named images to {args.out}")
    return EXIT_OK


class _StopFlag:
    """SIGINT / SIGTERM ask training to stop after the current step; a second
    signal stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __call__(self) -> bool:
        return self.requested


def cmd_fit(args: argparse.Namespace, out: Console, err: Console) -> int:
    from facemt.checkpoint import CONFIG, load_resume
    from facemt.distributed import init_from_env, shutdown

    if args.resume:
        run = Path(args.resume)
        ignored = _options_given(args, keep=("resume", "json", "verbose"))
        if ignored:
            raise FacemtError(f"--resume continues {run} with the data and settings it started with; drop "
                              f"{', '.join(ignored)} (or train a new run with --out)")
        resume = load_resume(run)
        config = TrainConfig.from_dict(resume.config)
        sources = resume.extra.get("sources") or []
        if not sources:
            raise FacemtError(f"{run}: the interrupted run does not record its data sources")
    else:
        if not args.data or not args.out:
            raise FacemtError("fit needs --data and --out (or --resume RUN)")
        run = Path(args.out)
        if (run / CONFIG).exists() and not args.overwrite:
            raise FacemtError(f"{run} already holds a trained model; choose another --out or pass --overwrite")
        from facemt.data import resolve_source

        # Stored resolved, so that 'fit --resume' finds the data from any working directory.
        config, sources, resume = _train_config(args), [resolve_source(s) for s in args.data], None
    here = init_from_env(config.device)  # several processes under torchrun; nothing otherwise
    if not here.main:  # one process speaks for all
        out = err = Console(quiet=True)
    if resume is not None:
        err.print(f"resuming {run} at epoch {resume.epoch}, step {resume.step}")
    try:
        return _fit_and_report(args, out, err, run, config, sources, resume)
    finally:
        shutdown()


def _options_given(args: argparse.Namespace, keep: Sequence[str]) -> list[str]:
    """The options of ``args.command`` set to something other than their defaults, as flags, except ``keep``."""
    defaults = vars(build_parser().parse_args([args.command]))
    return ["--" + k.replace("_", "-") for k, v in vars(args).items()
            if k in defaults and k not in (*keep, "command", "func") and v != defaults[k]]


def _fit_and_report(args, out: Console, err: Console, run: Path, config: TrainConfig, sources, resume) -> int:
    from facemt.engine import TrainingInterrupted, fit

    index = _load_data(sources, err)
    _print_summary(index, err)
    try:
        with _StopFlag() as stop, _Progress(err) as progress:
            result = fit(index, config, run, callback=progress, sources=sources, should_stop=stop, resume=resume)
    except TrainingInterrupted as exc:
        err.print(f"{exc}; state saved. Resume with: facemt fit --resume {run}", markup=False, highlight=False)
        return EXIT_INTERRUPTED
    if out.quiet:
        return EXIT_OK
    if args.json:
        print(json.dumps({"run": str(run), "tasks": list(result.tasks), "best_epoch": result.best_epoch,
                          "metrics": result.metrics, "temperatures": dict(result.model.temperatures),
                          "untouched_val_acc": result.untouched}, indent=2))
        return EXIT_OK
    table = Table(title=f"best epoch {result.best_epoch} (saved to {run})")
    table.add_column("head")
    table.add_column("train acc", justify="right")
    table.add_column("val acc", justify="right")
    if result.untouched:  # the model training started from, on the same validation images
        table.add_column("val acc before training", justify="right")
    for t in result.tasks:
        v, before = result.metrics.get(f"val_{t}_acc"), result.untouched.get(t)
        cells = [f"{result.metrics[f'train_{t}_acc']:.3f}", "-" if v is None else f"{v:.3f}"]
        cells += ["-" if before is None else f"{before:.3f}"] if result.untouched else []
        table.add_row(t, *cells)
    out.print(table)
    if result.untouched:
        out.print("val acc before training: the starting model as it is (facemt predict without this run); "
                  "compare subject-disjoint with 'facemt cv'.", markup=False, highlight=False)
    return EXIT_OK


#: Columns a CSV gets after ``path`` when videos are among the inputs (empty on photos' rows).
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
    if shard is not None:
        from facemt.shards import part_path, take_shard

        files = take_shard(all_files, *shard)
        out_path = part_path(out_path, *shard)
    from facemt.files import check_writable

    if out_path is not None:
        check_writable(out_path, args.overwrite)
    if args.plot:
        check_writable(args.plot, args.overwrite, flag="--plot")
    predictor = load(args.model, device=args.device, batch_size=args.batch_size, crop=_crop_override(args),
                     engine=args.engine, tta=args.tta, prior=args.prior, jitter=args.jitter)
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
            **({"fps": args.fps, "smooth": args.smooth} if videos else {})))
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
        raise FacemtError(f"{', '.join(given)} apply to videos, and no video is among the inputs")
    for flag, value in (("--fps", args.fps), ("--smooth", args.smooth)):
        if value is not None and not value > 0:
            raise FacemtError(f"{flag} must be a positive number (got {value})")


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
                yield from predict_video(predictor, f, fps=args.fps, smooth=args.smooth, **options)
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
        with Progress(TextColumn("predict"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("eta"), TimeRemainingColumn(), console=err, transient=out_path is None,
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
                        err.print(f"predicted {done}/{total} files and frames{_timing(started, done, total)}",
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


def _crop_override(args: argparse.Namespace) -> str | None:
    if getattr(args, "no_detect", False):
        if args.crop not in (None, "none"):
            raise FacemtError("--no-detect contradicts --crop " + args.crop)
        return "none"
    if getattr(args, "max_faces", None) is not None and args.max_faces < 1:
        raise FacemtError("--max-faces must be at least 1")
    return args.crop


def _metrics_table(title: str, metrics: dict[str, dict]) -> Table:
    table = Table(title=title)
    for col in ("head", "n", "accuracy", "balanced acc", "macro-F1", "ECE"):
        table.add_column(col, justify="left" if col == "head" else "right")
    for head, m in metrics.items():
        if m["n"]:
            table.add_row(head, str(m["n"]), f"{m['accuracy']:.3f}", f"{m['balanced_accuracy']:.3f}",
                          f"{m['macro_f1']:.3f}", f"{m['ece']:.3f}")
        else:
            table.add_row(head, "0", "-", "-", "-", "-")
    return table


def cmd_check_data(args: argparse.Namespace, out: Console, err: Console) -> int:
    from facemt.checks import check_data
    from facemt.splits import validation_split

    sources = [*args.sources, *(args.data or [])]
    if not sources:
        raise FacemtError("check-data needs --data DIR|CSV")
    index = _load_data(sources, err)
    _, val_rows = validation_split(index.table, args.val_fraction, args.seed)
    tasks = None
    if args.tasks:
        from facemt.tasks import select_tasks

        tasks = select_tasks(args.tasks)
    with Progress(TextColumn("decode"), BarColumn(), MofNCompleteColumn(), console=err, transient=True) as progress:
        task = progress.add_task("decode", total=len(index))
        report = check_data(index, tasks, val_rows, progress=lambda d, n: progress.update(task, completed=d))
    if args.json:
        print(json.dumps({"images": len(index), "skipped": index.skipped, **report.to_dict()}, indent=2))
    else:
        table = Table(title=f"{len(index)} images, {index.summary()['persons']} persons, {len(index.skipped)} skipped")
        table.add_column("head")
        table.add_column("images per class")
        table.add_column("missing", justify="right")
        for head, counts in report.per_class.items():
            table.add_row(head, ", ".join(f"{c} {n}" for c, n in counts.items() if c != "missing"), str(counts["missing"]))
        out.print(table)
        if len(report.per_person):
            pt = Table(title="per person")
            for col in report.per_person.columns:
                pt.add_column(col)
            for row in report.per_person.itertuples(index=False):
                pt.add_row(*map(str, row))
            out.print(pt)
        for s_ in index.skipped[:20]:
            out.print(f"skipped: {s_}", markup=False, highlight=False)
        for w in report.warnings:
            out.print(f"warning: {w}", style="yellow", markup=False, highlight=False)
        for p_ in report.problems:
            out.print(f"problem: {p_}", style="red", markup=False, highlight=False)
        out.print("data OK for training" if report.ok else "data NOT usable for training as is")
    return EXIT_OK if report.ok else EXIT_PARTIAL


def cmd_evaluate(args: argparse.Namespace, out: Console, err: Console) -> int:
    from facemt.data import ImageCache
    from facemt.engine import decode_images
    from facemt.evaluation import evaluate_predictions, evaluation_notes
    from facemt.inference import load

    predictor = load(_model(args), device=args.device, batch_size=args.batch_size, crop=_crop_override(args),
                     engine=args.engine, tta=args.tta, prior=args.prior, jitter=args.jitter)
    if args.explain:
        from facemt.explain import check_method

        check_method(args.method)
        predictor.torch_model()  # an ONNX engine asked for by name is said now
    index = _load_data(args.data, err)
    cache = ImageCache()
    with _Progress(err) as progress:
        images = decode_images(index, predictor.preprocess, cache, progress)
    metrics = evaluate_predictions(index.table, predictor.probabilities(images))
    if args.explain:
        _class_maps(predictor, index, images, Path(args.explain), args.method, args.overwrite, err)
    notes = evaluation_notes(predictor.config, predictor.tasks, index.table)
    for note in notes:
        err.print(f"note: {note}", style="yellow", markup=False, highlight=False)
    if args.json:
        print(json.dumps({"model": str(predictor.run_dir), "images": len(index), "crop": predictor.preprocess.crop,
                          "tta": predictor.tta, "prior": predictor.prior, "notes": notes,
                          "framing": cache.framing_counts(index.table), "metrics": metrics}, indent=2))
        return EXIT_OK
    out.print(_metrics_table(f"{predictor.run_dir} on {len(index)} images ({predictor.prior} prior)", metrics))
    for head, m in metrics.items():
        if not m["n"]:
            continue
        t = Table(title=f"{head}: per class")
        for col in ("class", "precision", "recall", "support"):
            t.add_column(col, justify="left" if col == "class" else "right")
        for c, pc in m["per_class"].items():
            t.add_row(c, f"{pc['precision']:.3f}", f"{pc['recall']:.3f}", str(pc["support"]))
        out.print(t)
        cm = Table(title=f"{head}: confusion (rows true, columns predicted)")
        cm.add_column("")
        for c in m["classes"]:
            cm.add_column(c[:5], justify="right")
        for c, row in zip(m["classes"], m["confusion"]):
            cm.add_row(c, *map(str, row))
        out.print(cm)
    return EXIT_OK


def _class_maps(predictor, index, images, folder: Path, method: str, overwrite: bool, err: Console) -> None:
    """evaluate --explain: class-average maps of the labelled faces, as a figure and arrays."""
    from facemt.data import encode_targets
    from facemt.explain import class_average_maps, dataset_maps, plot_class_maps, save_class_maps
    from facemt.files import atomic_write

    targets = [folder / "class_maps.png", folder / "class_maps.npz"]
    if any(t.exists() for t in targets) and not overwrite:
        raise FacemtError(f"--explain {folder}: already holds class maps; choose another folder or pass --overwrite")
    labels = encode_targets(index.table, predictor.tasks)
    maps, mean = dataset_maps(predictor.torch_model(), images, predictor.preprocess, labels, method)
    averages = class_average_maps(maps, labels)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(targets[0], lambda tmp: plot_class_maps(averages, tmp, mean, f"{predictor.run_dir.name} on "
                                                         f"{len(images)} faces ({method}; true class)"))
    atomic_write(targets[1], lambda tmp: save_class_maps(averages, tmp))
    err.print(f"class-average maps ({method}) written to {targets[0]} and {targets[1]}", markup=False, highlight=False)


class _CVProgress(_Progress):
    """One bar over every epoch of every model in the cross-validation."""

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        p = self.progress
        if event == "decode":
            super().__call__(event, info)
        elif event == "run_start":
            if self.train_task is None:
                self.train_task = p.add_task("cv", total=info["runs"] * info["epochs"])
            p.update(self.train_task, description=f"model {info['run']}/{info['runs']} {info['label']}")
            if not self.console.is_terminal:  # a log file or CI: no bar is drawn, so say where the run is
                self.console.print(f"cv model {info['run']}/{info['runs']} {info['label']}{_timing(self.started, info['run'] - 1, info['runs'])}",
                                   markup=False, highlight=False)
        elif event == "epoch_end":
            p.update(self.train_task, advance=1)


def cmd_cv(args: argparse.Namespace, out: Console, err: Console) -> int:
    from facemt.evaluation import cross_validate
    from facemt.report import interval_text, write_report

    if not args.data:
        raise FacemtError("cv needs --data")
    config = _train_config(args)
    if args.explain:
        from facemt.explain import check_method

        check_method(args.method)
    report_dir = Path(args.out)
    if (report_dir / "report.md").exists() and not args.overwrite:
        raise FacemtError(f"{report_dir} already holds a report; choose another --out or pass --overwrite")
    index = _load_data(args.data, err)
    from facemt.splits import make_folds

    for protocol in ("subject", "random") if args.split == "both" else (args.split,):
        make_folds(index.table, protocol, args.folds, config.seed, args.test_size)  # said before anything is printed
    _print_summary(index, err)
    with _CVProgress(err) as progress:
        result = cross_validate(index, config, folds=args.folds, split=args.split, seeds=args.seeds,
                                baselines=args.baselines, test_size=args.test_size, callback=progress,
                                explain=args.method if args.explain else None)
    for warning in result.warnings:
        err.print(f"warning: {warning}", style="yellow", markup=False)
    write_report(result, report_dir)
    summary = result.summary()
    if args.json:
        print(json.dumps({"report": str(report_dir / "report.md"), "summary": json.loads(summary.to_json(orient="records"))},
                         indent=2))
        return EXIT_OK
    single, zero = "single_mean" in summary, "zero_shot_mean" in summary
    table = Table(title="test accuracy % (mean ± std over folds x seeds)")
    columns = ["split", "head", "multi-task"] + (["single-task", "multi − single [95% CI]"] if single else [])
    columns += ["not fine-tuned", "gain [95% CI]"] if zero else []
    for col in columns + ["majority"]:
        table.add_column(col, justify="left" if col in ("split", "head") else "right")
    pct = lambda m, s=None: "-" if m is None or m != m else f"{100 * m:.1f}" + ("" if s is None or s != s else f" ± {100 * s:.1f}")  # noqa: E731
    for _, r in summary.iterrows():
        cells = [pct(r["multitask_mean"], r["multitask_std"])]
        cells += [pct(r.get("single_mean"), r.get("single_std")), interval_text(r, "diff")] if single else []
        cells += [pct(r.get("zero_shot_mean"), r.get("zero_shot_std")), interval_text(r, "gain")] if zero else []
        table.add_row(r["protocol"], r["head"], *cells, pct(r["majority_mean"]))
    out.print(table)
    out.print(f"report written to {report_dir / 'report.md'}")
    return EXIT_OK


def cmd_explain(args: argparse.Namespace, out: Console, err: Console) -> int:
    from facemt.explain import check_method, plot_explanation
    from facemt.images import iter_image_files
    from facemt.inference import load

    check_method(args.method)
    targets = _targets(args.target)
    files = iter_image_files(args.inputs)
    if not files:
        raise FacemtError("no image files found in the given inputs")
    folder = Path(args.out)
    if folder.exists() and not folder.is_dir():
        raise FacemtError(f"--out {folder}: is a file; give a folder for the PNGs")
    predictor = load(_model(args), device=args.device, crop=_crop_override(args), engine=args.engine, prior=args.prior)
    predictor.torch_model()  # an ONNX engine asked for by name is said now, before any work
    written, results, failed = [], [], 0
    with Progress(TextColumn("explain"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err,
                  transient=True, disable=len(files) < 4) as progress:
        task = progress.add_task("explain", total=len(files))
        for path in files:
            try:
                explanations = predictor.explain(path, targets, args.method, all_faces=True)
            except FacemtError as exc:
                err.print(f"error: {exc}", markup=False, highlight=False)
                failed += 1
                continue
            for e in explanations:
                name = f"{path.stem}.face{e.face}.png" if e.face is not None else f"{path.stem}.png"
                target = folder / name
                if target.exists() and not args.overwrite:
                    raise FacemtError(f"{target}: already exists; choose another --out or pass --overwrite")
                from facemt.files import atomic_write

                folder.mkdir(parents=True, exist_ok=True)
                atomic_write(target, lambda tmp, e=e: plot_explanation(e, tmp, title=f"{path.name} ({args.method})"))
                written.append(target)
                results.append({**e.to_dict(), "png": str(target)})
            progress.update(task, advance=1)
    if args.json:
        print(json.dumps(results))
    else:
        table = Table()
        for col in ("file", "face", *predictor.tasks, "explanation"):
            table.add_column(col)
        for r in results:
            cells = [f"{r[t]['label']} ({r[t]['probability']:.2f})"
                     + ("" if r[t]["target"] == r[t]["label"] else f", map: {r[t]['target']}") for t in predictor.tasks]
            table.add_row(Path(r["path"]).name, "-" if r["face"] is None else str(r["face"]), *cells, r["png"])
        out.print(table)
    err.print(f"{len(written)} explanation(s) ({args.method}) written to {folder}", markup=False, highlight=False)
    return EXIT_PARTIAL if failed else EXIT_OK


def _targets(texts: Sequence[str] | None) -> dict[str, str]:
    from facemt.explain import parse_targets
    from facemt.tasks import TASKS as SCHEMA

    return {t: SCHEMA[t].classes[k] for t, k in parse_targets(texts, TASK_NAMES).items()}


def cmd_export(args: argparse.Namespace, out: Console, err: Console) -> int:
    from facemt.export import export

    from facemt.checkpoint import base_dir, resolve_run

    run = resolve_run(_model(args))
    if run == base_dir() and not args.out:
        raise FacemtError("exporting the built-in base model needs --out FILE (its folder is inside the package)")
    from facemt.images import iter_image_files

    calibration = iter_image_files([args.calibration]) if args.calibration else None
    if args.calibration and not calibration:
        raise FacemtError(f"--calibration {args.calibration}: no image files found")
    info = export(run, args.format, args.out, probabilities=not args.logits, check=not args.no_check,
                  quantize=args.quantize, calibration=calibration)
    msg = f"wrote {info['path']} (outputs {', '.join(info['outputs'])}: {info['output_kind']})"
    if "top1_agreement_random_inputs" in info:
        msg += f"; top-1 agreement with PyTorch on random inputs {info['top1_agreement_random_inputs']:.0%}"
    elif "max_abs_diff" in info:
        msg += f"; max |difference| vs PyTorch {info['max_abs_diff']:.2e}"
    out.print(msg, markup=False, highlight=False)
    return EXIT_OK


def _add_engine_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="auto: ONNX Runtime when the model folder holds a model.onnx exported from its weights (the "
                        "built-in model ships one; PyTorch is then never imported), else PyTorch; torch; or ONNX "
                        "Runtime on the CPU in float32 (onnx) or int8 (onnx-int8), using the run's model.onnx / "
                        "model.int8.onnx from 'facemt export' when present, else building it at start-up "
                        "(default %(default)s)")


def _add_tta_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average each face's probabilities with its mirror image's "
                        "(twice the network time; see benchmarks/RESULTS.md for what it gains)")
    p.add_argument("--jitter", action="store_true",
                   help="also average the face framed 6 slightly different ways (shifts of 1 %% of the input, "
                        "scale +-4 %%: the detector's own alignment noise), for steadier answers; 7x the network time")


def _add_prior_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prior", choices=PRIORS,
                   help="class frequencies the probabilities assume: 'balanced' (every class equally likely; what the "
                        "built-in model and runs fit with --balance-classes predict) or 'training' (as common as in "
                        "the run's training data, e.g. the built-in model's mostly neutral FER+ faces) "
                        "(default: the run's own)")


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="RUN|base",
                   help="a run folder written by 'facemt fit', or 'base' (the default): the built-in base model")


def _model(args: argparse.Namespace) -> str | None:
    """The model a command reads: --model, or the legacy positional run folder."""
    run = getattr(args, "run", None)
    if run is not None and args.model is not None and run != args.model:
        raise FacemtError(f"two models given: {run} and --model {args.model}")
    return args.model or run


def _split_predict_inputs(args: argparse.Namespace) -> None:
    """``facemt predict RUN IMAGE...`` (the older form): a leading run folder is the model."""
    first = Path(args.inputs[0])
    if len(args.inputs) > 1 and (first / "config.json").is_file():
        if args.model is not None:
            raise FacemtError(f"two models given: {first} and --model {args.model}")
        args.model, args.inputs = str(first), args.inputs[1:]


def _add_method_arg(p: argparse.ArgumentParser) -> None:
    from facemt.explain import DEFAULT_METHOD

    p.add_argument("--method", default=DEFAULT_METHOD, metavar="METHOD",
                   help="explanation method: gradcam-8, gradcam-16, gradcam-32 (Grad-CAM on the trunk stage of "
                        "that stride) or integrated-gradients (default %(default)s, chosen by benchmarks/explain.py)")


def _add_explain_args(p: argparse.ArgumentParser, metavar: str | None, help_text: str) -> None:
    if metavar:
        p.add_argument("--explain", metavar=metavar, help=help_text)
    else:
        p.add_argument("--explain", action="store_true", help=help_text)
    _add_method_arg(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="facemt", description="Age group, gender and facial expression from one multi-task network.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"facemt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="write a synthetic FACES-named data set", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="output folder")
    p.add_argument("--persons", type=int, default=12, help="default %(default)s (6 x 2 pictures each)")
    p.add_argument("--width", type=int, default=240, help="default %(default)s")
    p.add_argument("--height", type=int, default=300, help="default %(default)s")
    p.add_argument("--seed", type=int, default=0, help="default %(default)s")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("fit", help="train a model on labelled images", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_args(p)
    p.add_argument("--out", help="run folder to write (model.safetensors, config.json, history.csv)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--resume", metavar="RUN", help="continue a run interrupted with Ctrl-C / SIGTERM "
                   "(its data and settings are read from RUN)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (best epoch, metrics, temperatures)")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("predict", help="predict all heads for images or folders", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="IMAGE|VIDEO|DIR",
                   help="image or video files or folders (a run folder given first is taken as --model)")
    _add_model_arg(p)
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
    _add_engine_arg(p)
    _add_tta_arg(p)
    _add_prior_arg(p)
    video = p.add_argument_group("videos")
    video.add_argument("--fps", type=float, metavar="N",
                       help="frames per second to predict (default: every frame, up to 10 per second)")
    video.add_argument("--smooth", type=float, metavar="SECONDS",
                       help="smooth each face track's probabilities over time (exponential, this time constant; "
                            "default off)")
    video.add_argument("--plot", metavar="FILE.png",
                       help="draw each track's probabilities over time (expression as stacked areas)")
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

    p = sub.add_parser("check-data", help="validate a data set before training", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="*", metavar="DIR|CSV", help=argparse.SUPPRESS)
    p.add_argument("--data", action="append", metavar="DIR|CSV",
                   help="labelled images (repeatable; the older positional form also works)")
    p.add_argument("--tasks", help="heads you intend to train (default: every labelled one)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="validation share used by fit (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed used by fit (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("evaluate", help="metrics of a trained model on labelled images", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help=argparse.SUPPRESS)
    _add_model_arg(p)
    p.add_argument("--data", action="append", required=True, metavar="DIR|CSV", help="labelled images (repeatable)")
    p.add_argument("--crop", choices=CROP_POLICIES,
                   help="override the run's crop policy (default: the one it was trained with)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--batch-size", type=int, default=32, help="default %(default)s")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default %(default)s)")
    _add_engine_arg(p)
    _add_tta_arg(p)
    _add_prior_arg(p)
    _add_explain_args(p, "DIR", "also write class-average maps (rows heads, columns classes: where each head finds "
                      "the evidence for the true class) to DIR/class_maps.png and DIR/class_maps.npz")
    p.add_argument("--overwrite", action="store_true", help="replace class maps already in --explain DIR")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("explain", help="per-head heat maps: where in the face each head finds its evidence",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="IMAGE|DIR", help="image files or folders")
    _add_model_arg(p)
    p.add_argument("--out", default="explanations", help="folder for one PNG per face (default %(default)s)")
    p.add_argument("--target", action="append", metavar="TASK=CLASS",
                   help="explain this class instead of the predicted one, e.g. expression=anger (repeatable)")
    _add_method_arg(p)
    p.add_argument("--crop", choices=CROP_POLICIES, help="override the run's crop policy")
    p.add_argument("--no-detect", action="store_true", help="same as --crop none")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default %(default)s)")
    _add_engine_arg(p)
    _add_prior_arg(p)
    p.add_argument("--overwrite", action="store_true", help="replace PNGs already in --out")
    p.add_argument("--json", action="store_true",
                   help="print JSON: per face and head the label, the explained class, its map "
                        "(28x28 in the aligned frame) and the matrix taking map pixels to photo pixels")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("export", help="export a run to ONNX or TorchScript", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help=argparse.SUPPRESS)
    _add_model_arg(p)
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="default %(default)s")
    p.add_argument("--out", help="output file (default RUN/model.onnx or RUN/model.torchscript.pt)")
    p.add_argument("--logits", action="store_true", help="output raw logits instead of probabilities")
    p.add_argument("--no-check", action="store_true", help="skip the parity check against PyTorch")
    p.add_argument("--quantize", choices=("int8",),
                   help="static int8 ONNX graph (default file RUN/model.int8.onnx, read by predict --engine onnx-int8)")
    p.add_argument("--calibration", metavar="DIR",
                   help="--quantize: face images to calibrate on, framed by the run's crop policy "
                        "(default: 64 generated faces; real faces like yours are better)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("cv", help="cross-validate multi-task vs single-task models and write a report",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_args(p)
    p.add_argument("--out", required=True, help="report folder (report.md, results.json/csv, plots)")
    p.add_argument("--folds", type=int, default=5, help="default %(default)s (leave-one-person-out with fewer persons)")
    p.add_argument("--split", choices=("subject", "random", "both"), default="subject",
                   help="subject-disjoint folds (default), stratified random folds, or both")
    p.add_argument("--seeds", type=int, default=1, help="repeats with successive seeds (default %(default)s)")
    p.add_argument("--test-size", type=float, help="one held-out split of this fraction per seed instead of K folds "
                   "(--split random --test-size 0.3 is the original 70/30 protocol)")
    p.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                   help="also train one single-task model per head on the same folds (default on)")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    p.add_argument("--json", action="store_true", help="print the summary table as JSON")
    _add_explain_args(p, None, "also map where each multi-task model finds the evidence for its test faces' true "
                      "class, per head; the report adds the class averages (class_maps.png, class_maps.npz)")
    p.set_defaults(func=cmd_cv)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return the exit code (0 ok, 1 some inputs failed, 2 user error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out, err = Console(), Console(stderr=True, soft_wrap=True)
    try:
        return args.func(args, out, err)
    except FacemtError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
