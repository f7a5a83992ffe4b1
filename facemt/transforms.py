"""Preprocessing: the one resize/normalise config and the albumentations pipelines.

The same :class:`PreprocessConfig` is resolved once from the backbone's timm
``pretrained_cfg``, stored in the checkpoint and used by training, evaluation
and prediction alike.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image

from facemt import faces
from facemt.config import AUGMENT_PRESETS
from facemt.errors import FacemtError
from facemt.faces import CropPolicy, Face

if TYPE_CHECKING:  # prediction on ONNX Runtime uses the arrays and never imports PyTorch
    import torch


_CV2_INTERPOLATION = {"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC, "nearest": cv2.INTER_NEAREST}


@dataclass(frozen=True)
class PreprocessConfig:
    """How an RGB image becomes the network's input tensor.

    Attributes:
        image_size: side of the square network input.
        crop_pct: fraction of the shorter side kept by the centre crop.
        interpolation: resize filter name (``bilinear`` or ``bicubic``).
        mean, std: per-channel normalisation in 0-1 units.
        crop: the crop policy, ``align``, ``box`` or ``none``
            (:mod:`facemt.faces`); with ``align`` the eye centres sit at
            (0.5, ``eye_y``) and ``eye_distance`` apart, in fractions of the
            network input's side.
        crop_margin: ``box`` policy: the detector's box grows by this fraction
            of its size on every side, then is squared.
    """

    image_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop: str = "none"
    crop_margin: float = 0.4
    eye_y: float = 0.40
    eye_distance: float = 0.30

    def __post_init__(self) -> None:
        self.policy  # validates the crop fields

    @property
    def policy(self) -> CropPolicy:
        """The crop policy as the faces module takes it."""
        return CropPolicy(self.crop, self.crop_margin, self.eye_y, self.eye_distance)

    @property
    def working_side(self) -> int:
        """Shorter side that images are decoded to once and cached at."""
        return int(math.floor(self.image_size / self.crop_pct))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessConfig":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        if "crop" not in known and "detect" in data:  # format 1 stored a detect flag
            known["crop"] = "box" if data["detect"] else "none"
        for key in ("mean", "std"):
            if key in known:
                known[key] = tuple(float(x) for x in known[key])
        return cls(**known)


def resolve_preprocess(
    data_config: dict[str, Any], image_size: int | None = None, crop: CropPolicy | None = None
) -> PreprocessConfig:
    """Build the config from timm's ``resolve_model_data_config`` output.

    Args:
        data_config: dict with ``input_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std``.
        image_size: overrides the backbone's default input size.
        crop: the crop policy (default: ``none``).
    """
    crop = crop or CropPolicy("none")
    interpolation = data_config.get("interpolation", "bicubic")
    return PreprocessConfig(
        image_size=int(image_size or data_config["input_size"][-1]),
        crop_pct=float(data_config.get("crop_pct", 0.875)),
        interpolation=interpolation if interpolation in _CV2_INTERPOLATION else "bicubic",
        mean=tuple(float(x) for x in data_config["mean"]),
        std=tuple(float(x) for x in data_config["std"]),
        crop=crop.mode,
        crop_margin=crop.margin,
        eye_y=crop.eye_y,
        eye_distance=crop.eye_distance,
    )


def shrink(image: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """Resize to the cached working size (see :func:`facemt.faces.shrink`)."""
    return faces.shrink(image, cfg.working_side)


def face_images(image: Image.Image, cfg: PreprocessConfig, **options: Any) -> list[tuple[Face | None, np.ndarray]]:
    """The faces of a picture framed by ``cfg``'s crop policy, at the cached
    working size: :func:`facemt.faces.extract_faces` with this config's sizes."""
    return faces.extract_faces(image, cfg.policy, cfg.working_side, cfg.image_size, **options)


def build_transform(
    cfg: PreprocessConfig, augment: str = "none", seed: int | None = None
) -> "Pipeline | EvalPipeline":
    """The pipeline from a cached HxWx3 uint8 image to a normalised CHW float tensor.

    Args:
        cfg: the model's preprocessing.
        augment: ``none`` (evaluation), ``light`` or ``heavy`` (geometric +
            photometric + occlusion).
        seed: seeds albumentations' own random state, for reproducible runs.
    """
    if augment not in AUGMENT_PRESETS:
        raise FacemtError(f"unknown augmentation {augment!r}: choose from {', '.join(AUGMENT_PRESETS)}")
    if augment == "none":
        return EvalPipeline(cfg)
    import albumentations as A  # training only: prediction does not pay for importing it

    size = cfg.image_size
    interp = _CV2_INTERPOLATION[cfg.interpolation]
    if augment == "light":
        steps = [
            A.SmallestMaxSize(max_size=cfg.working_side, interpolation=interp),
            A.RandomResizedCrop((size, size), scale=(0.7, 1.0), ratio=(0.9, 1.1), interpolation=interp),
            A.HorizontalFlip(p=0.5),
            A.RandomBrightnessContrast(0.15, 0.15, p=0.5),
        ]
    else:
        steps = [
            A.SmallestMaxSize(max_size=cfg.working_side, interpolation=interp),
            A.Affine(scale=(0.9, 1.1), rotate=(-15, 15), translate_percent=(-0.06, 0.06), p=0.7),
            A.RandomResizedCrop((size, size), scale=(0.6, 1.0), ratio=(0.85, 1.15), interpolation=interp),
            A.HorizontalFlip(p=0.5),
            A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03, p=0.8),
            A.ToGray(p=0.1),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.GaussNoise(std_range=(0.02, 0.08))], p=0.3),
            A.CoarseDropout(
                num_holes_range=(1, 3),
                hole_height_range=(0.08, 0.25),
                hole_width_range=(0.08, 0.25),
                p=0.5,
            ),
        ]
    return Pipeline(A.Compose(steps + [A.Normalize(mean=cfg.mean, std=cfg.std, max_pixel_value=255.0)], seed=seed))


class EvalPipeline:
    """Evaluation preprocessing without augmentation: shortest side to the
    working size, centre crop to the input size, normalise; a CHW float
    tensor. The same arithmetic as albumentations' ``SmallestMaxSize``,
    ``CenterCrop`` and ``Normalize`` (tested equal), without importing it,
    so prediction starts faster."""

    def __init__(self, cfg: PreprocessConfig) -> None:
        self.cfg = cfg
        self.interpolation = _CV2_INTERPOLATION[cfg.interpolation]
        self.mean = np.asarray(cfg.mean, dtype=np.float32) * 255.0
        self.scale = np.reciprocal(np.asarray(cfg.std, dtype=np.float32) * 255.0)

    def __call__(self, image: np.ndarray, seed: int | None = None) -> "torch.Tensor":
        import torch

        return torch.from_numpy(self.array(image))

    def array(self, image: np.ndarray) -> np.ndarray:
        """The network input of one cached image: a CHW float32 array."""
        out = (self.image(image).astype(np.float32) - self.mean) * self.scale
        return np.ascontiguousarray(out.transpose(2, 0, 1))

    def _geometry(self, image: np.ndarray) -> tuple[float, tuple[int, int], int, int]:
        h, w = image.shape[:2]
        factor = self.cfg.working_side / min(h, w)
        size = (max(1, round(h * factor)), max(1, round(w * factor)))
        crop = self.cfg.image_size  # <= working_side, which the shorter side now has
        return factor, size, (size[0] - crop) // 2, (size[1] - crop) // 2

    def image(self, image: np.ndarray) -> np.ndarray:
        """The network input as the HxWx3 uint8 picture it is made from (resized, centre-cropped)."""
        _, size, top, left = self._geometry(image)
        if size != image.shape[:2]:
            image = cv2.resize(image, (size[1], size[0]), interpolation=self.interpolation)
        crop = self.cfg.image_size
        return image[top:top + crop, left:left + crop]

    def input_to_image(self, image: np.ndarray) -> np.ndarray:
        """3x3 affine from network-input pixels back to the pixels of the cached ``image``."""
        _, size, top, left = self._geometry(image)
        fy, fx = size[0] / image.shape[0], size[1] / image.shape[1]
        # pixel centres: cv2.resize takes x to (x + 0.5) * f - 0.5, the crop then drops ``left``
        return np.array([[1 / fx, 0, (left + 0.5) / fx - 0.5], [0, 1 / fy, (top + 0.5) / fy - 0.5], [0, 0, 1]])


class Pipeline:
    """An albumentations pipeline ending in a CHW float tensor.

    Calling it with ``seed`` reseeds the augmentation randomness first, so one
    image's augmentation is reproducible on its own.
    """

    def __init__(self, compose) -> None:
        self.compose = compose

    def __call__(self, image: np.ndarray, seed: int | None = None) -> "torch.Tensor":
        import torch

        if seed is not None:
            self.compose.set_random_seed(seed)
        out = self.compose(image=image)["image"]
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))
