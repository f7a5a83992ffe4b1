"""Speed benchmark: one three-head network vs three single-task networks, the
decode-once cache vs decoding full-size photos every epoch, data-pipeline
overhead during training, and the backbone's bare forward time as the floor.

Run:  python benchmarks/speed.py [--out benchmarks/speed.csv] [--quick]

Everything is measured in one run on one machine; numbers are wall-clock
medians after warm-up. This is a benchmark, not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from facemt.data import FaceDataset, ImageCache, index_folder
from facemt.engine import Meter, epoch_batches, train_one_epoch
from facemt.model import create_model
from facemt.images import decode_file
from facemt.losses import MultiTaskLoss
from facemt.synth import draw_face, make_person
from facemt.tasks import TASK_NAMES, TASKS
from facemt.transforms import build_transform, shrink

FACES_SIZE = (2835, 3453)


def timeit(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def inference_rows(backbone: str, batch: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    multi, pre = create_model(backbone, TASK_NAMES)
    singles = [create_model(backbone, (t,))[0] for t in TASK_NAMES]
    for m in [multi, *singles]:
        m.eval()
    x = torch.randn(batch, 3, pre.image_size, pre.image_size)
    t_multi = timeit(lambda: multi(x), repeats)
    t_three = timeit(lambda: [m(x) for m in singles], repeats)
    t_floor = timeit(lambda: multi.trunk(x), repeats)
    rows = []
    for name, t in (("facemt (1 net, 3 heads)", t_multi), ("3 single-task nets", t_three), ("backbone forward (floor)", t_floor)):
        rows.append({"section": "inference", "backbone": backbone, "input": pre.image_size, "batch": batch,
                     "variant": name, "images_per_s": batch / t, "ms_per_image": 1000 * t / batch})
    rows.append({"section": "inference", "backbone": backbone, "input": pre.image_size, "batch": batch,
                 "variant": "ratio 3 nets / facemt", "ratio": t_three / t_multi})
    return rows


def make_faces_sized(folder: Path, n_persons: int = 6) -> None:
    rng = np.random.default_rng(0)
    ages, genders, exprs = (TASKS[t] for t in TASK_NAMES)
    for p in range(n_persons):
        a, g = divmod(p % 6, 2)
        person = make_person(p + 1, ages.classes[a], genders.classes[g], rng)
        for e, expr in enumerate(exprs.classes):
            for s in "ab":
                small = draw_face(person, expr, rng, (567, 690))
                big = np.asarray(small.resize(FACES_SIZE, Image.BICUBIC), dtype=np.int16)
                # Sensor-like noise gives the JPEG a photograph's entropy (and decode cost).
                big = Image.fromarray(np.clip(big + rng.normal(0, 6, big.shape), 0, 255).astype(np.uint8))
                big.save(folder / f"{p + 1:03d}_{ages.codes[a]}_{genders.codes[g]}_{exprs.codes[e]}_{s}.jpg", quality=90)


class DecodeEveryEpoch(FaceDataset):
    """The naive design: open and shrink the full-size file on every access."""

    def __init__(self, paths, targets, transform, pre, seed=0):
        super().__init__([None] * len(paths), targets, transform, seed)
        self.paths, self.pre = paths, pre

    def __getitem__(self, i):
        self.images[i] = shrink(decode_file(self.paths[i]), self.pre)
        try:
            return super().__getitem__(i)
        finally:
            self.images[i] = None


class _Timed:
    """Iterates a loader and adds up the time spent waiting for its batches."""

    def __init__(self, loader) -> None:
        self.loader, self.wait = loader, 0.0

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t
            yield batch


def train_epoch(model, dataset, batch_size: int, criterion, optimizer) -> tuple[float, float]:
    """One epoch of facemt's own ``train_one_epoch``; returns (total seconds, seconds spent waiting for batches)."""
    loader = _Timed(torch.utils.data.DataLoader(dataset, batch_sampler=epoch_batches(len(dataset), batch_size, 0, 1),
                                                generator=torch.Generator()))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    start = time.perf_counter()
    train_one_epoch(model, loader, criterion, optimizer, scheduler, Meter(model.tasks), torch.device("cpu"))
    return time.perf_counter() - start, loader.wait


def training_rows(backbones: list[str], image_size: int, epochs: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        t = time.perf_counter()
        make_faces_sized(folder)
        size_mb = sum(p.stat().st_size for p in folder.iterdir()) / 72 / 1e6
        print(f"generated 72 {FACES_SIZE[0]}x{FACES_SIZE[1]} JPEGs ({size_mb:.1f} MB each) in "
              f"{time.perf_counter() - t:.0f} s", file=sys.stderr)
        for backbone in backbones:
            rows += _training_rows(folder, backbone, image_size, epochs, size_mb)
    return rows


def _training_rows(folder: Path, backbone: str, image_size: int, epochs: int, size_mb: float) -> list[dict]:
    rows = []
    if True:
        index = index_folder(folder)
        torch.manual_seed(0)
        model, pre = create_model(backbone, TASK_NAMES, image_size=image_size)
        targets = {t: np.array([TASKS[t].classes.index(v) for v in index.table[t]]) for t in TASK_NAMES}
        criterion = MultiTaskLoss({t: 1.0 for t in TASK_NAMES})
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        transform = build_transform(pre, "heavy")
        paths = list(index.table["path"])

        cache = ImageCache()
        t = time.perf_counter()
        images, _ = cache.load(paths, pre)
        decode_once = time.perf_counter() - t
        cached = FaceDataset(images, targets, transform)
        naive = DecodeEveryEpoch(paths, targets, transform, pre)
        train_epoch(model, cached, 32, criterion, optimizer)  # warm-up
        cached_runs = [train_epoch(model, cached, 32, criterion, optimizer) for _ in range(epochs)]
        naive_runs = [train_epoch(model, naive, 32, criterion, optimizer) for _ in range(max(1, epochs // 2))]
        c_total = statistics.median(r[0] for r in cached_runs)
        c_wait = statistics.median(r[1] for r in cached_runs)
        n_total = statistics.median(r[0] for r in naive_runs)
        n_wait = statistics.median(r[1] for r in naive_runs)
        base = {"section": "training", "backbone": backbone, "input": image_size, "batch": 32}
        rows.append({**base, "variant": f"decode-once cache: one-time decode of 72 photos ({size_mb:.1f} MB JPEGs)",
                     "seconds": decode_once})
        rows.append({**base, "variant": "epoch, decode-once cache", "seconds": c_total, "data_wait_fraction": c_wait / c_total})
        rows.append({**base, "variant": "epoch, decode full-size every epoch", "seconds": n_total, "data_wait_fraction": n_wait / n_total})
        rows.append({**base, "variant": "ratio every-epoch / cache", "ratio": n_total / c_total})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/speed.csv", help="CSV to write (default %(default)s)")
    parser.add_argument("--backbones", default="resnet18,mobilenetv2_100")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-backbones", default="resnet18,mobilenetv2_100")
    parser.add_argument("--train-size", type=int, default=128, help="training input size (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, batch 32 only at a reduced count")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for backbone in args.backbones.split(","):
        for batch in (1, 32):
            rows += inference_rows(backbone, batch, 2 if args.quick else args.repeats)
            print(f"inference {backbone} batch {batch} done", file=sys.stderr)
    rows += training_rows(args.train_backbones.split(","), args.train_size, 1 if args.quick else args.epochs)
    frame = pd.DataFrame(rows)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, CPU"
    frame.insert(0, "machine", machine)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    table = Table(title=f"facemt speed ({machine})")
    for col in ("section", "backbone", "input", "batch", "variant", "images/s", "ms/image", "seconds", "ratio", "data wait"):
        table.add_column(col)
    f = lambda v, fmt: "" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, fmt)  # noqa: E731
    for r in rows:
        table.add_row(r["section"], r["backbone"], str(r["input"]), str(r["batch"]), r["variant"],
                      f(r.get("images_per_s"), ".1f"), f(r.get("ms_per_image"), ".2f"), f(r.get("seconds"), ".2f"),
                      f(r.get("ratio"), ".2f") + ("x" if r.get("ratio") else ""),
                      f(100 * r["data_wait_fraction"] if r.get("data_wait_fraction") is not None else None, ".1f") + ("%" if r.get("data_wait_fraction") is not None else ""))
    Console(width=220).print(table)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
