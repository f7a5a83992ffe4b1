"""``facemt synth`` and ``facemt fit``."""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
from rich.table import Table

from facemt.errors import FacemtError
from facemt.files import check_folder
from facemt.config import AUGMENT_PRESETS, CROP_POLICIES, LOSS_WEIGHTINGS, PERSON_RELATIVE, TrainConfig
from facemt.tasks import TASK_NAMES

from facemt.cli.common import (
    EXIT_OK, EXIT_INTERRUPTED, EPILOG, bars, EventProgress, load_data, print_summary,
)


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
    ("optim", "distill", {"type": float, "metavar": "W",
                          "help": "when fine-tuning: hold the heads to the start model's answers on every training "
                                  "face with this weight (a distillation loss: what the start model knows is not "
                                  "forgotten where your labels do not say otherwise; 0: off, default %(default)s; "
                                  "costs a forward pass of the start model per batch)"}),
    ("optim", "freeze_norm", {"action": "store_true",
                              "help": "keep the backbone's batch-normalisation statistics as the initial weights "
                                      "have them (training batches do not re-estimate them; their scales and "
                                      "shifts still train)"}),
    ("optim", "refit", {"action": "store_true",
                        "help": "after validating, train again on every face (the validation persons too) for the "
                                "epochs validation chose and save that model, with the heads and temperatures "
                                "validation chose (costs a second training)"}),
    ("optim", "person_relative", {"choices": PERSON_RELATIVE,
                                  "help": "also fit expression classifiers that read a face against the same "
                                          "person's other pictures, used when pictures come grouped by person "
                                          "(evaluate, cv, predict --person-from): auto: the best of three when it "
                                          "beats the network's expression head on the validation persons, on: the "
                                          "best of three always, off: none (default %(default)s)"}),
    ("optim", "validation_groups", {"type": int, "metavar": "K",
                                    "help": "make fit's choices after training (the never-worse rule, the "
                                            "person-relative step) on K disjoint groups of held-out persons "
                                            "instead of one: trains again once per extra group, fit's own "
                                            "validation persons trained on; the saved model is unchanged "
                                            "(costs K-1 more trainings; default %(default)s)"}),
    ("augment", "jitter_consistency", {"type": float, "metavar": "W",
                                       "help": "also train every face re-framed by a few pixels (the face detector's "
                                       "own alignment noise) to give the same probabilities, with this weight "
                                       "(0: off, the default; costs a second forward and backward pass)"}),
    ("augment", "mixup", {"type": float, "metavar": "A",
                          "help": "train on pairs of faces blended whole, the share drawn from Beta(A, A), the loss "
                                  "mixed alike (0: off; default: 0.2 when starting from the base model or --init-from "
                                  "RUN, else 0)"}),
    ("augment", "cutmix", {"type": float, "metavar": "A",
                           "help": "train on faces with a box pasted from another face, its area share drawn from "
                                   "Beta(A, A) (0: off, the default; 1 is usual); with --mixup, one or the other "
                                   "per batch"}),
    ("optim", "device", {"help": "auto, cpu or cuda (default %(default)s)"}),
    ("augment", "augment", {"choices": AUGMENT_PRESETS, "help": "default %(default)s"}),
]


def add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    groups = {key: p.add_argument_group(title) for key, title in _TRAIN_GROUPS.items()}
    groups["data"].add_argument("--data", action="append", metavar="DIR|CSV",
                                help="folder of FACES-named images or a CSV manifest (repeatable; required)")
    for group, name, kwargs in _TRAIN_FLAGS:
        if kwargs.get("action") != "store_true":
            kwargs = {"default": getattr(d, name), **kwargs}
        groups[group].add_argument("--" + name.replace("_", "-"), dest=name, **kwargs)
    groups["model"].add_argument(
        "--no-keep-start", dest="keep_start", action="store_false",
        help="fit: always answer with the fine-tuned heads (by default a head that fine-tuning does not improve on "
             "the validation persons, or that the data does not label, is answered by the model training started "
             "from, carried in the run)")
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


def train_config(args: argparse.Namespace) -> TrainConfig:
    from facemt.losses import parse_loss_weights
    from facemt.tasks import select_tasks

    values = {name: getattr(args, name) for _, name, _ in _TRAIN_FLAGS}
    values["tasks"] = select_tasks(args.tasks) if args.tasks else None
    values["loss_weights"] = parse_loss_weights(args.loss_weights, values["tasks"] or TASK_NAMES)
    config = TrainConfig(
        **values, keep_start=args.keep_start, pretrained=args.pretrained, pretrained_file=args.pretrained_file,
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


def cmd_synth(args: argparse.Namespace, out: Console, err: Console) -> int:
    from facemt.synth import check_args, generate

    check_args(args.out, args.persons, (args.width, args.height))
    check_folder(args.out, flag="synth")
    with bars(err, TextColumn("synth"), BarColumn(), MofNCompleteColumn()) as progress:
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
        config, sources, resume = train_config(args), [resolve_source(s) for s in args.data], None
    here = init_from_env(config.device)  # several processes under torchrun; nothing otherwise
    if not here.main:  # one process speaks for all
        out = err = Console(quiet=True)
    if resume is not None:
        err.print(f"resuming {run} at epoch {resume.epoch}, step {resume.step}")
    try:
        if resume is None and here.main:
            check_folder(run)  # said now, not after training (by one process: the check leaves no folder behind)
        return _fit_and_report(args, out, err, run, config, sources, resume)
    finally:
        shutdown()


def _options_given(args: argparse.Namespace, keep: Sequence[str]) -> list[str]:
    """The options of ``args.command`` set to something other than their defaults, as flags, except ``keep``."""
    from facemt.cli import build_parser

    defaults = vars(build_parser().parse_args([args.command]))
    return ["--" + k.replace("_", "-") for k, v in vars(args).items()
            if k in defaults and k not in (*keep, "command", "func") and v != defaults[k]]


def _fit_and_report(args, out: Console, err: Console, run: Path, config: TrainConfig, sources, resume) -> int:
    from facemt.engine import TrainingInterrupted, fit

    index = load_data(sources, err)
    print_summary(index, err)
    try:
        with _StopFlag() as stop, EventProgress(err) as progress:
            result = fit(index, config, run, callback=progress, sources=sources, should_stop=stop, resume=resume)
    except TrainingInterrupted as exc:
        err.print(f"{exc}; state saved. Resume with: facemt fit --resume {run}", markup=False, highlight=False)
        return EXIT_INTERRUPTED
    if out.quiet:
        return EXIT_OK
    if args.json:
        print(json.dumps({"run": str(run), "tasks": list(result.tasks), "best_epoch": result.best_epoch,
                          "metrics": result.metrics, "temperatures": dict(result.model.temperatures),
                          "untouched_val_acc": result.untouched, "untouched_all_faces_acc": result.untouched_all,
                          "kept": result.kept, "refit": result.refit, "person_relative": result.person_relative,
                          "validation_groups": result.validation_groups},
                         indent=2))
        return EXIT_OK
    out.print(_result_table(result, run))
    if result.untouched:
        out.print("before training: the starting model as it is (facemt predict without this run), on the "
                  "validation persons and on every face given; compare subject-disjoint with 'facemt cv'.",
                  markup=False, highlight=False)
    if result.refit:
        out.print(f"saved: the model trained again on all {result.refit['images']} images ({result.refit['persons']} "
                  f"persons) for {result.refit['epochs']} epoch(s) (--refit); the numbers above are the validated "
                  "model's, the heads and temperatures it chose are kept.", markup=False, highlight=False)
    if result.kept:
        out.print("answered by the start model (carried in the run, never worse than it): "
                  + "; ".join(f"{t}: {why}" for t, why in result.kept.items()), markup=False, highlight=False)
    if result.validation_groups:
        out.print(_groups_line(result.validation_groups), markup=False, highlight=False)
    if result.person_relative:
        out.print(_relative_line(result.person_relative), markup=False, highlight=False)
    return EXIT_OK


def _groups_line(groups: dict) -> str:
    """The pooled evidence fit's choices were made on (--validation-groups), in one line."""
    heads = ", ".join(f"{t} {100 * a:.1f} % fine-tuned against {100 * groups['untouched_val_accuracy'][t]:.1f} % "
                      f"before training on {groups['val_images'][t]} images" for t, a in groups["val_accuracy"].items())
    return f"choices made on {groups['groups']} groups of validation persons: {heads}"


def _relative_line(info: dict) -> str:
    """What fit decided about the person-relative expression classifiers, in one line."""
    shown = info.get("pooled") or info  # with --validation-groups: every group's pictures together
    scores = shown.get("scores", {})
    scores = (" (validation accuracy on " + f"{shown['val_images']} pictures: "
              + ", ".join(f"{name} {100 * s['accuracy']:.1f} %" for name, s in scores.items()) + ")" if scores else "")
    if info["used"]:
        return (f"person-relative expression: {info['variant']!r} used when pictures come grouped by person (evaluate, "
                f"cv, predict --person-from), for persons with {info['min_pictures']}+ pictures{scores}; {info['reason']}")
    return f"person-relative expression: not used{scores}; {info['reason']}"


def _result_table(result, run: Path) -> Table:
    """Per head: training and validation accuracy, the start model's on the same images, who answers."""
    table = Table(title=f"best epoch {result.best_epoch} (saved to {run})")
    start = ("val acc before training", "all faces before training") if result.untouched else ()
    for name in ("head", "train acc", "val acc", *start):
        table.add_column(name, justify="left" if name == "head" else "right")
    table.add_column("answered by")
    for t in result.model.tasks:
        v, before = result.metrics.get(f"val_{t}_acc"), result.untouched.get(t)
        train = result.metrics.get(f"train_{t}_acc")
        cells = ["-" if train is None else f"{train:.3f}", "-" if v is None else f"{v:.3f}"]
        if result.untouched:
            cells += ["-" if x is None else f"{x:.3f}" for x in (before, result.untouched_all.get(t))]
        table.add_row(t, *cells, "start model" if t in result.kept else "fine-tuned")
    return table


#: Columns a CSV gets after ``path`` when videos are among the inputs (empty on photos' rows).


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this group's commands."""
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
    add_train_args(p)
    p.add_argument("--out", help="run folder to write (model.safetensors, config.json, history.csv)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.add_argument("--resume", metavar="RUN", help="continue a run interrupted with Ctrl-C / SIGTERM "
                   "(its data and settings are read from RUN)")
    p.add_argument("--json", action="store_true", help="print the result as JSON (best epoch, metrics, temperatures)")
    p.set_defaults(func=cmd_fit)
