"""What every command group shares: exit codes, progress, data loading, shared options."""

from __future__ import annotations

import argparse
import time
from typing import Any, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from facemt.errors import FacemtError
from facemt.config import PRIORS
from facemt.engines import ENGINES
from facemt.tasks import TASK_NAMES


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


def timing(started: float, done: int, total: int) -> str:
    """`` (elapsed 12 s, eta 40 s)`` for log lines written without a terminal."""
    elapsed = time.monotonic() - started
    eta = f", eta {elapsed / done * (total - done):.0f} s" if done else ""
    return f" (elapsed {elapsed:.0f} s{eta})"


def bars(console: Console, *columns: Any, disable: bool = False, **kwargs: Any) -> Progress:
    """Rich progress bars on ``console``, drawn only on a terminal: in a log file a bar would be
    printed once, at the end, after the lines the run wrote while it worked."""
    return Progress(*columns, console=console, disable=disable or not console.is_terminal, **kwargs)


class EventProgress:
    """Turns the engine's callback events into rich progress bars on stderr."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = bars(
            console, TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), transient=False,
        )
        self.decode_task = None
        self.train_task = None
        self.started = time.monotonic()

    def __enter__(self) -> "EventProgress":
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
        elif event == "refit":
            p.console.print(f"refit: training again on all {info['images']} images ({info['persons']} persons) "
                            f"for {info['epochs']} epoch(s)", markup=False, highlight=False)
            self.train_task = None
        elif event == "evidence":
            p.console.print(f"validation group {info['group']} of {info['groups']}: training again with "
                            f"{info['val_images']} images of {info['val_persons']} other person(s) held out",
                            markup=False, highlight=False)
            self.train_task = None
        elif event == "epoch_start" and self.train_task is None:
            self.train_task = p.add_task("train", total=info["epochs"] * info["steps"])
        elif event == "step":
            p.update(self.train_task, advance=1, description=f"epoch {info['epoch']} loss {info['loss']:.3f}")
        elif event == "epoch_end":
            row = info["row"]
            parts = [f"epoch {info['epoch']:>3}/{info['epochs']}"]
            if not self.console.is_terminal:
                done = info["epoch"] - info.get("first_epoch", 1) + 1
                parts.append(timing(self.started, done, info["epochs"] - info.get("first_epoch", 1) + 1).strip())
            for split in ("train", "val"):
                accs = [f"{t}={row[f'{split}_{t}_acc']:.2f}" for t in TASK_NAMES if f"{split}_{t}_acc" in row]
                if accs:
                    parts.append(f"{split} acc " + " ".join(accs))
            p.console.print("  ".join(parts))


def load_data(sources: Sequence[str], err: Console):
    from facemt.data import load_sources

    index = load_sources(sources)
    if index.skipped:
        err.print(f"skipped {len(index.skipped)} file(s), e.g. {index.skipped[0]} (facemt check-data --json lists all)",
                  style="yellow", markup=False, highlight=False)
    return index


def print_summary(index, err: Console) -> None:
    s = index.summary()
    err.print(f"{s['images']} images, {s['persons']} persons")
    for task, counts in s["labels"].items():
        if counts["missing"] < s["images"]:
            err.print(f"  {task}: " + ", ".join(f"{c} {n}" for c, n in counts.items() if n))


def crop_override(args: argparse.Namespace) -> str | None:
    if getattr(args, "no_detect", False):
        if args.crop not in (None, "none"):
            raise FacemtError("--no-detect contradicts --crop " + args.crop)
        return "none"
    if getattr(args, "max_faces", None) is not None and args.max_faces < 1:
        raise FacemtError("--max-faces must be at least 1")
    return args.crop


def metrics_table(title: str, metrics: dict[str, dict]) -> Table:
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


def parse_targets(texts: Sequence[str] | None) -> dict[str, str]:
    from facemt.explain import parse_targets
    from facemt.tasks import TASKS as SCHEMA

    return {t: SCHEMA[t].classes[k] for t, k in parse_targets(texts, TASK_NAMES).items()}


def add_engine_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=ENGINES, default="auto",
                   help="auto: ONNX Runtime when the model folder holds a model.onnx exported from its weights (the "
                        "built-in model ships one; PyTorch is then never imported), else PyTorch; torch; or ONNX "
                        "Runtime on the CPU in float32 (onnx) or int8 (onnx-int8), using the run's model.onnx / "
                        "model.int8.onnx from 'facemt export' when present, else building it at start-up "
                        "(default %(default)s)")


def add_tta_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average each face's probabilities with its mirror image's "
                        "(twice the network time; see benchmarks/RESULTS.md for what it gains)")
    p.add_argument("--jitter", action="store_true",
                   help="also average the face framed 6 slightly different ways (shifts of 1 %% of the input, "
                        "scale +-4 %%: the detector's own alignment noise), for steadier answers; 7x the network time")


def add_prior_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prior", choices=PRIORS,
                   help="class frequencies the probabilities assume: 'balanced' (every class equally likely; what the "
                        "built-in model and runs fit with --balance-classes predict) or 'training' (as common as in "
                        "the run's training data, e.g. the built-in model's mostly neutral FER+ faces) "
                        "(default: the run's own)")


def add_person_relative_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-person-relative", action="store_true",
                   help="read every picture alone even where its person is known: no one age group and gender "
                        "per person, and expression from the network's head even where the run carries the "
                        "person-relative classifier (fit --person-relative)")


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="RUN|base",
                   help="a run folder written by 'facemt fit', or 'base' (the default): the built-in base model")


def chosen_model(args: argparse.Namespace) -> str | None:
    """The model a command reads: --model, or the legacy positional run folder."""
    run = getattr(args, "run", None)
    if run is not None and args.model is not None and run != args.model:
        raise FacemtError(f"two models given: {run} and --model {args.model}")
    return args.model or run


def add_method_arg(p: argparse.ArgumentParser) -> None:
    from facemt.explain import DEFAULT_METHOD

    p.add_argument("--method", default=DEFAULT_METHOD, metavar="METHOD",
                   help="explanation method: gradcam-8, gradcam-16, gradcam-32 (Grad-CAM on the trunk stage of "
                        "that stride) or integrated-gradients (default %(default)s, chosen by benchmarks/explain.py)")


def add_explain_args(p: argparse.ArgumentParser, metavar: str | None, help_text: str) -> None:
    if metavar:
        p.add_argument("--explain", metavar=metavar, help=help_text)
    else:
        p.add_argument("--explain", action="store_true", help=help_text)
    add_method_arg(p)


