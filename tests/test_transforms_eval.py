"""The evaluation pipeline (no albumentations import) computes what albumentations computes."""

import albumentations as A
import numpy as np
import pytest
import torch

from facemt.transforms import PreprocessConfig, build_transform


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("shape", [(32, 32), (48, 60), (61, 47), (200, 200), (113, 300), (97, 97), (49, 54), (103, 1000)])
def test_eval_pipeline_equals_albumentations(shape, interpolation):
    cfg = PreprocessConfig(image_size=32, interpolation=interpolation, crop_pct=0.875 if shape[0] % 2 else 1.0)
    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    reference = A.Compose([A.SmallestMaxSize(max_size=cfg.working_side, interpolation=build_transform(cfg).interpolation),
                           A.CenterCrop(cfg.image_size, cfg.image_size),
                           A.Normalize(mean=cfg.mean, std=cfg.std, max_pixel_value=255.0)])
    expected = torch.from_numpy(reference(image=image)["image"].transpose(2, 0, 1).copy())
    got = build_transform(cfg, "none")(image)
    assert got.shape == (3, 32, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_prediction_does_not_import_albumentations():
    import subprocess
    import sys

    code = ("import sys, facemt; p = facemt.load(); p.predict(__import__('numpy').zeros((64, 64, 3), 'uint8')); "
            "print('albumentations' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
