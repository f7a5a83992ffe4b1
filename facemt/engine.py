"""Training and evaluation loops. Reports progress through a callback; never prints."""

from __future__ import annotations

import copy
import logging
import math
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch
from timm.models import group_parameters
from torch.utils.data import DataLoader

from facemt.checkpoint import (ResumeState, base_dir, discard_resume, load_checkpoint, load_resume,
                               read_config, run_name, save_checkpoint, save_resume, update_config)
from facemt.checks import check_data
from facemt.data import (DataIndex, FaceDataset, ImageCache, encode_targets, is_ferplus_test, persons_in,
                         soft_targets)
from facemt.splits import more_validation_groups, validation_split
from facemt.config import (BASE_NAME, DEFAULT_IMAGE_SIZE, DISTILL_TEMPERATURE, FINE_TUNE_BACKBONE_LR_SCALE,
                           FINE_TUNE_MIXUP, TrainConfig)
from facemt.distributed import World, all_reduce_sum, any_rank, barrier, broadcast_buffers, world
from facemt.errors import FacemtError
from facemt.files import atomic_write_text
from facemt.shards import take_shard
from facemt.inference import predict_images, resolve_device
from facemt.losses import MISSING, MultiTaskLoss, class_prior, expected_calibration_error, fit_temperature
from facemt.model import MultiTaskNet, create_model
from facemt.relative import MIN_PICTURES, choose, trunk_features
from facemt.tasks import TASKS, select_tasks
from facemt.transforms import PreprocessConfig, build_transform

log = logging.getLogger(__name__)

Callback = Callable[[str, dict[str, Any]], None]


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        model: the best model (by mean validation accuracy, or last epoch without validation).
        preprocess: its preprocessing.
        history: one row per epoch (losses, accuracies, lr).
        best_epoch: 1-based epoch of the returned weights.
        metrics: the history row of ``best_epoch`` as a dict.
        tasks: the trained heads.
        untouched: set by :func:`fit` when training started from a facemt
            model: that model's accuracy per head on the same validation
            images, before any training (what fine-tuning is measured against).
        untouched_all: set alongside ``untouched``: that model's accuracy on every
            image fit was given, training persons included (it trained on none of them).
        val_faces: set alongside ``untouched``: labelled validation images per head.
        kept: set by :func:`fit`: the heads the start model answers, and why.
    """

    model: MultiTaskNet
    preprocess: PreprocessConfig
    history: pd.DataFrame
    best_epoch: int
    metrics: dict[str, float]
    tasks: tuple[str, ...]
    untouched: dict[str, float] = field(default_factory=dict)
    untouched_all: dict[str, float] = field(default_factory=dict)
    val_faces: dict[str, int] = field(default_factory=dict)
    #: heads answered by the start model, with why (:func:`keep_start`); set by :func:`fit`
    kept: dict[str, str] = field(default_factory=dict)
    #: set by :func:`fit`: the never-worse rule's record (``enabled``; ``skipped`` with why, when it could not apply)
    never_worse: dict[str, Any] = field(default_factory=dict)
    #: set by :func:`fit` with ``refit``: what the returned model was trained on (validation persons too)
    refit: dict[str, Any] | None = None
    #: set by :func:`fit`: the person-relative expression classifier's evidence and whether the model uses it
    person_relative: dict[str, Any] | None = None
    #: set by :func:`fit` with ``validation_groups`` above 1: the pooled evidence its choices were made on
    validation_groups: dict[str, Any] | None = None
    #: set by :func:`fit`: the persons held out for validation
    val_persons: list[str] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch so that CPU runs repeat exactly."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def initial_weights(config: TrainConfig) -> str | None:
    """The run whose weights start training (the built-in base model's folder
    for ``init_from="base"`` when the backbone is the base's), or None when
    the backbone starts from ``pretrained``/``pretrained_file`` or at random."""
    if config.pretrained or config.pretrained_file or not config.init_from:
        return None
    if config.init_from != BASE_NAME or (Path(config.init_from) / "config.json").is_file():
        return config.init_from
    try:
        base = read_config(base_dir())
    except FacemtError:
        log.warning("the built-in base model is missing: %s starts from random weights", config.backbone)
        return None
    return str(base_dir()) if base["backbone"] == config.backbone else None


def resolve_tasks(index: DataIndex, wanted: Sequence[str] | None, rows: Sequence[int] | None = None,
                  warn: bool = True) -> tuple[str, ...]:
    """The tasks to train: the requested ones, or every head whose labels cover
    at least two classes (among ``rows`` when given: the training rows of a split).
    ``fit``, ``cv`` and every benchmark apply this one rule. A head skipped is logged
    unless ``warn`` is False (the caller has said so already: ``fit`` through its data
    check, ``cv`` once before its folds).

    Raises:
        FacemtError: a requested task has no labels or only one class, or no
            head is trainable.
    """
    candidates = select_tasks(wanted) if wanted else index.tasks_present()
    table = index.table if rows is None else index.table.iloc[list(rows)]
    tasks = []
    for t in candidates:
        classes = table[t].dropna().unique()
        if len(classes) >= 2:
            tasks.append(t)
        elif wanted:
            found = f"only {classes[0]!r}" if len(classes) else "no labels"
            where = "the data has" if rows is None else "its training images have"
            raise FacemtError(f"cannot train {t}: {where} {found}; a head needs at least two classes")
        elif warn:
            log.warning("skipping head %s: its labels cover fewer than two classes", t)
    if not tasks:
        raise FacemtError("the data has no head with labels of two or more classes: nothing to train")
    return tuple(tasks)


def decode_images(
    index: DataIndex, preprocess: PreprocessConfig, cache: ImageCache | None, callback: Callback | None
) -> list[np.ndarray]:
    """Decode (or fetch from the cache) every image of the index, before any training.

    Raises:
        FacemtError: naming every unreadable file.
    """
    cache = cache or ImageCache()
    paths = list(index.table["path"])
    images, errors = cache.load(
        paths, preprocess, (lambda d, n: callback("decode", {"done": d, "total": n})) if callback else None
    )
    if preprocess.policy.detects:
        counts = cache.framing_counts(index.table)
        log.info("face framing per source: %s", counts)
        if callback:
            callback("framing", {"counts": counts, "crop": preprocess.crop})
    if errors:
        shown = "; ".join(errors[:5]) + (f"; and {len(errors) - 5} more" if len(errors) > 5 else "")
        raise FacemtError(f"{len(errors)} unreadable image(s), fix or remove them: {shown}")
    return images  # type: ignore[return-value]


def _lr_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def _after_frozen(schedule: Callable[[int], float], frozen_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """The backbone's schedule with a head-only warm-up: learning rate 0 (its
    weights frozen) for ``frozen_steps``, then ``schedule`` ramped in linearly
    over ``warmup_steps``; without a head-only warm-up, ``schedule`` itself."""
    if frozen_steps == 0:
        return schedule

    def f(step: int) -> float:
        if step < frozen_steps:
            return 0.0
        ramp = min(1.0, (step - frozen_steps + 1) / warmup_steps) if warmup_steps else 1.0
        return ramp * schedule(step)

    return f


def epoch_batches(
    n: int, batch_size: int, seed: int, epoch: int, skip: int = 0, weights: torch.Tensor | None = None
) -> list[list[int]]:
    """The shuffled batches of one epoch: a pure function of (seed, epoch), so a
    resumed run can rebuild them and skip the ones already trained on. With
    ``weights``, the epoch's n rows are drawn with replacement in proportion."""
    generator = torch.Generator().manual_seed(_mix(seed, epoch))
    if weights is not None:
        order = torch.multinomial(weights, n, replacement=True, generator=generator).tolist()
    else:
        order = torch.randperm(n, generator=generator).tolist()
    return [order[i : i + batch_size] for i in range(0, n, batch_size)][skip:]


def source_weights(table: pd.DataFrame) -> torch.Tensor:
    """Sampling weight per row so that every source contributes equally to an
    epoch, however many images it has (a 213-image set is not drowned by a
    10,000-image one)."""
    counts = table["source"].map(table["source"].value_counts()).to_numpy(dtype=np.float64)
    return torch.as_tensor(1.0 / counts, dtype=torch.float64)


def initialise_from(model: MultiTaskNet, run_dir: str | Path, backbone: str) -> list[str]:
    """Copy the backbone and every head of matching task and width from a
    previous facemt run into ``model``; returns the copied heads.

    Raises:
        FacemtError: the run is unreadable or has another backbone.
    """
    source, _, config = load_checkpoint(run_dir)
    if config["backbone"] != backbone:
        raise FacemtError(f"init_from {run_dir}: its backbone is {config['backbone']}, this run's is {backbone}")
    model.trunk.load_state_dict(source.trunk.state_dict())
    copied = []
    for task, head in model.heads.items():
        if task in source.heads and source.heads[task].weight.shape == head.weight.shape:
            head.load_state_dict(source.heads[task].state_dict())
            copied.append(task)
    log.info("initialised from %s: backbone and heads %s", run_dir, ", ".join(copied) or "none")
    return copied


def _mix(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) % (2**32) for p in parts]).generate_state(1)[0])


class Meter:
    """Sums loss and correct counts per head over labelled rows."""

    def __init__(self, tasks: Sequence[str], state: dict[str, dict] | None = None) -> None:
        self.tasks = tuple(tasks)
        self.loss = {t: 0.0 for t in tasks}
        self.correct = {t: 0 for t in tasks}
        self.count = {t: 0 for t in tasks}
        if state is not None:
            self.loss, self.correct, self.count = (dict(state[k]) for k in ("loss", "correct", "count"))

    def add(self, logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], losses: dict[str, torch.Tensor]) -> None:
        for t in self.tasks:
            mask = targets[t] != MISSING
            n = int(mask.sum())
            if n:
                self.loss[t] += float(losses[t]) * n
                self.correct[t] += int((logits[t][mask].argmax(1) == targets[t][mask]).sum())
                self.count[t] += n

    def state(self) -> dict[str, dict]:
        return {"loss": dict(self.loss), "correct": dict(self.correct), "count": dict(self.count)}

    def gathered(self) -> "Meter":
        """The sums over every training process (itself when alone)."""
        if not world().distributed:
            return self
        sums = all_reduce_sum(torch.tensor([[self.loss[t], self.correct[t], self.count[t]] for t in self.tasks],
                                           dtype=torch.float64))
        return Meter(self.tasks, {"loss": {t: float(sums[i, 0]) for i, t in enumerate(self.tasks)},
                                   "correct": {t: int(sums[i, 1]) for i, t in enumerate(self.tasks)},
                                   "count": {t: int(sums[i, 2]) for i, t in enumerate(self.tasks)}})

    def row(self, prefix: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for t in self.tasks:
            n = self.count[t]
            out[f"{prefix}_{t}_loss"] = self.loss[t] / n if n else float("nan")
            out[f"{prefix}_{t}_acc"] = self.correct[t] / n if n else float("nan")
        accs = [out[f"{prefix}_{t}_acc"] for t in self.tasks if self.count[t]]
        out[f"{prefix}_mean_acc"] = float(np.mean(accs)) if accs else float("nan")
        return out


@torch.no_grad()
def evaluate_loader(model: MultiTaskNet, loader: DataLoader, criterion: MultiTaskLoss, device: torch.device) -> dict[str, float]:
    """Per-head loss and accuracy of ``model`` over a loader (eval mode); under
    data-parallel training each process passes its shard and the sums are
    all-reduced, so every process returns the whole validation set's metrics."""
    model.eval()
    meter = Meter(model.tasks)
    for batch in loader:
        targets = {t: v.to(device) for t, v in batch["targets"].items()}
        logits = model(batch["image"].to(device))
        _, losses = criterion(logits, targets)
        meter.add(logits, targets, losses)
    return meter.gathered().row("val")


class TrainingInterrupted(FacemtError):
    """Training stopped on request (SIGINT / SIGTERM); a resumable state was saved."""


@dataclass
class Setup:
    """Everything one training run works with, built by :func:`setup_training`."""

    config: TrainConfig
    tasks: tuple[str, ...]
    device: torch.device
    model: MultiTaskNet
    preprocess: PreprocessConfig
    criterion: MultiTaskLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_set: FaceDataset
    val_loader: DataLoader | None
    sample_weights: torch.Tensor | None
    steps_per_epoch: int
    train_rows: list[int]
    val_rows: list[int]
    world: World
    #: what the training step calls: the model, wrapped for data parallelism when there are several processes.
    network: torch.nn.Module
    #: labelled training rows per class of each head
    class_counts: dict[str, list[int]]
    #: the frozen start model that ``config.distill`` holds the heads to (None: no distillation)
    teacher: MultiTaskNet | None = None


def setup_training(
    index: DataIndex, config: TrainConfig, train_rows: Sequence[int], val_rows: Sequence[int],
    cache: ImageCache | None, callback: Callback | None, resuming: bool,
) -> Setup:
    """Validate the config, build the model (initialised from ImageNet, a file,
    a run or the base model), decode the images, and build datasets, loss,
    optimizer and schedule."""
    config.validate()
    tasks = resolve_tasks(index, config.tasks, warn=False)  # fit and cv have named the heads skipped
    device = resolve_device(config.device)
    here = world()
    seed_everything(config.seed if here.main else _mix(config.seed, here.rank))  # dropout differs per process
    init = initial_weights(config)
    if config.backbone_lr_scale is None:  # recorded resolved, so the checkpoint says what was used
        config = replace(config, backbone_lr_scale=FINE_TUNE_BACKBONE_LR_SCALE if init else 1.0)
    if config.mixup is None:
        config = replace(config, mixup=FINE_TUNE_MIXUP if init else 0.0)
    image_size = input_size(config, init)
    model, preprocess = create_model(
        config.backbone, tasks, config.pretrained and not resuming, None if resuming else config.pretrained_file,
        image_size, config.dropout, config.crop_policy,
    )
    if init and not resuming:
        initialise_from(model, init, config.backbone)
    model.to(device)
    teacher = _teacher(config, init, preprocess, device)
    train_rows, val_rows = [int(i) for i in train_rows], [int(i) for i in val_rows]
    if not train_rows:
        raise FacemtError("no training images")
    needed = sorted(set(train_rows) | set(val_rows))  # a subset of a large index decodes only what it uses
    decoded = decode_images(DataIndex(index.table.iloc[needed].reset_index(drop=True), []), preprocess, cache, callback)
    images = dict(zip(needed, decoded))
    targets = encode_targets(index.table, tasks)
    soft = {t: v[train_rows] for t, v in soft_targets(index.table, tasks).items()}  # crowd votes (ferplus-soft)
    train_set = FaceDataset([images[i] for i in train_rows], {t: v[train_rows] for t, v in targets.items()},
                            build_transform(preprocess, config.augment), seed=config.seed, soft=soft)
    val_loader = None
    if val_rows:
        mine = take_shard(val_rows, here.rank + 1, here.size)  # each process validates its shard; metrics are all-reduced
        val_set = FaceDataset([images[i] for i in mine], {t: v[mine] for t, v in targets.items()},
                              build_transform(preprocess, "none"))
        val_loader = DataLoader(val_set, batch_size=config.batch_size, shuffle=False, num_workers=0,
                                generator=torch.Generator())
    counts = class_counts(targets, train_rows)
    criterion = _criterion(config, tasks, counts).to(device)
    optimizer = _optimizer(config, model, criterion)
    steps_per_epoch = math.ceil(len(train_set) / config.batch_size)
    warmup_steps = int(round(config.warmup_epochs * steps_per_epoch))
    schedule = _lr_lambda(steps_per_epoch * config.epochs, warmup_steps)
    backbone = _after_frozen(schedule, int(round(config.head_warmup_epochs * steps_per_epoch)), warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [backbone if g["name"] == "backbone" else schedule for g in optimizer.param_groups])
    weights = source_weights(index.table.iloc[train_rows]) if config.balance_sources else None
    network: torch.nn.Module = model
    if here.distributed:
        from torch.nn.parallel import DistributedDataParallel

        network = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return Setup(config, tasks, device, model, preprocess, criterion, optimizer, scheduler, train_set, val_loader,
                 weights, steps_per_epoch, train_rows, val_rows, here, network, counts, teacher)


def input_size(config: TrainConfig, init: str | None) -> int:
    """The network input side a training uses: ``config.image_size``, else the initial model's (``init``, a
    facemt run), else the default."""
    return config.image_size or (read_config(init)["preprocess"]["image_size"] if init else DEFAULT_IMAGE_SIZE)


def _teacher(config: TrainConfig, init: str | None, preprocess: PreprocessConfig,
             device: torch.device) -> MultiTaskNet | None:
    """The start model, frozen, when ``config.distill`` > 0.

    Raises:
        FacemtError: no start model, or one that frames or sizes faces otherwise than this run.
    """
    if not config.distill:
        return None
    if not init:
        raise FacemtError("distill holds a fine-tuned model to the model it starts from: "
                          "this run starts from ImageNet or random weights")
    teacher, start_preprocess, _ = load_checkpoint(init, map_location=device)
    if start_preprocess != preprocess:
        raise FacemtError("distill needs the start model's preprocessing: drop --image-size and the crop options")
    teacher.requires_grad_(False)
    return teacher.eval()


def class_counts(targets: dict[str, np.ndarray], rows: Sequence[int]) -> dict[str, list[int]]:
    """Labelled training rows per class of each head (stored in the checkpoint
    as ``class_counts``: the prior a run can predict under, ``--prior``)."""
    labels = {t: v[list(rows)] for t, v in targets.items()}
    return {t: np.bincount(v[v >= 0], minlength=TASKS[t].num_classes).tolist() for t, v in labels.items()}


def _criterion(config: TrainConfig, tasks: Sequence[str], counts: dict[str, list[int]]) -> MultiTaskLoss:
    priors = None
    if config.balance_classes:
        priors = {t: torch.as_tensor(class_prior(c)) for t, c in counts.items()}
    return MultiTaskLoss({t: config.loss_weights.get(t, 1.0) for t in tasks}, config.label_smoothing,
                         learned=config.loss_weighting == "uncertainty", class_priors=priors)


def _optimizer(config: TrainConfig, model: MultiTaskNet, criterion: MultiTaskLoss) -> torch.optim.Optimizer:
    # Heads first: group 0's learning rate is the one logged per epoch.
    groups = [{"name": "heads", "params": list(model.heads.parameters())}]
    rate = config.lr * config.backbone_lr_scale
    blocks = _trunk_blocks(model.trunk) if config.layer_decay != 1.0 else [list(model.trunk.parameters())]
    groups += [{"name": "backbone", "params": params, "lr": rate * config.layer_decay ** (len(blocks) - 1 - i)}
               for i, params in enumerate(blocks)]
    if config.loss_weighting == "uncertainty":
        groups.append({"name": "loss", "params": list(criterion.parameters()), "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def _trunk_blocks(trunk: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """The trunk's parameters block by block, input first, as timm's
    ``group_matcher`` groups them (what timm's own layer decay uses)."""
    if not hasattr(trunk, "group_matcher"):
        raise FacemtError(f"layer_decay needs a timm backbone that names its blocks; {type(trunk).__name__} does not")
    named = dict(trunk.named_parameters())
    groups = group_parameters(trunk, trunk.group_matcher(coarse=False))
    blocks = [[named[n] for n in names] for _, names in sorted(groups.items())]
    assert sum(map(len, blocks)) == len(named), "every trunk parameter in exactly one block"
    return blocks


class KeepBest:
    """Keeps the weights of the epoch with the best mean validation accuracy
    (ties go to the later epoch); without validation, or with
    ``select_best=False``, the last epoch."""

    def __init__(self, select_best: bool, score: float | None = None, epoch: int = 0,
                 state: dict[str, torch.Tensor] | None = None) -> None:
        self.select_best = select_best
        self.score = -math.inf if score is None else score
        self.epoch = epoch
        self.state = state or None

    def update(self, epoch: int, row: dict[str, float], model: MultiTaskNet) -> bool:
        """Consider a finished epoch; True when its weights are now the kept ones."""
        score = row.get("val_mean_acc", float("nan"))
        if self.select_best and math.isfinite(score) and score < self.score:
            return False
        self.score = score if math.isfinite(score) else self.score
        self.epoch = epoch
        self.state = copy.deepcopy(model.state_dict())
        return True


def _snapshot(setup: Setup, epoch: int, step: int, meter: Meter, rows: list, best: KeepBest,
              extra: dict[str, Any]) -> ResumeState:
    sd = setup.optimizer.state_dict()
    return ResumeState(
        config=setup.config.to_dict(), epoch=epoch, step=step, history=rows, best_score=best.score,
        best_epoch=best.epoch, meter=meter.state(), scheduler=setup.scheduler.state_dict(),
        optimizer_groups=sd["param_groups"], train_rows=setup.train_rows, val_rows=setup.val_rows, extra=extra,
        model=setup.model.state_dict(), best=best.state or {}, criterion=setup.criterion.state_dict(),
        optimizer=sd["state"], rng=torch.get_rng_state(),
    )


def _restore(setup: Setup, state: ResumeState, select_best: bool) -> KeepBest:
    if state.train_rows != setup.train_rows or state.val_rows != setup.val_rows:
        raise FacemtError("cannot resume: the data or its split differs from the interrupted run")
    setup.model.load_state_dict(state.model)
    setup.criterion.load_state_dict(state.criterion)
    setup.optimizer.load_state_dict({"state": state.optimizer, "param_groups": state.optimizer_groups})
    setup.scheduler.load_state_dict(state.scheduler)
    if setup.world.main:  # the other processes keep their own dropout streams
        torch.set_rng_state(state.rng)
    best = {k: v.to(setup.device) for k, v in state.best.items()} if state.best_epoch else None
    return KeepBest(select_best, state.best_score, state.best_epoch, best)


def epoch_loader(setup: Setup, epoch: int, skip: int = 0) -> DataLoader:
    """The loader of one epoch from global step ``skip`` on: the (seed, epoch)
    batch order, and under data parallelism this process's share of each
    global batch (a last batch smaller than the number of processes is dropped)."""
    setup.train_set.epoch = epoch
    batches = epoch_batches(len(setup.train_set), setup.config.batch_size, setup.config.seed, epoch, skip,
                             setup.sample_weights)
    if setup.world.distributed:
        batches = [take_shard(b, setup.world.rank + 1, setup.world.size) for b in batches if len(b) >= setup.world.size]
    # Its own generator: a loader without one draws from the global RNG that dropout uses.
    return DataLoader(setup.train_set, batch_sampler=batches, num_workers=0, generator=torch.Generator())


def train(
    index: DataIndex,
    config: TrainConfig,
    train_rows: Sequence[int],
    val_rows: Sequence[int] = (),
    out_dir: str | Path | None = None,
    cache: ImageCache | None = None,
    callback: Callback | None = None,
    extra: dict[str, Any] | None = None,
    select_best: bool = True,
    should_stop: Callable[[], bool] | None = None,
    resume: ResumeState | None = None,
) -> TrainResult:
    """Train a multi-task (or single-task) network.

    Under ``torchrun`` (a process group initialised by
    :func:`facemt.distributed.init_from_env`) every process runs this with
    the same arguments: each trains on its share of every global batch,
    gradients and metrics are averaged, and only rank 0 writes ``out_dir``.

    Args:
        index: the labelled images.
        config: the run's configuration.
        train_rows, val_rows: row positions of ``index.table`` to train and validate on.
        out_dir: if given, the best checkpoint and ``history.csv`` are written
            there (atomically) as training goes.
        cache: decoded images shared between runs.
        callback: receives ``(event, info)`` for ``decode``, ``epoch_start``,
            ``step`` and ``epoch_end``.
        extra: more JSON fields for the checkpoint's ``config.json``.
        select_best: keep the epoch with the best mean validation accuracy; when
            False the last epoch is kept and ``val_rows`` only draw learning
            curves (cross-validation uses this so test folds never pick epochs).
        should_stop: polled after every step (on any process: all stop at the
            same step); when it returns True a resumable state is written to
            ``out_dir`` and :class:`TrainingInterrupted` is raised.
        resume: the state returned by :func:`load_resume`, to continue exactly
            where an interrupted run stopped.

    Returns:
        the best model and its history.

    Raises:
        FacemtError: bad configuration, unusable data, weights not available.
        TrainingInterrupted: ``should_stop`` asked to stop.
    """
    setup = setup_training(index, config, train_rows, val_rows, cache, callback, resume is not None)
    config, extra = setup.config, extra or {}
    writes = out_dir is not None and setup.world.main
    rows: list[dict[str, float]] = []
    best = KeepBest(select_best)
    first_epoch, skip, meter_state = 1, 0, None
    if resume is not None:
        best = _restore(setup, resume, select_best)
        rows, first_epoch, skip = list(resume.history), resume.epoch, resume.step
        meter_state = resume.meter if setup.world.main else None  # sums are all-reduced: count them once

    for epoch in range(first_epoch, config.epochs + 1):
        if callback:
            callback("epoch_start", {"epoch": epoch, "epochs": config.epochs, "steps": setup.steps_per_epoch,
                                     "first_epoch": first_epoch, "skip": skip})
        meter = Meter(setup.tasks, meter_state)
        meter_state = None
        lr = (setup.optimizer.param_groups[0]["lr"] if skip == 0
              else _epoch_start_lr(setup.scheduler, epoch, setup.steps_per_epoch))
        stopped_at = train_one_epoch(
            setup.network, epoch_loader(setup, epoch, skip), setup.criterion, setup.optimizer, setup.scheduler,
            meter, setup.device, first_step=skip + 1, should_stop=should_stop,
            consistency=config.jitter_consistency, mix=(config.mixup, config.cutmix),
            distill=(setup.teacher, config.distill), freeze_norm=config.freeze_norm,
            on_step=(lambda step, loss: callback("step", {"epoch": epoch, "step": step,
                                                          "steps": setup.steps_per_epoch, "loss": loss}))
            if callback else None)
        meter = meter.gathered()
        if stopped_at is not None:
            if writes:
                save_resume(Path(out_dir), _snapshot(setup, epoch, stopped_at, meter, rows, best, extra))
            barrier()
            raise TrainingInterrupted(f"training interrupted at epoch {epoch}, step {stopped_at}/{setup.steps_per_epoch}")
        skip = 0
        broadcast_buffers(setup.model)  # BatchNorm statistics: rank 0's, on every process
        rows.append(_epoch_row(setup, epoch, lr, meter))
        if best.update(epoch, rows[-1], setup.model) and writes:
            save_checkpoint(out_dir, setup.model, config.backbone, setup.preprocess,
                            {"train": config.to_dict(), "best_epoch": epoch, "metrics": _clean(rows[-1]),
                             "class_counts": setup.class_counts, **extra})
        if writes:
            atomic_write_text(Path(out_dir) / "history.csv", pd.DataFrame(rows).to_csv(index=False))
        if callback:
            callback("epoch_end", {"epoch": epoch, "epochs": config.epochs, "row": rows[-1], "best_epoch": best.epoch,
                                   "first_epoch": first_epoch})

    if writes:
        discard_resume(out_dir)
    assert best.state is not None
    setup.model.load_state_dict(best.state)
    setup.model.eval()
    return TrainResult(setup.model, setup.preprocess, pd.DataFrame(rows), best.epoch, _clean(rows[best.epoch - 1]),
                       setup.tasks)


def _epoch_row(setup: Setup, epoch: int, lr: float, meter: Meter) -> dict[str, float]:
    """The history row of a finished epoch: learning rate, training and validation metrics."""
    row: dict[str, float] = {"epoch": epoch, "lr": lr, **meter.row("train")}
    if setup.criterion.log_vars is not None:
        row.update({f"loss_weight_{t}": torch.exp(-v.detach()).item() for t, v in setup.criterion.log_vars.items()})
    if setup.val_loader is not None:
        row.update(evaluate_loader(setup.model, setup.val_loader, setup.criterion, setup.device))
    return row


def train_one_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    criterion: MultiTaskLoss,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    meter: Meter,
    device: torch.device,
    first_step: int = 1,
    on_step: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    consistency: float = 0.0,
    mix: tuple[float, float] = (0.0, 0.0),
    distill: tuple[MultiTaskNet | None, float] = (None, 0.0),
    freeze_norm: bool = False,
) -> int | None:
    """One pass over ``loader``: forward, masked loss, backward, optimizer and
    scheduler step per batch, per-head loss and accuracy summed into ``meter``.

    ``consistency`` > 0 adds that weight times :func:`jitter_consistency_loss`:
    every face (labelled or not) re-framed by the detector's alignment noise
    must give the probabilities of its unmoved view.

    ``mix`` = (mixup, cutmix) Beta parameters: when either is > 0, every batch
    is mixed by :func:`mix_batch` and the loss is ``share`` times the faces'
    own labels' loss plus ``1 - share`` times their partners' (each masked by
    its own labels); the meter scores the mixed faces against their own
    labels, the larger share.

    ``distill`` = (start model, weight): with a model, the loss adds weight
    times :func:`distillation_loss` of the trained heads against the start
    model's answers to the same (augmented, mixed) faces. ``freeze_norm``
    leaves every batch-normalisation layer in evaluation mode: its running
    statistics are used, not updated.

    ``model`` may be wrapped in DistributedDataParallel: the loss is then
    normalised by the global batch's labelled counts (so averaged gradients are
    the global batch's), the loss's own parameters are averaged by hand, and a
    stop request on any process stops all at the same step.

    Returns:
        None after the last batch, or the step after which ``should_stop`` asked to stop.
    """
    here = world()
    model.train()
    if freeze_norm:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()
    for step, batch in enumerate(loader, start=first_step):
        targets = {t: v.to(device) for t, v in batch["targets"].items()}
        counts = None
        if here.distributed:
            local = torch.tensor([int((v != MISSING).sum()) for v in targets.values()], dtype=torch.float64)
            counts = dict(zip(targets, all_reduce_sum(local).tolist()))
        soft = {t: v.to(device) for t, v in batch["soft"].items()} if "soft" in batch else None
        images = batch["image"].to(device)
        mixed = mix_batch(images, *mix) if any(mix) else None
        if mixed is not None:
            images, order, share = mixed
        logits = model(images)
        loss, losses = criterion(logits, targets, counts, here.size, soft)
        if mixed is not None:  # the partner faces' labels, masked alike, for the partner's share
            other, _ = criterion(logits, {t: v[order] for t, v in targets.items()}, counts, here.size,
                                 {t: v[order] for t, v in soft.items()} if soft is not None else None)
            loss = share * loss + (1 - share) * other
        if consistency:
            loss = loss + consistency * jitter_consistency_loss(logits, model(jitter_views(images)))
        if distill[0] is not None:
            with torch.no_grad():
                held = distill[0](images)
            loss = loss + distill[1] * distillation_loss(logits, held)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if here.distributed:
            for p in criterion.parameters():  # not inside DDP: average by hand
                if p.grad is not None:
                    p.grad.copy_(all_reduce_sum(p.grad) / here.size)
        optimizer.step()
        scheduler.step()
        meter.add({t: v.detach() for t, v in logits.items()}, targets, losses)
        if on_step is not None:
            on_step(step, loss.item())
        if any_rank(should_stop is not None and should_stop()):
            return step
    return None


def mix_batch(images: torch.Tensor, mixup: float, cutmix: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019) of a batch with itself in a random order.

    The share ``s`` of each face's own image is drawn from Beta(a, a) and
    folded to at least 0.5 (a face's own labels weigh the most). Mixup blends
    ``s * face + (1 - s) * partner``; CutMix pastes the partner's box of area
    ``1 - s`` at the same place (aligned faces: the partner's eyes or mouth),
    ``s`` then being the exact share left. With both > 0 one of them is drawn
    per batch, evenly. Uses torch's global random generator (seeded by fit).

    Returns:
        the mixed batch, each face's partner index, and ``s``.
    """
    use_cutmix = cutmix > 0 and (mixup <= 0 or bool(torch.rand(()) < 0.5))
    alpha = cutmix if use_cutmix else mixup
    share = float(torch.distributions.Beta(alpha, alpha).sample())
    share = max(share, 1.0 - share)
    order = torch.randperm(images.shape[0], device=images.device)
    if not use_cutmix:
        return share * images + (1 - share) * images[order], order, share
    h, w = images.shape[-2:]
    side = math.sqrt(1.0 - share)
    ch, cw = int(round(h * side)), int(round(w * side))
    y, x = int(torch.randint(0, h - ch + 1, ())), int(torch.randint(0, w - cw + 1, ()))
    out = images.clone()
    out[..., y:y + ch, x:x + cw] = images[order][..., y:y + ch, x:x + cw]
    return out, order, 1.0 - ch * cw / (h * w)


#: Alignment noise of :func:`jitter_views`: shift (fraction of the side), scale and rotation (degrees), each
#: drawn uniformly within +- this much: about 3-6 % of the canonical eye distance, the face detector's own noise.
JITTER_SHIFT, JITTER_SCALE, JITTER_DEGREES = 0.02, 0.04, 3.0


def jitter_views(images: torch.Tensor) -> torch.Tensor:
    """Each face of an N x 3 x S x S batch re-framed by a random small shift, scale and rotation
    (border replicated), as a slightly different detection would frame it."""
    import torch.nn.functional as F

    n = images.shape[0]
    draw = lambda *shape: torch.rand(*shape, device=images.device) * 2 - 1  # noqa: E731
    angle = draw(n) * math.radians(JITTER_DEGREES)
    scale = 1 + draw(n) * JITTER_SCALE
    shift = draw(n, 2) * JITTER_SHIFT * 2  # affine_grid's coordinates span 2 per side
    theta = torch.stack([torch.stack([scale * torch.cos(angle), -scale * torch.sin(angle), shift[:, 0]], 1),
                         torch.stack([scale * torch.sin(angle), scale * torch.cos(angle), shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="border", align_corners=False)


def jitter_consistency_loss(logits: dict[str, torch.Tensor], moved: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over heads of KL(p(face) || p(moved face)), batch mean; the unmoved view is the target (no gradient)."""
    import torch.nn.functional as F

    return sum(F.kl_div(F.log_softmax(moved[t], 1), F.softmax(logits[t].detach(), 1), reduction="batchmean")
               for t in logits)


def distillation_loss(logits: dict[str, torch.Tensor], start: dict[str, torch.Tensor],
                      temperature: float = DISTILL_TEMPERATURE) -> torch.Tensor:
    """Sum over the heads of ``logits`` that ``start`` also answers of T^2 KL(p_start || p) at
    temperature T, batch mean (Hinton et al. 2015: T^2 keeps the gradient's scale); zero when none."""
    import torch.nn.functional as F

    total = torch.zeros((), device=next(iter(logits.values())).device)
    for t in (t for t in logits if t in start):
        target = F.softmax(start[t].detach().float() / temperature, 1)
        total = total + F.kl_div(F.log_softmax(logits[t] / temperature, 1), target, reduction="batchmean")
    return total * temperature ** 2


def _epoch_start_lr(scheduler: torch.optim.lr_scheduler.LambdaLR, epoch: int, steps_per_epoch: int) -> float:
    """Learning rate at the first step of ``epoch`` (what an uninterrupted run logs)."""
    step = (epoch - 1) * steps_per_epoch
    return float(scheduler.base_lrs[0] * scheduler.lr_lambdas[0](step))


def _clean(row: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def fit_split(index: DataIndex, config: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """The training and validation rows :func:`fit` uses (subject-disjoint when persons are known).

    Raises:
        FacemtError: the data is the FER+ test split, or a head ``config.tasks`` names has fewer than two
            classes among the training rows.
    """
    if any(is_ferplus_test(Path(p).parent) for p in index.table["path"]):
        raise FacemtError("FER2013Test is the FER+ test split and is never trained on: train on FER2013Train "
                          "(validate on FER2013Valid) and evaluate on FER2013Test")
    train_rows, val_rows = validation_split(index.table, config.val_fraction, config.seed)
    if config.tasks:
        resolve_tasks(index, config.tasks, train_rows)
    return train_rows, val_rows


def fit(
    index: DataIndex,
    config: TrainConfig,
    out_dir: str | Path | None = None,
    cache: ImageCache | None = None,
    callback: Callback | None = None,
    sources: Sequence[str] = (),
    should_stop: Callable[[], bool] | None = None,
    resume: ResumeState | None = None,
    rows: tuple[Sequence[int], Sequence[int]] | None = None,
) -> TrainResult:
    """Split off a validation set (subject-disjoint when persons are known) and train.

    The checkpoint records the dataset summary, the data sources and which
    persons validated. ``rows`` = (training, validation) rows of ``index`` replaces
    :func:`fit_split`'s split (the fine-tuning study validates on other persons
    this way). See :func:`train` for the other arguments and errors.
    """
    train_rows, val_rows = fit_split(index, config) if rows is None else (np.asarray(rows[0]), np.asarray(rows[1]))
    report = check_data(index, config.tasks, val_rows, decode=False)
    if report.problems:
        raise FacemtError("; ".join(report.problems))
    if callback and report.warnings:
        callback("warnings", {"warnings": report.warnings})  # the caller shows them: each once
    else:
        for warning in report.warnings:
            log.warning(warning)
    val_persons = sorted({p for p in index.table["person"].iloc[val_rows] if p is not None})
    if callback:
        train_persons = {p for p in index.table["person"].iloc[train_rows] if p is not None}
        callback("split", {"train_images": len(train_rows), "val_images": len(val_rows),
                           "train_persons": len(train_persons), "val_persons": len(val_persons),
                           "fraction": config.val_fraction})
    extra = {
        "sources": [str(s) for s in sources],
        "dataset": index.summary(),
        "split": {
            "train_images": int(len(train_rows)),
            "val_images": int(len(val_rows)),
            "val_persons": val_persons,
            "subject_disjoint": bool(index.table["person"].notna().all()),
        },
    }
    cache = cache or ImageCache()
    result = train(index, config, train_rows, val_rows, out_dir, cache, callback, extra,
                   should_stop=should_stop, resume=resume)
    result.val_persons = [str(p) for p in val_persons]
    evidence = _more_evidence(index, config, val_rows, cache, callback, should_stop)
    if world().main:
        _never_worse(result, index, (train_rows, val_rows), config, out_dir, cache, evidence)
    if config.refit and not len(val_rows):
        log.warning("--refit skipped: no validation persons were held out, so the model already saw every face")
    elif config.refit:
        _refit(result, index, config, [*train_rows, *val_rows], out_dir, cache, callback, should_stop)
    if world().main and config.person_relative != "off" and "expression" in result.model.tasks:
        person_relative_step(result, index, (train_rows, val_rows), config, out_dir, cache, evidence)
    return result


def _more_evidence(index: DataIndex, config: TrainConfig, val_rows: Sequence[int], cache: ImageCache,
                   callback: Callback | None, should_stop: Callable[[], bool] | None) -> list[TrainResult]:
    """``config.validation_groups`` - 1 more fits for fit's choices to decide on
    (:func:`facemt.splits.more_validation_groups`: each holds out another group of persons and trains on
    the rest, fit's own validation persons included; nothing saved). A group that cannot train (a head
    left with one class) is left out with a warning; interrupted, the groups finished so far count."""
    if config.validation_groups < 2:
        return []
    if config.person_relative == "off" and not (config.keep_start and initial_weights(config)):
        log.warning("--validation-groups skipped: nothing to choose (no start model to keep, "
                    "--person-relative off)")
        return []
    splits = more_validation_groups(index.table, val_rows, config.validation_groups, config.seed)
    if len(splits) < config.validation_groups - 1:
        log.warning("--validation-groups %d: the persons allow %d group(s) of held-out persons",
                    config.validation_groups, len(splits) + 1)
    once = replace(config, validation_groups=1, refit=False)

    def quiet(event: str, info: dict) -> None:  # what fit's own run has said is not said again
        if callback and event not in ("warnings", "split", "framing"):
            callback(event, info)

    out = []
    for group, (train_rows, held) in enumerate(splits, 2):
        persons = index.table["person"].iloc[held]
        if callback:
            callback("evidence", {"group": group, "groups": len(splits) + 1, "val_images": len(held),
                                  "val_persons": int(persons.nunique()), "epochs": config.epochs})
        try:
            out.append(fit(index, once, cache=cache, callback=quiet, should_stop=should_stop,
                           rows=(train_rows, held)))
        except TrainingInterrupted:
            log.warning("interrupted: fit decides on the %d group(s) of validation persons finished", len(out) + 1)
            break
        except FacemtError as exc:
            log.warning("validation group %d left out: %s", group, exc)
    return out


def pooled_validation(result: TrainResult, evidence: Sequence[TrainResult]) -> dict[str, Any]:
    """Fit's own validation scores and those of the ``evidence`` runs (:func:`_more_evidence`) pooled per
    head, each group weighted by its labelled validation images: ``val_accuracy`` (fine-tuned),
    ``untouched_val_accuracy`` (the start model), ``val_images``, ``groups``, and ``per_group``."""
    runs = [result, *evidence]
    per_group = [{"val_persons": r.val_persons, "val_accuracy": {t: r.metrics.get(f"val_{t}_acc") for t in r.tasks},
                  "untouched_val_accuracy": dict(r.untouched), "val_images": dict(r.val_faces)} for r in runs]
    tuned, start, faces = {}, {}, {}
    for t in result.tasks:
        parts = [(g["val_accuracy"].get(t), g["untouched_val_accuracy"].get(t), g["val_images"].get(t))
                 for g in per_group]
        parts = [(a, b, n) for a, b, n in parts if n and a is not None and b is not None and math.isfinite(a)]
        if parts:
            faces[t] = sum(n for _, _, n in parts)
            # rounded: the same count of correct faces is the same accuracy, however the groups add up
            tuned[t] = round(sum(a * n for a, _, n in parts) / faces[t], 9)
            start[t] = round(sum(b * n for _, b, n in parts) / faces[t], 9)
    return {"groups": len(runs), "val_accuracy": tuned, "untouched_val_accuracy": start, "val_images": faces,
            "per_group": [_clean_group(g) for g in per_group]}


def _clean_group(group: dict[str, Any]) -> dict[str, Any]:
    """``group`` with NaN accuracies (a head without labelled validation faces) as None, for JSON."""
    return {k: {t: (None if v is None or not math.isfinite(v) else v) for t, v in d.items()} if isinstance(d, dict)
            else d for k, d in group.items()}


def person_relative_step(result: TrainResult, index: DataIndex, rows: tuple[Sequence[int], Sequence[int]],
                         config: TrainConfig, out_dir: str | Path | None, cache: ImageCache,
                         evidence: Sequence[TrainResult] = ()) -> None:
    """Fit the person-relative expression classifiers (:mod:`facemt.relative`) on the training persons'
    pictures through ``result.model``'s trunk, score them and the model's expression head on the validation
    persons they can answer, and, where one is best there (``person_relative`` ``on``: the best of them
    always), refit it on every picture fit was given and carry it in the model."""
    train_rows, val_rows = (list(map(int, r)) for r in rows)
    every = sorted({*train_rows, *val_rows})
    table = index.table.iloc[every].reset_index(drop=True)
    images = decode_images(DataIndex(table, []), result.preprocess, cache, None)
    device = resolve_device(config.device)
    features = trunk_features(result.model, images, result.preprocess, device)
    is_val = np.isin(every, val_rows)
    own = predict_images(result.model, [im for im, v in zip(images, is_val) if v], result.preprocess,
                         device=device)["expression"]
    labels = encode_targets(table, ["expression"])["expression"]
    always = config.person_relative == "on"
    others = [e.person_relative for e in evidence if e.person_relative]
    relative, info = choose(features, persons_in(table), labels, own, is_val, always, others)
    info = {"mode": config.person_relative, "min_pictures": MIN_PICTURES, "used": relative is not None, **info}
    if always and relative is not None:
        info["reason"] = f"--person-relative on ({info['reason']})"
    if relative is not None:
        result.model.relative = relative
        info["images"], info["persons"] = len(table), int(table["person"].nunique())
    result.person_relative = info
    if out_dir is not None:
        if relative is not None:
            _rewrite_checkpoint(result, out_dir)
        update_config(out_dir, {"person_relative_fit": info})


def _refit(result: TrainResult, index: DataIndex, config: TrainConfig, rows: Sequence[int],
           out_dir: str | Path | None, cache: ImageCache, callback: Callback | None,
           should_stop: Callable[[], bool] | None) -> None:
    """Train once more on ``rows`` (every face fit was given, the validation persons too) for the epochs
    validation chose, and make that ``result.model``: the heads the never-worse rule gave the start model
    stay the start model's, the others keep the validated run's temperatures. ``result``'s metrics stay the
    validated run's (the refit model has no held-out faces left). Interrupted, the validated model stays."""
    epochs = result.best_epoch
    again = replace(config, epochs=epochs, head_warmup_epochs=min(config.head_warmup_epochs, epochs - 0.01))
    persons = index.table["person"].iloc[list(rows)]
    info = {"images": len(rows), "persons": int(persons.nunique()), "epochs": epochs}
    if callback:
        callback("refit", info)
    try:
        second = train(index, again, rows, (), None, cache, callback, select_best=False, should_stop=should_stop)
    except TrainingInterrupted:
        log.warning("refit interrupted: the run keeps the model validated on held-out persons")
        return
    if not world().main:
        return
    first = result.model
    if first.kept is not None:
        second.model.keep(first.kept, first.kept_tasks)
    second.model.temperatures.update(first.temperatures)
    result.model, result.refit = second.model, {**info, "train_metrics": _clean(second.metrics)}
    if out_dir is not None:
        _rewrite_checkpoint(result, out_dir)
        update_config(out_dir, {"refit": result.refit})


def _never_worse(result: TrainResult, index: DataIndex, rows: tuple[Sequence[int], Sequence[int]],
                 config: TrainConfig, out_dir: str | Path | None, cache: ImageCache,
                 evidence: Sequence[TrainResult] = ()) -> None:
    """After training: score the start model on the validation rows and on every row fit was given
    (``rows`` = training, validation), apply the never-worse rule (:func:`keep_start`; on
    :func:`pooled_validation` with ``evidence``), calibrate, and record both in the run's config.json."""
    start = initial_weights(config)
    start_model = start_preprocess = None
    train_rows, val_rows = rows
    if start:
        start_model, start_preprocess, _ = load_checkpoint(start, map_location=resolve_device(config.device))
        if len(val_rows):
            result.untouched, result.untouched_all, result.val_faces = _start_scores(
                start_model, start_preprocess, index, train_rows, val_rows, result.tasks, cache, config.device)
    never_worse: dict[str, Any] = {"enabled": config.keep_start}
    if start and evidence and len(val_rows):
        result.validation_groups = pooled_validation(result, evidence)
    if start and config.keep_start:
        skipped = keep_start(result, start_model, start_preprocess, labelled_only=config.tasks is None,
                             pooled=result.validation_groups)
        if skipped:
            never_worse["skipped"] = skipped
            log.warning("no head can be answered by the start model: %s", skipped)
        elif result.kept and out_dir is not None:
            _rewrite_checkpoint(result, out_dir)
    result.never_worse = never_worse
    calibrate_run(out_dir, result.model, index, val_rows, result.preprocess, cache, config.device)
    if start and out_dir is not None:
        update_config(out_dir, {"untouched": {"model": run_name(start), "val_accuracy": result.untouched,
                                              "all_faces_accuracy": result.untouched_all,
                                              "val_images": result.val_faces},
                                "never_worse": {**never_worse, "kept": result.kept},
                                **({"validation_groups": result.validation_groups} if result.validation_groups else {})})


def _start_scores(model: MultiTaskNet, preprocess: PreprocessConfig, index: DataIndex, train_rows: Sequence[int],
                  val_rows: Sequence[int], tasks: Sequence[str], cache: ImageCache, device: str
                  ) -> tuple[dict[str, float], dict[str, float], dict[str, int]]:
    """The start model's accuracy per head of ``tasks`` on the validation rows and on every row
    (training and validation: a start model never trained on the user's faces, so both are fair; one
    that did, e.g. ``--init-from`` a run on the same faces, scores too high there, and the never-worse
    rule then keeps it on ties: the safe side), and the labelled validation rows per head."""
    rows = sorted({int(r) for r in train_rows} | {int(r) for r in val_rows})
    seen = DataIndex(index.table.iloc[rows].reset_index(drop=True), [])
    probs = {t: p for t, p in val_probabilities(model, preprocess, seen, cache, device).items() if t in tasks}
    at = {r: i for i, r in enumerate(rows)}
    where = [at[int(r)] for r in val_rows]
    val = seen.table.iloc[where].reset_index(drop=True)
    counts = {t: int((y >= 0).sum()) for t, y in encode_targets(val, list(probs)).items()}
    return _accuracy({t: p[where] for t, p in probs.items()}, val), _accuracy(probs, seen.table), counts


def heads_to_keep(metrics: dict[str, Any], untouched: dict[str, float], start_tasks: Sequence[str],
                  trained: Sequence[str], labelled_only: bool = True,
                  overall: tuple[dict[str, float], dict[str, int]] | None = None,
                  losses: tuple[dict[str, float], dict[str, float]] | None = None) -> dict[str, str]:
    """The heads a fine-tuned run should answer with the model it started from, and why: every head
    where fine-tuning did not beat that model untouched on the validation images, and, with
    ``labelled_only`` (no ``--tasks`` given), every head of the start model that the training data
    does not label (so fitting expressions alone leaves age group and gender as they were). A head
    without validation labels has no evidence and stays fine-tuned.

    An accuracy tie (common: both at 100 % on a handful of validation faces) keeps the start: fit's
    rule. The fine-tuning study weighs other tie-breaks through this function (none measured better
    over three draws of folds: benchmarks/RESULTS.md, "Fine-tuning study, part 3"):
    ``overall`` = (the start model's accuracy on every image fit was given, the labelled validation
    images) per head: the fine-tuned head wins a tie when its validation accuracy is at least one
    validation image (1/n) above that; else ``losses`` = (fine-tuned, untouched) mean negative
    log-likelihood of the validation labels per head: the lower log-loss wins a tie."""
    kept = {}
    tuned_loss, start_loss = losses or ({}, {})
    accuracy, faces = overall or ({}, {})
    for t in start_tasks:
        tuned = metrics.get(f"val_{t}_acc")
        if t not in trained:
            if labelled_only:
                kept[t] = "not trained: the data labels fewer than two of its classes"
        elif t not in untouched or tuned is None or not math.isfinite(tuned) or tuned > untouched[t]:
            continue
        elif tuned < untouched[t]:
            kept[t] = f"fine-tuned {tuned:.3f} < untouched {untouched[t]:.3f} on validation"
        elif t in accuracy and faces.get(t):
            if tuned < accuracy[t] + 1 / faces[t] - 1e-9:
                kept[t] = (f"fine-tuned {tuned:.3f} = untouched {untouched[t]:.3f} on {faces[t]} validation "
                           f"images, not one image above untouched {accuracy[t]:.3f} on every image")
        elif t not in tuned_loss or t not in start_loss:
            kept[t] = f"fine-tuned {tuned:.3f} = untouched {untouched[t]:.3f} on validation"
        elif tuned_loss[t] >= start_loss[t]:
            kept[t] = (f"fine-tuned {tuned:.3f} = untouched {untouched[t]:.3f} on validation, log-loss "
                       f"{tuned_loss[t]:.3f} >= {start_loss[t]:.3f}")
    return kept


def keep_start(result: TrainResult, start: MultiTaskNet, start_preprocess: PreprocessConfig,
               labelled_only: bool = True, pooled: dict[str, Any] | None = None) -> str | None:
    """Set ``result.kept`` (:func:`heads_to_keep`; on ``pooled`` validation scores, :func:`pooled_validation`,
    where given) and make ``result.model`` answer those heads with ``start``, carried whole. Returns why
    nothing can be kept (the start model would see faces framed or sized otherwise than it was trained on),
    else None."""
    if start_preprocess != result.preprocess:
        return "the run's preprocessing (image size or crop) differs from the start model's"
    if pooled:
        metrics = {f"val_{t}_acc": a for t, a in pooled["val_accuracy"].items()}
        result.kept = heads_to_keep(metrics, pooled["untouched_val_accuracy"], start.tasks, result.tasks, labelled_only)
        result.kept = {t: why + (f" ({pooled['val_images'][t]} images of {pooled['groups']} validation groups)"
                                 if t in pooled["val_images"] else "") for t, why in result.kept.items()}
    else:
        result.kept = heads_to_keep(result.metrics, result.untouched, start.tasks, result.tasks, labelled_only)
    if result.kept:
        result.model.keep(start, list(result.kept))
    return None


def _rewrite_checkpoint(result: TrainResult, out_dir: str | Path) -> None:
    """Save ``result.model`` (now carrying its start model) over the run's checkpoint, every other field
    of config.json kept."""
    config = read_config(out_dir)
    own = ("format", "format_version", "facemt_version", "created", "backbone", "dropout", "tasks", "preprocess",
           "weights_sha256", "kept", "person_relative")
    save_checkpoint(out_dir, result.model, config["backbone"], result.preprocess,
                    {k: v for k, v in config.items() if k not in own})
    if result.kept:
        log.info("the start model answers %s", ", ".join(f"{t} ({why})" for t, why in result.kept.items()))


def val_probabilities(model: MultiTaskNet, preprocess: PreprocessConfig, index: DataIndex,
                      cache: ImageCache | None = None, device: str = "auto") -> dict[str, np.ndarray]:
    """Calibrated class probabilities per head of ``model`` for every row of ``index`` (framed by ``preprocess``)."""
    images = decode_images(index, preprocess, cache or ImageCache(), None)
    return predict_images(model, images, preprocess, device=resolve_device(device))


def _accuracy(probs: dict[str, np.ndarray], table: pd.DataFrame) -> dict[str, float]:
    """Accuracy per head of ``probs`` on ``table``'s labels (heads without labels left out)."""
    targets = encode_targets(table, list(probs))
    return {t: float((probs[t].argmax(1)[y >= 0] == y[y >= 0]).mean()) for t, y in targets.items() if (y >= 0).any()}


def calibrate_run(
    run_dir: str | Path | None,
    model: MultiTaskNet,
    index: DataIndex,
    rows: Sequence[int],
    preprocess: PreprocessConfig,
    cache: ImageCache | None = None,
    device: str = "auto",
    batch_size: int = 64,
) -> dict[str, float]:
    """Fit one softmax temperature per head on labelled rows (validation data; heads the start
    model answers keep its temperatures), set them on ``model`` and, with ``run_dir``, store them in its config.json
    together with the expected calibration error before and after.

    Returns:
        task -> temperature.
    """
    rows = [int(i) for i in rows]
    if not rows:
        return dict(model.temperatures)
    sub = DataIndex(index.table.iloc[rows].reset_index(drop=True), [])
    images = decode_images(sub, preprocess, cache or ImageCache(), None)
    transform = build_transform(preprocess, "none")
    dev = resolve_device(device)
    model.to(dev).eval()
    logits: dict[str, list] = {t: [] for t in model.tasks}
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.stack([transform(im) for im in images[start:start + batch_size]]).to(dev)
            for t, v in model(batch).items():
                logits[t].append(v.float().cpu())
    targets = encode_targets(sub.table, model.tasks)
    report: dict[str, dict] = {}
    for t in model.tasks:
        if t in model.kept_tasks:  # answered by the start model: its probabilities stay as they were
            continue
        z, y = torch.cat(logits[t]), torch.as_tensor(targets[t])
        temperature = fit_temperature(z, y)
        mask = (y >= 0).numpy()
        before = expected_calibration_error(y.numpy()[mask], torch.softmax(z, 1).numpy()[mask]) if mask.any() else None
        after = (expected_calibration_error(y.numpy()[mask], torch.softmax(z / temperature, 1).numpy()[mask])
                 if mask.any() else None)
        model.temperatures[t] = temperature
        report[t] = {"temperature": temperature, "ece_before": before, "ece_after": after, "n": int(mask.sum())}
    if run_dir is not None:
        update_config(run_dir, {"calibration": {"temperature": {t: r["temperature"] for t, r in report.items()},
                                                "ece": report, "rows": len(rows)}})
    log.info("temperatures: %s", {t: round(r["temperature"], 3) for t, r in report.items()})
    return dict(model.temperatures)


__all__ = ["TrainConfig", "TrainResult", "TrainingInterrupted", "calibrate_run", "decode_images", "fit",
           "initial_weights", "load_resume", "predict_images", "resolve_device", "train", "train_one_epoch"]
