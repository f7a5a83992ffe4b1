"""Run configuration and the names of its choices: plain dataclasses and
constants, importable without torch (the CLI builds its options from them).

Heavy checks (the backbone name, the crop policy, the initial weights) import
what they need only when called.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from facemt.errors import FacemtError

if TYPE_CHECKING:
    from facemt.faces import CropPolicy

log = logging.getLogger(__name__)

#: The built-in base model's backbone: fine-tuning starts from it by default.
DEFAULT_BACKBONE = "mobilenetv2_100"
#: Input side when neither the configuration nor the initialising model names one.
DEFAULT_IMAGE_SIZE = 128
#: Name of the built-in base model wherever a model is named.
BASE_NAME = "base"
CROP_POLICIES = ("align", "box", "none")
AUGMENT_PRESETS = ("none", "light", "heavy")
LOSS_WEIGHTINGS = ("fixed", "uncertainty")


@dataclass
class TrainConfig:
    """Everything that defines a training run; written into every checkpoint.

    ``tasks=None`` trains every task that the data has labels for.
    """

    backbone: str = DEFAULT_BACKBONE
    tasks: tuple[str, ...] | None = None
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr_scale: float = 1.0
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    image_size: int | None = None
    seed: int = 0
    augment: str = "heavy"
    loss_weights: dict[str, float] = field(default_factory=dict)
    loss_weighting: str = "fixed"
    balance_sources: bool = False
    balance_classes: bool = False
    init_from: str | None = "base"
    label_smoothing: float = 0.0
    dropout: float = 0.2
    val_fraction: float = 0.2
    crop: str = "align"
    crop_margin: float = 0.4
    pretrained: bool = False
    pretrained_file: str | None = None
    device: str = "auto"

    def validate(self) -> None:
        """Raise FacemtError on values that cannot train."""
        if self.epochs < 1:
            raise FacemtError("--epochs must be at least 1")
        if self.batch_size < 1:
            raise FacemtError("--batch-size must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FacemtError("--lr must be a positive number")
        if not 0.0 < self.backbone_lr_scale <= 10.0:
            raise FacemtError("--backbone-lr-scale must be in (0, 10]")
        if self.image_size is not None and not 16 <= self.image_size <= 1024:
            raise FacemtError("--image-size must be between 16 and 1024")
        if not 0.0 <= self.val_fraction < 1.0:
            raise FacemtError("--val-fraction must be in [0, 1)")
        if self.augment not in AUGMENT_PRESETS:
            raise FacemtError(f"--augment must be one of {', '.join(AUGMENT_PRESETS)}")
        from facemt.model import check_backbone  # timm: only when a config is checked

        check_backbone(self.backbone)
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise FacemtError("--loss-weighting must be fixed or uncertainty")
        if self.init_from not in (None, BASE_NAME) and (self.pretrained or self.pretrained_file):
            raise FacemtError("init_from already gives the backbone its weights: drop pretrained/pretrained_file")
        self.crop_policy  # raises on a bad policy or margin
        if self.pretrained and self.pretrained_file:
            raise FacemtError("give either --pretrained or --pretrained-file, not both")

    def initial_weights(self) -> str | None:
        """The run whose weights start training (the built-in base model's folder
        for ``init_from="base"`` when the backbone is the base's), or None when
        the backbone starts from ``pretrained``/``pretrained_file`` or at random."""
        from facemt.checkpoint import base_dir, read_config

        if self.pretrained or self.pretrained_file or not self.init_from:
            return None
        if self.init_from != BASE_NAME or (Path(self.init_from) / "config.json").is_file():
            return self.init_from
        try:
            base = read_config(base_dir())
        except FacemtError:
            log.warning("the built-in base model is missing: %s starts from random weights", self.backbone)
            return None
        return str(base_dir()) if base["backbone"] == self.backbone else None

    @property
    def crop_policy(self) -> "CropPolicy":
        from facemt.faces import CropPolicy

        return CropPolicy(self.crop, self.crop_margin)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tasks"] = list(self.tasks) if self.tasks else None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Rebuild a config written by :meth:`to_dict` (unknown keys are ignored)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if "crop" not in known and "detect" in data:  # written before crop policies existed
            known["crop"] = "box" if data["detect"] else "none"
        if known.get("tasks"):
            known["tasks"] = tuple(known["tasks"])
        return cls(**known)
