"""One self-describing checkpoint format: ``model.safetensors`` + ``config.json``.

``config.json`` carries everything needed to rebuild and use the model
(architecture, task schema, preprocessing) plus how it was trained and how
well it did. Weights are only ever read through safetensors: nothing is
unpickled. Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from facemt import __version__
from facemt.config import BASE_NAME
from facemt.errors import FacemtError
from facemt.files import atomic_write, atomic_write_text, finish_file, make_temp, sha256_file
from facemt.tasks import check_schema, schema_dict
from facemt.transforms import PreprocessConfig

if TYPE_CHECKING:  # reading a config or naming a run needs no PyTorch (the ONNX path never imports it)
    import torch

    from facemt.model import MultiTaskNet

FORMAT = "facemt-checkpoint"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
PREVIOUS_WEIGHTS = ".model.previous.safetensors"


def save_file(tensors: dict, path: str, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file as save

    save(tensors, path, metadata=metadata)


def load_file(path: str, device: str = "cpu") -> dict:
    from safetensors.torch import load_file as load

    return load(path, device=device)


def save_checkpoint(
    run_dir: str | os.PathLike,
    model: MultiTaskNet,
    backbone: str,
    preprocess: PreprocessConfig,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` and ``config.json`` into ``run_dir``.

    Args:
        run_dir: the run folder (created if needed).
        model: the trained network.
        backbone: timm name of the trunk.
        preprocess: the model's preprocessing.
        extra: more JSON-ready fields (training config, metrics, dataset summary).

    Returns:
        the run folder.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in run_dir.glob(".*.tmp"):  # left by a process killed mid-write
        stale.unlink(missing_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights, previous = run_dir / WEIGHTS, run_dir / PREVIOUS_WEIGHTS
    tmp = make_temp(weights)
    try:
        save_file(state, tmp, metadata={"format": FORMAT})
        finish_file(tmp)
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "facemt_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "backbone": backbone,
            "dropout": float(model.dropout.p),
            "tasks": schema_dict(model.tasks),
            "preprocess": preprocess.to_dict(),
            "weights_sha256": sha256_file(tmp),
            **(extra or {}),
        }
        if model.kept is not None:  # structure only: rebuilt by load_checkpoint before the weights are read
            config["kept"] = kept_spec(model.kept, model.kept_tasks, backbone)
        config.update(relative_spec(model))
        # Keep the old weights reachable until the new config.json is in place, so
        # a kill between the two renames still leaves a consistent pair.
        previous.unlink(missing_ok=True)
        if weights.exists():
            os.link(weights, previous)
        os.replace(tmp, weights)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_text(run_dir / CONFIG, json.dumps(config, indent=2) + "\n")
    previous.unlink(missing_ok=True)
    return run_dir


def kept_spec(start: MultiTaskNet, tasks: tuple[str, ...], backbone: str) -> dict[str, Any]:
    """What ``config.json`` says of a start model a run carries (:meth:`MultiTaskNet.keep`): its
    architecture and schema, the heads it answers, and in turn the start model it carries."""
    spec = {"backbone": backbone, "dropout": float(start.dropout.p), "tasks": schema_dict(start.tasks),
            "heads": list(tasks), "temperature": {t: float(start.temperatures[t]) for t in start.tasks}}
    if start.kept is not None:
        spec["kept"] = kept_spec(start.kept, start.kept_tasks, backbone)
    return {**spec, **relative_spec(start)}


def relative_spec(model: MultiTaskNet) -> dict[str, Any]:
    """``config.json``'s ``person_relative`` entry for a model carrying one (facemt.relative), else nothing:
    the head it answers, the fewest pictures of a person it needs and which classifier it is (a run from
    before there were several: ``centred``); its weights are in the safetensors."""
    head = model.relative
    return {} if head is None else {"person_relative": {"task": "expression", "min_pictures": head.min_pictures,
                                                        "variant": head.variant}}


def _network(spec: dict[str, Any]) -> MultiTaskNet:
    """The (untrained) network a config or a ``kept`` entry describes, with its kept start models."""
    from facemt.model import MultiTaskNet, create_trunk
    from facemt.relative import PersonRelative

    model = MultiTaskNet(create_trunk(spec["backbone"], pretrained=False), check_schema(spec["tasks"]),
                         dropout=float(spec.get("dropout", 0.0)))
    if "person_relative" in spec:
        relative = spec["person_relative"]
        model.relative = PersonRelative(model.trunk.num_features, int(relative["min_pictures"]),
                                        relative.get("variant", "centred"))
    if "kept" in spec:
        kept = spec["kept"]
        start = _network(kept)
        start.temperatures.update({t: float(v) for t, v in kept.get("temperature", {}).items()})
        model.keep(start, list(kept["heads"]))
    return model


def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a run folder's ``config.json``.

    Raises:
        FacemtError: missing folder or file, invalid JSON, foreign or newer format.
    """
    run_dir = Path(run_dir)
    path = run_dir / CONFIG
    if not run_dir.is_dir():
        raise FacemtError(f"{run_dir}: no such run folder (give the --out folder of 'facemt fit')")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FacemtError(f"{path}: missing; {run_dir} is not a facemt run folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FacemtError(f"{path}: corrupt JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise FacemtError(f"{path}: not a facemt checkpoint config")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise FacemtError(
            f"{path}: checkpoint format version {version!r}, this facemt reads version {FORMAT_VERSION}"
        )
    for key in ("backbone", "tasks", "preprocess", "weights_sha256"):
        if key not in config:
            raise FacemtError(f"{path}: missing field {key!r}")
    return config


def load_checkpoint(
    run_dir: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[MultiTaskNet, PreprocessConfig, dict[str, Any]]:
    """Rebuild the model from a run folder alone.

    Returns:
        the model (eval mode), its preprocessing and the whole config.

    Raises:
        FacemtError: any missing, corrupt, edited or mismatched file, named.
    """
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise FacemtError(f"{weights}: missing")
    if sha256_file(weights) != config["weights_sha256"]:
        previous = run_dir / PREVIOUS_WEIGHTS
        if previous.is_file() and sha256_file(previous) == config["weights_sha256"]:
            weights = previous  # a save was killed between its two renames: the old pair is intact
        else:
            raise FacemtError(f"{weights}: SHA-256 does not match config.json (file corrupt or replaced)")
    try:
        state = load_file(str(weights), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FacemtError(f"{weights}: not a readable safetensors file ({exc})") from None
    try:
        preprocess = PreprocessConfig.from_dict(config["preprocess"])
        model = _network(config)
    except (TypeError, ValueError, AttributeError, KeyError) as exc:
        raise FacemtError(f"{run_dir / CONFIG}: invalid field ({exc})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise FacemtError(f"{weights}: weights do not fit the model described in config.json ({first[0] if first else exc})") from None
    model.temperatures.update({t: float(v) for t, v in config.get("calibration", {}).get("temperature", {}).items()
                               if t in model.temperatures})
    model.to(map_location).eval()
    return model, preprocess, config


def update_config(run_dir: str | os.PathLike, fields: dict[str, Any]) -> dict[str, Any]:
    """Add or replace top-level fields of a run's ``config.json`` (atomically;
    the weights are untouched). Returns the new config.

    Raises:
        FacemtError: as :func:`read_config`.
    """
    config = {**read_config(run_dir), **fields}
    atomic_write_text(Path(run_dir) / CONFIG, json.dumps(config, indent=2) + "\n")
    return config




def base_dir() -> Path:
    """The built-in base model's folder inside the installed package."""
    from importlib import resources

    return Path(str(resources.files("facemt") / "base"))


def resolve_run(model: str | os.PathLike | None) -> Path:
    """The run folder a model name stands for: ``None`` or ``"base"`` is the
    built-in base model (unless a folder named ``base`` holding a run is in the
    way: a path wins), anything else is a run folder written by ``facemt fit``.

    Raises:
        FacemtError: the built-in model is missing from this installation.
    """
    if model is not None and (str(model) != BASE_NAME or (Path(model) / CONFIG).is_file()):
        return Path(model)
    folder = base_dir()
    if not (folder / CONFIG).is_file():
        raise FacemtError(f"the built-in base model is missing from this installation ({folder}); "
                          "reinstall facemt or name a run folder")
    return folder


def run_name(run_dir: str | os.PathLike) -> str:
    """How to name a run folder in reports and configs: ``"base"`` for the
    built-in base model (not its install path), else the folder as given;
    the inverse of :func:`resolve_run`."""
    return BASE_NAME if Path(run_dir).resolve() == base_dir().resolve() else str(run_dir)


def copy_half(run_dir: str | os.PathLike, out_dir: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Copy a run with its weights stored as float16 (half the size; loading
    casts them back to float32). ``config.json`` is copied with the new SHA-256."""
    config = read_config(run_dir)
    model, _, _ = load_checkpoint(run_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: (v.half() if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    atomic_write(out_dir / WEIGHTS, lambda tmp: save_file(state, tmp, metadata={"format": FORMAT}))
    config = {**config, **(extra or {}), "weights_sha256": sha256_file(out_dir / WEIGHTS), "weights_dtype": "float16"}
    atomic_write_text(out_dir / CONFIG, json.dumps(config, indent=2) + "\n")
    return out_dir


RESUME_WEIGHTS = "resume.safetensors"
RESUME_STATE = "resume.json"
RESUME_FORMAT = "facemt-resume"


@dataclass
class ResumeState:
    """Everything an interrupted training run needs to continue exactly.

    Steps count global batches of the epoch's (seed, epoch) batch order, so a
    state saved by N processes resumes with any other number. The run folder
    holds it as ``resume.json`` (the fields below except the tensors) and
    ``resume.safetensors`` (model, best model, loss, optimizer and RNG tensors).

    Attributes:
        config: the run's ``TrainConfig.to_dict()``.
        epoch, step: the epoch being trained and the last finished step in it.
        history: the finished epochs' rows.
        best_score, best_epoch: the best validation score so far and its epoch (0: none).
        meter: the interrupted epoch's running sums (``loss``, ``correct``, ``count`` per head).
        scheduler: the learning-rate scheduler's state dict.
        optimizer_groups: the optimizer's param groups; ``optimizer`` its per-parameter tensors.
        train_rows, val_rows: the rows of the data index trained and validated on.
        extra: the checkpoint fields of the run (sources, dataset summary, split).
        model, best, criterion: state dicts (``best`` empty when no epoch finished).
        rng: the torch CPU RNG state of the process that saved.
    """

    config: dict[str, Any]
    epoch: int
    step: int
    history: list[dict[str, Any]]
    best_score: float | None
    best_epoch: int
    meter: dict[str, dict[str, float]]
    scheduler: dict[str, Any]
    optimizer_groups: list[dict[str, Any]]
    train_rows: list[int]
    val_rows: list[int]
    extra: dict[str, Any]
    model: dict[str, torch.Tensor] = field(repr=False)
    best: dict[str, torch.Tensor] = field(repr=False)
    criterion: dict[str, torch.Tensor] = field(repr=False)
    optimizer: dict[int, dict[str, torch.Tensor]] = field(repr=False)
    rng: torch.Tensor = field(repr=False)

    _PREFIXES = ("model", "best", "criterion")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The flat tensor dict stored in ``resume.safetensors``."""
        import torch

        out = {f"{prefix}/{k}": v.detach().cpu().contiguous()
               for prefix in self._PREFIXES for k, v in getattr(self, prefix).items()}
        out.update({f"optim/{idx}/{name}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
                    for idx, st in self.optimizer.items() for name, v in st.items()})
        out["rng/torch"] = self.rng
        return out

    def fields(self) -> dict[str, Any]:
        """The JSON part stored in ``resume.json``."""
        best = self.best_score if self.best_score is not None and math.isfinite(self.best_score) else None
        return {"config": self.config, "epoch": self.epoch, "step": self.step, "history": self.history,
                "best_score": best, "best_epoch": self.best_epoch, "meter": self.meter,
                "scheduler": self.scheduler, "optimizer_param_groups": self.optimizer_groups,
                "train_rows": self.train_rows, "val_rows": self.val_rows, "extra": self.extra}

    @classmethod
    def from_files(cls, fields: dict[str, Any], tensors: dict[str, torch.Tensor]) -> "ResumeState":
        """Rebuild from the two stored parts (inverse of :meth:`fields` and :meth:`tensors`)."""
        parts: dict[str, dict[str, torch.Tensor]] = {p: {} for p in cls._PREFIXES}
        optimizer: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            prefix, _, name = key.partition("/")
            if prefix in parts:
                parts[prefix][name] = value
            elif prefix == "optim":
                idx, _, param = name.partition("/")
                optimizer.setdefault(int(idx), {})[param] = value
        return cls(
            config=fields["config"], epoch=int(fields["epoch"]), step=int(fields["step"]), history=fields["history"],
            best_score=fields["best_score"], best_epoch=int(fields["best_epoch"]), meter=fields["meter"],
            scheduler=fields["scheduler"], optimizer_groups=fields["optimizer_param_groups"],
            train_rows=[int(i) for i in fields["train_rows"]], val_rows=[int(i) for i in fields["val_rows"]],
            extra=fields.get("extra") or {}, model=parts["model"], best=parts["best"], criterion=parts["criterion"],
            optimizer=optimizer, rng=tensors["rng/torch"],
        )


def save_resume(run_dir: str | os.PathLike, state: ResumeState) -> None:
    """Write ``state`` into ``run_dir`` (weights first, then the JSON that names their SHA-256)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = state.tensors()
    atomic_write(run_dir / RESUME_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": RESUME_FORMAT}))
    fields = {**state.fields(), "format": RESUME_FORMAT, "format_version": 1,
              "weights_sha256": sha256_file(run_dir / RESUME_WEIGHTS)}
    atomic_write_text(run_dir / RESUME_STATE, json.dumps(fields, indent=1) + "\n")


def load_resume(run_dir: str | os.PathLike) -> ResumeState:
    """Read the resumable state that an interrupted ``fit`` left in ``run_dir``.

    Raises:
        FacemtError: nothing to resume, or the files are corrupt.
    """
    run_dir = Path(run_dir)
    path = run_dir / RESUME_STATE
    if not path.is_file():
        raise FacemtError(f"{run_dir}: nothing to resume (no {RESUME_STATE}; the run finished or never started)")
    try:
        fields = json.loads(path.read_text(encoding="utf-8"))
        if fields.get("format") != RESUME_FORMAT or fields.get("format_version") != 1:
            raise ValueError("not a facemt resume file")
        if sha256_file(run_dir / RESUME_WEIGHTS) != fields["weights_sha256"]:
            raise ValueError(f"{RESUME_WEIGHTS} does not match its SHA-256")
        return ResumeState.from_files(fields, load_file(str(run_dir / RESUME_WEIGHTS)))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise FacemtError(f"{path}: cannot resume ({exc})") from None


def discard_resume(run_dir: str | os.PathLike) -> None:
    """Remove a run's resume files (the run finished)."""
    for name in (RESUME_STATE, RESUME_WEIGHTS):
        (Path(run_dir) / name).unlink(missing_ok=True)
