"""Run configuration and the names of its choices: plain dataclasses and
constants, importable without torch (the CLI builds its options from them).

Checks that need heavy modules (is the backbone a timm model, where do the
initial weights come from) live with the code that uses them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from facemt.errors import FacemtError

log = logging.getLogger(__name__)

#: The built-in base model's backbone: fine-tuning starts from it by default.
DEFAULT_BACKBONE = "mobilenetv2_100"
#: Input side when neither the configuration nor the initialising model names one.
DEFAULT_IMAGE_SIZE = 128
#: Backbone learning rate / head learning rate when fine-tuning a facemt model.
FINE_TUNE_BACKBONE_LR_SCALE = 0.1
#: Mixup's Beta parameter when fine-tuning a facemt model (benchmarks/RESULTS.md, "Fine-tuning study").
FINE_TUNE_MIXUP = 0.2
#: Softmax temperature of the start model's answers that ``distill`` holds a fine-tuned model to.
DISTILL_TEMPERATURE = 2.0
#: Name of the built-in base model wherever a model is named.
BASE_NAME = "base"
CROP_POLICIES = ("align", "box", "none")
AUGMENT_PRESETS = ("none", "light", "heavy")
LOSS_WEIGHTINGS = ("fixed", "uncertainty")
#: fit --person-relative: use the person-relative expression classifier when validation says so, always, never
PERSON_RELATIVE = ("auto", "on", "off")
#: where ``facemt predict --person-from`` reads each picture's person (facemt.data.person_of)
PERSON_FROM = ("name", "folder")
#: the class priors a run's probabilities can follow (``facemt predict --prior``)
PRIORS = ("balanced", "training")


@dataclass(frozen=True)
class CropPolicy:
    """How a picture becomes the face image the network sees.

    Attributes:
        mode: ``align``, ``box`` or ``none`` (see the module docstring).
        margin: ``box`` only: the detector box grows by this fraction of its
            size on every side before it is squared.
        eye_y: ``align`` only: height of the eye centres, as a fraction of the
            network input's side from its top.
        eye_distance: ``align`` only: distance between the eye centres, as a
            fraction of the network input's side.
    """

    mode: str = "align"
    margin: float = 0.4
    eye_y: float = 0.40
    eye_distance: float = 0.30

    def __post_init__(self) -> None:
        if self.mode not in CROP_POLICIES:
            raise FacemtError(f"unknown crop policy {self.mode!r}: choose from {', '.join(CROP_POLICIES)}")
        if not 0.0 <= self.margin <= 2.0:
            raise FacemtError(f"crop margin must be between 0 and 2 (got {self.margin})")
        if not (0.05 <= self.eye_distance <= 0.9 and 0.05 <= self.eye_y <= 0.95):
            raise FacemtError("eye_distance must be in [0.05, 0.9] and eye_y in [0.05, 0.95]")

    @property
    def detects(self) -> bool:
        return self.mode != "none"


@dataclass
class TrainConfig:
    """Everything that defines a training run; written into every checkpoint.

    ``tasks=None`` trains every task that the data has labels for.
    ``backbone_lr_scale=None`` is 0.1 when training starts from a facemt model
    (the base model by default) and 1.0 otherwise: fine-tuning the base on 72
    faces with a tenth of the rate for the backbone measured better for age
    group and gender (benchmarks/RESULTS.md). ``layer_decay`` other than 1
    gives each backbone block its own rate: the last block trains at
    ``lr * backbone_lr_scale``, each block before it at ``layer_decay`` times
    the rate of the block after it (below 1: blocks nearer the input slower).
    ``keep_start`` (fit only): heads where fine-tuning does not beat the start
    model on the validation persons, and heads the data does not label, are
    answered by the start model, carried whole in the run (never worse than the start).
    ``mixup`` / ``cutmix`` > 0 train on pairs of faces blended whole / one
    pasted into a box of the other, the mixing share drawn from Beta(a, a)
    with that ``a`` (both > 0: one or the other per batch); ``mixup=None`` is
    0.2 when training starts from a facemt model and 0 (off) otherwise: it
    raised fine-tuned expression accuracy on three of the four studio sets
    of the study and lowered none.
    ``distill`` > 0 (fine-tuning only) holds the fine-tuned heads to the
    start model's answers: on every training face (as augmented and mixed)
    the frozen start model answers too, and the loss adds ``distill`` times
    :data:`DISTILL_TEMPERATURE` squared times KL(start || model) at that
    temperature, summed over the heads both have (learning without
    forgetting: Li & Hoiem 2017).
    ``freeze_norm`` keeps the batch-normalisation statistics (running means
    and variances) as the initial weights have them: training batches
    (augmented, mixed, a few persons) no longer re-estimate them; the
    layers' scales and shifts still train.
    ``refit`` (``fit`` only): after validation has chosen the epoch and the
    never-worse rule the heads, train again on every face, the validation
    persons too, for that many epochs; the saved model is that one, with the
    validated run's choices and temperatures.
    ``person_relative`` (``fit`` only): also fit the person-relative expression
    classifier (:mod:`facemt.relative`: expression read from how a face differs
    from the same person's other pictures) and use it when pictures come grouped
    by person: ``auto`` when it beats the network's expression head on the
    validation persons, ``on`` always, ``off`` never.
    ``validation_groups`` (``fit`` only) above 1: the never-worse rule and the
    person-relative step decide on that many disjoint groups of held-out persons
    instead of one: fit trains again once per extra group (that group held out,
    fit's own validation persons trained on) and pools the groups' validation
    answers; the saved model is still the one trained without fit's own
    validation persons (costs a training per extra group).
    """

    backbone: str = DEFAULT_BACKBONE
    tasks: tuple[str, ...] | None = None
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3
    backbone_lr_scale: float | None = None
    layer_decay: float = 1.0
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    head_warmup_epochs: float = 0.0
    image_size: int | None = None
    seed: int = 0
    augment: str = "heavy"
    loss_weights: dict[str, float] = field(default_factory=dict)
    loss_weighting: str = "fixed"
    balance_sources: bool = False
    balance_classes: bool = False
    init_from: str | None = "base"
    keep_start: bool = True
    label_smoothing: float = 0.0
    jitter_consistency: float = 0.0
    mixup: float | None = None
    cutmix: float = 0.0
    distill: float = 0.0
    freeze_norm: bool = False
    refit: bool = False
    person_relative: str = "auto"
    validation_groups: int = 1
    dropout: float = 0.2
    val_fraction: float = 0.2
    crop: str = "align"
    crop_margin: float = 0.4
    pretrained: bool = False
    pretrained_file: str | None = None
    device: str = "auto"

    def validate(self) -> None:
        """Raise FacemtError on values that cannot train; the message names the
        field (the CLI shows the matching ``--option``)."""
        if self.epochs < 1:
            raise FacemtError("epochs must be at least 1")
        if self.batch_size < 1:
            raise FacemtError("batch_size must be at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FacemtError("lr must be a positive number")
        if self.backbone_lr_scale is not None and not 0.0 < self.backbone_lr_scale <= 10.0:
            raise FacemtError("backbone_lr_scale must be in (0, 10]")
        if not 0.0 < self.layer_decay <= 10.0:
            raise FacemtError("layer_decay must be in (0, 10]")
        if not 0.0 <= self.head_warmup_epochs < self.epochs:
            raise FacemtError("head_warmup_epochs must be at least 0 and less than epochs")
        if self.image_size is not None and not 16 <= self.image_size <= 1024:
            raise FacemtError("image_size must be between 16 and 1024")
        if not 0.0 <= self.val_fraction < 1.0:
            raise FacemtError("val_fraction must be in [0, 1)")
        if self.refit and self.val_fraction == 0.0:
            raise FacemtError("refit trains again on the validation persons: it needs val_fraction above 0")
        if self.person_relative not in PERSON_RELATIVE:
            raise FacemtError(f"person_relative must be one of {', '.join(PERSON_RELATIVE)}")
        if not 1 <= self.validation_groups <= 10:
            raise FacemtError("validation_groups must be between 1 and 10")
        if self.validation_groups > 1 and self.val_fraction == 0.0:
            raise FacemtError("validation_groups above 1 holds out more persons: it needs val_fraction above 0")
        if not 0.0 <= self.dropout < 1.0:
            raise FacemtError("dropout must be in [0, 1)")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise FacemtError("label_smoothing must be in [0, 1)")
        if not (0.0 <= self.jitter_consistency and math.isfinite(self.jitter_consistency)):
            raise FacemtError("jitter_consistency must be at least 0")
        if not (0.0 <= self.distill <= 100.0):
            raise FacemtError("distill must be in [0, 100] (0: off)")
        for name in ("mixup", "cutmix"):
            if getattr(self, name) is not None and not (0.0 <= getattr(self, name) <= 10.0):
                raise FacemtError(f"{name} must be in [0, 10] (0: off)")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise FacemtError("weight_decay must be at least 0")
        if not self.warmup_epochs >= 0:
            raise FacemtError("warmup_epochs must be at least 0")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise FacemtError(f"device must be auto, cpu or cuda (got {self.device!r})")
        if self.augment not in AUGMENT_PRESETS:
            raise FacemtError(f"augment must be one of {', '.join(AUGMENT_PRESETS)}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise FacemtError("loss_weighting must be fixed or uncertainty")
        if self.init_from not in (None, BASE_NAME) and (self.pretrained or self.pretrained_file):
            raise FacemtError("init_from already gives the backbone its weights: drop pretrained/pretrained_file")
        self.crop_policy  # raises on a bad policy or margin
        if self.pretrained and self.pretrained_file:
            raise FacemtError("give either pretrained or pretrained_file, not both")

    @property
    def crop_policy(self) -> CropPolicy:
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
        known.setdefault("mixup", 0.0)  # written before mixup existed: trained without it
        return cls(**known)
