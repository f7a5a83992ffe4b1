"""Synthetic FACES-format portraits, for demos and tests.

These are drawings, not photographs: age group shows in hair colour and
wrinkles, gender in hair length and beard, expression in mouth, eyebrows and
eye opening. Each person keeps identity features (skin tone, face shape, eye
spacing, nose, hair shade) across pictures; pose, lighting and background vary
per picture. File names follow FACES exactly (``004_o_m_a_a.jpg``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from facemt.errors import FacemtError
from facemt.tasks import TASKS

# Eyebrow inner-end lift, eye opening, mouth curve, mouth opening per expression.
_EXPRESSION_SHAPE = {
    "anger": dict(brow=-0.9, eye=0.55, curve=-0.15, open=0.25, teeth=True),
    "disgust": dict(brow=-0.5, eye=0.45, curve=-0.35, open=0.15, teeth=False, nose_wrinkle=True, lip_raise=True),
    "fear": dict(brow=0.9, eye=1.45, curve=-0.1, open=0.9, teeth=False, brow_raise=0.5),
    "happiness": dict(brow=0.1, eye=0.75, curve=0.9, open=0.45, teeth=True),
    "neutrality": dict(brow=0.0, eye=1.0, curve=0.0, open=0.0, teeth=False),
    "sadness": dict(brow=0.8, eye=0.8, curve=-0.85, open=0.0, teeth=False),
}
_HAIR_BY_AGE = {
    "young": [(40, 25, 15), (75, 45, 20), (20, 15, 10), (150, 110, 50)],
    "middle": [(110, 100, 90), (95, 85, 80), (125, 115, 100)],
    "old": [(225, 225, 225), (200, 200, 205), (240, 238, 232)],
}
_WRINKLES_BY_AGE = {"young": 0, "middle": 2, "old": 4}


@dataclass(frozen=True)
class Person:
    """Identity features that stay fixed across a person's pictures."""

    pid: int
    age_group: str
    gender: str
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    face_w: float
    face_h: float
    eye_gap: float
    nose_len: float
    beard: bool
    clothes: tuple[int, int, int]


def make_person(pid: int, age_group: str, gender: str, rng: np.random.Generator) -> Person:
    base = np.array([[235, 200, 170], [200, 150, 110], [150, 100, 70], [225, 185, 150]][rng.integers(4)])
    skin = tuple(int(c) for c in np.clip(base + rng.integers(-15, 16, 3), 0, 255))
    palette = _HAIR_BY_AGE[age_group]
    hair = tuple(int(c) for c in np.clip(np.array(palette[rng.integers(len(palette))]) + rng.integers(-10, 11, 3), 0, 255))
    return Person(
        pid=pid,
        age_group=age_group,
        gender=gender,
        skin=skin,
        hair=hair,
        face_w=float(rng.uniform(0.25, 0.29)),
        face_h=float(rng.uniform(0.31, 0.35)),
        eye_gap=float(rng.uniform(0.1, 0.12)),
        nose_len=float(rng.uniform(0.08, 0.11)),
        beard=bool(gender == "male" and rng.random() < 0.6),
        clothes=tuple(int(c) for c in rng.integers(30, 220, 3)),
    )


def draw_face(person: Person, expression: str, rng: np.random.Generator, size: tuple[int, int] = (240, 300)) -> Image.Image:
    """One portrait of ``person`` showing ``expression``, with random pose and lighting."""
    W, H = size
    s = min(W, H / 1.25)  # unit length
    shape = _EXPRESSION_SHAPE[expression]

    bg = rng.integers(60, 230, 3)
    grad = np.linspace(0.8, 1.15, H)[:, None, None] * bg[None, None, :]
    background = Image.fromarray(np.clip(np.broadcast_to(grad, (H, W, 3)), 0, 255).astype(np.uint8))

    layer = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    cx, cy = W / 2, H * 0.45
    fw, fh = person.face_w * s, person.face_h * s
    lw = max(1, round(s * 0.015))

    def ell(x0, y0, x1, y1, fill, outline=None, width=1):
        d.ellipse([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], fill=fill, outline=outline, width=width)

    # shoulders and neck
    ell(cx - 0.45 * s, H * 0.82, cx + 0.45 * s, H * 1.25, person.clothes)
    d.rectangle([cx - fw * 0.4, cy + fh * 0.6, cx + fw * 0.4, H * 0.88], fill=person.skin)
    # long hair behind the head (female)
    if person.gender == "female":
        d.rounded_rectangle([cx - fw * 1.3, cy - fh * 1.15, cx + fw * 1.3, cy + fh * 1.6], radius=fw * 0.6, fill=person.hair)
    # head
    ell(cx - fw, cy - fh, cx + fw, cy + fh, person.skin)
    # hair cap
    d.chord([cx - fw * 1.08, cy - fh * 1.15, cx + fw * 1.08, cy + fh * 0.55], 180, 360, fill=person.hair)
    # beard or stubble
    if person.gender == "male":
        beard = tuple(int(c * 0.8) for c in person.hair) if person.beard else tuple(int(c * 0.85) for c in person.skin)
        d.chord([cx - fw * 0.98, cy - fh * 0.6, cx + fw * 0.98, cy + fh * 1.02], 20, 160, fill=beard)
    line = (60, 40, 30)
    wr = tuple(int(c * 0.7) for c in person.skin)
    # forehead wrinkles grow with age
    for k in range(_WRINKLES_BY_AGE[person.age_group]):
        y = cy - fh * (0.32 + 0.07 * k)
        d.arc([cx - fw * 0.5, y - fh * 0.05, cx + fw * 0.5, y + fh * 0.05], 200, 340, fill=wr, width=lw)
    # eyes
    ey = cy - fh * 0.1 + (fh * 0.03 if expression == "sadness" else 0)
    eye_w, eye_h = fw * 0.2, fh * 0.075 * shape["eye"]
    for side in (-1, 1):
        ex = cx + side * person.eye_gap * s
        ell(ex - eye_w, ey - eye_h, ex + eye_w, ey + eye_h, (250, 250, 250), outline=line, width=lw)
        pr = min(eye_h, eye_w) * 0.75
        ell(ex - pr, ey - pr, ex + pr, ey + pr, (40, 30, 20))
        if _WRINKLES_BY_AGE[person.age_group] >= 4:  # crow's feet
            for k in (-1, 0, 1):
                d.line([ex + side * eye_w * 1.15, ey + k * eye_h * 0.6, ex + side * eye_w * 1.6, ey + k * eye_h * 1.2], fill=wr, width=lw)
        # eyebrows: inner end lifted (+) or lowered (-)
        by = ey - fh * (0.17 + 0.1 * shape.get("brow_raise", 0.0))
        inner, outer = ex - side * eye_w * 1.1, ex + side * eye_w * 1.2
        lift = shape["brow"] * fh * 0.12
        d.line([inner, by - lift, outer, by + lift * 0.3], fill=tuple(int(c * 0.6) for c in person.hair), width=max(2, lw * 2))
    # nose
    ny = ey + person.nose_len * s
    d.line([cx, ey + fh * 0.08, cx - fw * 0.06, ny], fill=wr, width=lw)
    d.line([cx - fw * 0.06, ny, cx + fw * 0.08, ny], fill=wr, width=lw)
    if shape.get("nose_wrinkle"):
        for side in (-1, 1):
            d.line([cx + side * fw * 0.05, ey + fh * 0.05, cx + side * fw * 0.15, ey + fh * 0.12], fill=wr, width=lw)
    if _WRINKLES_BY_AGE[person.age_group] >= 2:  # nasolabial folds
        for side in (-1, 1):
            d.line([cx + side * fw * 0.2, ny, cx + side * fw * 0.38, ny + fh * 0.25], fill=wr, width=lw)
    # mouth: curve > 0 smiles, < 0 frowns; open > 0 shows an opening
    my = ny + fh * 0.28
    mw = fw * (0.45 + 0.12 * abs(shape["curve"]))
    curve = shape["curve"] * fh * 0.18
    opening = shape["open"] * fh * 0.2
    lip = (150, 50, 50)
    if opening > 0:
        top = my - opening / 2 - (fh * 0.05 if shape.get("lip_raise") else 0)
        ell(cx - mw * 0.8, top, cx + mw * 0.8, my + opening / 2 + max(0.0, curve) * 0.5, (70, 20, 20), outline=lip, width=lw)
        if shape["teeth"]:
            d.rectangle([cx - mw * 0.55, top + 1, cx + mw * 0.55, top + max(2, opening * 0.35)], fill=(245, 245, 240))
    pts = [(cx + mw * t, my - curve * (1 - 4 * t * t) + curve) for t in np.linspace(-0.5, 0.5, 9)]
    if shape.get("lip_raise"):
        pts = [(x, y - (fh * 0.05 if x > cx else 0)) for x, y in pts]
    d.line(pts, fill=lip, width=max(2, lw * 3))

    angle = float(rng.uniform(-10, 10))
    shift = (int(rng.uniform(-0.06, 0.06) * W), int(rng.uniform(-0.04, 0.04) * H))
    layer = layer.rotate(angle, resample=Image.BICUBIC, center=(cx, cy), translate=shift)
    image = Image.alpha_composite(background.convert("RGBA"), layer).convert("RGB")
    # lighting: overall gain plus a left-right gradient
    gain = rng.uniform(0.75, 1.2)
    side = np.linspace(1 - rng.uniform(-0.2, 0.2), 1 + rng.uniform(-0.2, 0.2), W)[None, :, None]
    arr = np.asarray(image, dtype=np.float32) * gain * side
    arr += rng.normal(0, 4, arr.shape)
    image = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if min(W, H) >= 64:
        image = image.filter(ImageFilter.GaussianBlur(radius=s * 0.003))
    return image


def check_args(out_dir: str | os.PathLike, persons: int, size: tuple[int, int]) -> None:
    """Raise FacemtError on arguments :func:`generate` cannot honour."""
    if persons < 1 or persons > 999:
        raise FacemtError("--persons must be between 1 and 999")
    if min(size) < 32:
        raise FacemtError("--width and --height must be at least 32 pixels")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise FacemtError(f"{out_dir}: exists and is not a folder")


def generate(
    out_dir: str | os.PathLike,
    persons: int = 12,
    size: tuple[int, int] = (240, 300),
    seed: int = 0,
    sets: str = "ab",
    progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Write ``persons x 6 expressions x len(sets)`` FACES-named JPEGs into ``out_dir``.

    Persons cycle through the 6 age-group x gender combinations, so 12 persons
    give 2 of each.

    Returns:
        the written paths.

    Raises:
        FacemtError: bad arguments, or ``out_dir`` is a file.
    """
    check_args(out_dir, persons, size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ages, genders, expressions = (TASKS[t] for t in ("age_group", "gender", "expression"))
    combos = [(a, g) for a in range(ages.num_classes) for g in range(genders.num_classes)]
    total = persons * expressions.num_classes * len(sets)
    written: list[Path] = []
    for p in range(persons):
        a, g = combos[p % len(combos)]
        person = make_person(p + 1, ages.classes[a], genders.classes[g], rng)
        for e, expression in enumerate(expressions.classes):
            for picture_set in sets:
                name = f"{p + 1:03d}_{ages.codes[a]}_{genders.codes[g]}_{expressions.codes[e]}_{picture_set}.jpg"
                path = out / name
                draw_face(person, expression, rng, size).save(path, quality=92)
                written.append(path)
                if progress:
                    progress(len(written), total)
    return written


__all__ = ["Person", "draw_face", "generate", "make_person"]
