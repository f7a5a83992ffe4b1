"""The network: one timm trunk, one linear head per task."""

from __future__ import annotations

import copy
import difflib
import io
import logging
import os
import socket
import warnings
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from facemt.config import DEFAULT_BACKBONE
from facemt.errors import FacemtError
from facemt.faces import CropPolicy
from facemt.relative import PersonRelative
from facemt.tasks import TASKS, select_tasks
from facemt.transforms import PreprocessConfig, resolve_preprocess

log = logging.getLogger(__name__)

PRETRAINED_HELP = (
    "use --pretrained-file PATH (a local .safetensors/.pth of the backbone), "
    "--no-pretrained (random init), or --pretrained with network access to the model hub"
)


class MultiTaskNet(nn.Module):
    """Shared backbone feeding one classification head per task.

    Args:
        trunk: a headless timm model (``num_classes=0``) exposing ``num_features``.
        tasks: task names; each head's width comes from the schema.
        dropout: dropout before the heads.
    """

    def __init__(self, trunk: nn.Module, tasks: Sequence[str], dropout: float = 0.2) -> None:
        super().__init__()
        self.trunk = trunk
        self.tasks = tuple(tasks)
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict(
            {t: nn.Linear(trunk.num_features, TASKS[t].num_classes) for t in self.tasks}
        )
        #: per-head softmax temperature fitted on validation data (1 = uncalibrated);
        #: stored in config.json, applied by :meth:`probabilities` only.
        self.temperatures: dict[str, float] = {t: 1.0 for t in self.tasks}
        #: the model training started from, when it answers some heads (:meth:`keep`); else None
        self.kept: MultiTaskNet | None = None
        self.kept_tasks: tuple[str, ...] = ()
        #: the person-relative expression classifier on this trunk (facemt.relative), set by fit; else None
        self.relative: PersonRelative | None = None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        own = [t for t in self.tasks if t not in self.kept_tasks]
        features = self.dropout(self.trunk(x)) if own else None
        out = {t: self.heads[t](features) for t in own}
        if self.kept is not None:
            start = self.kept(x)
            out.update({t: start[t] for t in self.kept_tasks})
        return {t: out[t] for t in self.tasks}

    def keep(self, start: "MultiTaskNet", tasks: Sequence[str]) -> "MultiTaskNet":
        """Answer ``tasks`` with ``start`` (the model fine-tuning began from, carried whole): the heads
        where fine-tuning did not beat it, or that the training data does not label. Heads of ``start``
        this model lacks are added. Returns self.

        Raises:
            FacemtError: a task ``start`` has no head for.
        """
        missing = [t for t in tasks if t not in start.tasks]
        if missing:
            raise FacemtError(f"cannot keep {', '.join(missing)}: the start model has no such head")
        start.eval()
        added = [t for t in tasks if t not in self.tasks]
        for t in added:  # one head per task in every run: a copy of the start's (what --init-from RUN copies)
            self.heads[t] = copy.deepcopy(start.heads[t])
        self.tasks = select_tasks(set(self.tasks) | set(tasks))
        self.kept, self.kept_tasks = start, tuple(t for t in self.tasks if t in tasks)
        self.temperatures.update({t: start.temperatures.get(t, 1.0) for t in self.kept_tasks})
        return self

    def network_of(self, task: str) -> "MultiTaskNet":
        """The network whose own trunk and head answer ``task`` (this one, or a kept start model)."""
        if task in self.kept_tasks and self.kept is not None:
            return self.kept.network_of(task)
        return self

    def probabilities(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Calibrated class probabilities per head: softmax(logits / temperature)."""
        return {t: torch.softmax(v.float() / self.temperatures.get(t, 1.0), dim=1) for t, v in self(x).items()}


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_on_disk(backbone: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(backbone)
        hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
        if not hub_id:
            return False
        return any(
            isinstance(try_to_load_from_cache(hub_id, name, cache_dir=os.environ.get("HF_HUB_CACHE")), str)
            for name in ("model.safetensors", "pytorch_model.bin")
        )
    except Exception:  # any hub/cache quirk just means "not known to be cached"
        return False


def check_backbone(backbone: str) -> None:
    """Raise FacemtError, naming close matches, unless timm knows ``backbone``."""
    if not timm.is_model(backbone):
        close = difflib.get_close_matches(backbone, timm.list_models(), n=5, cutoff=0.6)
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise FacemtError(f"unknown backbone {backbone!r}{hint}; see timm.list_models() for all names")


def create_trunk(
    backbone: str = DEFAULT_BACKBONE,
    pretrained: bool = False,
    pretrained_file: str | os.PathLike | None = None,
) -> nn.Module:
    """A headless timm model, optionally with ImageNet weights.

    Args:
        backbone: any timm model name.
        pretrained: download weights from the model hub (fails fast offline).
        pretrained_file: load weights from a local file instead of the hub.

    Raises:
        FacemtError: unknown backbone, missing/bad weights file, hub unreachable.
    """
    check_backbone(backbone)
    if pretrained_file is not None:
        path = Path(pretrained_file)
        if not path.is_file():
            raise FacemtError(f"{path}: pretrained weights file not found")
        try:
            return timm.create_model(
                backbone, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path.resolve())}
            )
        except Exception as exc:  # timm raises many types for a wrong file
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise FacemtError(f"{path}: cannot load as {backbone} weights ({first})") from None
    if pretrained:
        if not _cached_on_disk(backbone) and not _hub_reachable():
            raise FacemtError(f"cannot download {backbone} weights: the model hub is unreachable; {PRETRAINED_HELP}")
        try:
            return timm.create_model(backbone, pretrained=True, num_classes=0)
        except Exception as exc:
            raise FacemtError(f"downloading {backbone} weights failed ({type(exc).__name__}); {PRETRAINED_HELP}") from None
    return timm.create_model(backbone, pretrained=False, num_classes=0)


def create_model(
    backbone: str = DEFAULT_BACKBONE,
    tasks: Sequence[str] | None = None,
    pretrained: bool = False,
    pretrained_file: str | os.PathLike | None = None,
    image_size: int | None = None,
    dropout: float = 0.2,
    crop: CropPolicy | None = None,
) -> tuple[MultiTaskNet, PreprocessConfig]:
    """Build the multi-task network and resolve its preprocessing once.

    Returns:
        the model and the :class:`PreprocessConfig` that belongs to it.
    """
    trunk = create_trunk(backbone, pretrained, pretrained_file)
    data_config = timm.data.resolve_model_data_config(trunk)
    model = MultiTaskNet(trunk, select_tasks(tasks), dropout=dropout)
    return model, resolve_preprocess(data_config, image_size, crop)


#: ONNX opset of exported graphs (the ONNX engines and `facemt export`).
OPSET = 17


class Graph(nn.Module):
    """The network with a fixed output order (the heads in schema order) and,
    by default, calibrated softmax probabilities instead of logits."""

    def __init__(self, model: MultiTaskNet, probabilities: bool = True) -> None:
        super().__init__()
        self.model, self.tasks, self.probabilities = model, model.tasks, probabilities

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model.probabilities(image) if self.probabilities else self.model(image)
        return tuple(out[t] for t in self.tasks)


def write_onnx(model: MultiTaskNet, image_size: int, target: str | os.PathLike | io.BytesIO,
               probabilities: bool = True) -> None:
    """Export ``model`` as ONNX: input ``image`` (N x 3 x S x S), one output per head, any batch size."""
    graph = Graph(model.cpu().eval(), probabilities).eval()
    dummy = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    tasks = list(model.tasks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, (dummy,), target, input_names=["image"], output_names=tasks,
                          dynamic_axes={"image": {0: "batch"}, **{t: {0: "batch"} for t in tasks}},
                          opset_version=OPSET, dynamo=False)
