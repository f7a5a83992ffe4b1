"""The built-in base model: shipped in the package, loaded offline, used when no model is named."""

from __future__ import annotations

import json
import shutil

import matplotlib.cbook
import numpy as np
import pytest

import facemt
from facemt.checkpoint import base_dir, read_config
from facemt.cli import main
from facemt.errors import FacemtError

PHOTO = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)  # public domain


@pytest.fixture(scope="module")
def base():
    return facemt.load(device="cpu")


def test_the_base_model_is_in_the_package_with_its_card(base):
    assert base.run_dir == base_dir()
    assert (base_dir() / "MODEL_CARD.md").is_file()
    assert base.tasks == ("age_group", "gender", "expression")
    config = read_config(base_dir())
    assert config["preprocess"]["crop"] == "align" and config["float16_check"]["shipped"] in ("float16", "float32")
    assert set(config["calibration"]["temperature"]) == set(base.tasks)
    assert facemt.load("base", device="cpu").run_dir == base_dir()


def test_the_base_model_sha256_is_checked(tmp_path):
    copy = tmp_path / "base"
    shutil.copytree(base_dir(), copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(FacemtError, match="SHA-256"):
        facemt.load(copy, device="cpu", engine="torch")  # the shipped graph is checked too (test_fast_path.py)


def test_the_real_photo_gives_one_aligned_face_with_all_labels(base):
    result = base.predict(PHOTO)
    assert result.framing == "aligned" and result.face == 0 and len(result.landmarks) == 5
    assert result.gender in ("male", "female") and result.age_group and result.expression
    for task, probs in result.probabilities.items():
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)


def test_predict_without_a_model_uses_the_base_model(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["predict", PHOTO, "--json", "--device", "cpu"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["status"] == "ok" and row["framing"] == "aligned"
    assert {"age_group", "gender", "expression"} <= set(row)


def test_export_of_the_base_model_needs_an_out_file(capsys):
    assert main(["export", "--model", "base"]) == 2
    assert "--out" in capsys.readouterr().err


def test_fit_starts_from_the_base_model_by_default(faces_dir, tmp_path):
    run = tmp_path / "ft"
    assert main(["fit", "--data", str(faces_dir), "--out", str(run), "--epochs", "1", "--batch-size", "16",
                 "--device", "cpu", "--crop", "none"]) == 0
    config = read_config(run)
    assert config["train"]["init_from"] == "base" and config["backbone"] == read_config(base_dir())["backbone"]
    assert config["preprocess"]["image_size"] == read_config(base_dir())["preprocess"]["image_size"]
    # the base as it was, on the same validation images, is recorded next to the fine-tuned numbers
    from facemt.data import DataIndex, ImageCache, encode_targets, index_folder
    from facemt.engine import decode_images
    from facemt.splits import validation_split

    index = index_folder(faces_dir)
    val = DataIndex(index.table.iloc[validation_split(index.table, 0.2, 0)[1]].reset_index(drop=True), [])
    base = facemt.load(device="cpu")
    probs = base.probabilities(decode_images(val, base.preprocess, ImageCache(), None))
    targets = encode_targets(val.table, base.tasks)
    assert config["untouched"]["model"] == "base"
    assert config["untouched"]["val_accuracy"] == {t: pytest.approx(float((probs[t].argmax(1) == y).mean()))
                                                   for t, y in targets.items()}
    # and on every face fit was given (the never-worse rule's tie-break)
    probs = base.probabilities(decode_images(index, base.preprocess, ImageCache(), None))
    targets = encode_targets(index.table, base.tasks)
    assert config["untouched"]["all_faces_accuracy"] == {
        t: pytest.approx(float((probs[t].argmax(1) == y).mean())) for t, y in targets.items()}


def test_fit_from_other_weights_records_no_untouched_model(faces_dir, tmp_path):
    run = tmp_path / "scratch"
    assert main(["fit", "--data", str(faces_dir), "--out", str(run), "--epochs", "1", "--batch-size", "16",
                 "--image-size", "32", "--device", "cpu", "--crop", "none", "--no-pretrained"]) == 0
    assert "untouched" not in read_config(run)


def test_tta_averages_each_face_with_its_mirror_image(base):
    from facemt.inference import _frame, predict_images

    (_, face), = _frame(PHOTO, base.preprocess, largest_only=True, fallback=False)
    one = predict_images(base.model, [face], base.preprocess)
    mirrored = predict_images(base.model, [np.ascontiguousarray(face[:, ::-1])], base.preprocess)
    both = predict_images(base.model, [face], base.preprocess, tta=True)
    for task in base.tasks:
        assert not np.allclose(one[task], mirrored[task], atol=1e-4)  # the photo is not symmetric
        np.testing.assert_allclose(both[task], (one[task] + mirrored[task]) / 2, atol=1e-5)
    symmetric = np.concatenate([face[:, : face.shape[1] // 2], face[:, : face.shape[1] // 2][:, ::-1]], axis=1)
    plain, averaged = (predict_images(base.model, [symmetric], base.preprocess, tta=t) for t in (False, True))
    for task in base.tasks:
        np.testing.assert_allclose(averaged[task], plain[task], atol=1e-5)


def test_predict_and_evaluate_take_tta(capsys, tmp_path):
    assert main(["predict", PHOTO, "--json", "--device", "cpu"]) == 0
    (plain,) = json.loads(capsys.readouterr().out)
    assert main(["predict", PHOTO, "--json", "--device", "cpu", "--tta"]) == 0
    (tta,) = json.loads(capsys.readouterr().out)
    assert tta["gender"]["label"] in ("male", "female")
    assert tta["expression"]["probabilities"] != plain["expression"]["probabilities"]
    assert sum(tta["expression"]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert facemt.load(device="cpu", tta=True).tta
