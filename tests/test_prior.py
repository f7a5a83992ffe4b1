"""Predicting under another class prior: runs record their training class
counts, and ``prior`` moves probabilities between the balanced prior and the
training data's class frequencies."""

from __future__ import annotations

import json
import shutil

import matplotlib.cbook
import numpy as np
import pytest
import torch

import facemt
from facemt.checkpoint import base_dir, read_config, update_config
from facemt.cli import main
from facemt.config import TrainConfig
from facemt.data import encode_targets, index_folder
from facemt.engine import train
from facemt.errors import FacemtError
from facemt.inference import _frame, prior_weights
from facemt.losses import class_prior
from facemt.tasks import TASKS
from facemt.transforms import build_transform

PHOTO = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)  # public domain


def test_a_run_records_the_class_counts_of_its_training_rows(faces_dir, tmp_path):
    index = index_folder(faces_dir)
    rows = [i for i in range(len(index)) if i % 3 != 0]  # an uneven share of each class
    config = TrainConfig(epochs=1, image_size=32, batch_size=16, augment="none", device="cpu", crop="none",
                         pretrained=False)
    train(index, config, rows, [], out_dir=tmp_path / "run")
    counts = read_config(tmp_path / "run")["class_counts"]
    targets = encode_targets(index.table, list(counts))
    for task, c in counts.items():
        labels = targets[task][rows]
        assert c == np.bincount(labels[labels >= 0], minlength=len(c)).tolist()
    assert sum(counts["expression"]) == len(rows)


def test_prior_weights_move_between_the_balanced_and_the_training_prior():
    counts = {"gender": [30, 10], "expression": [5, 0, 5, 20, 60, 10]}
    balanced_run = {"train": {"balance_classes": True}, "class_counts": counts}
    plain_run = {"train": {"balance_classes": False}, "class_counts": counts}
    assert prior_weights(balanced_run, None) == {} and prior_weights(balanced_run, "balanced") == {}
    assert prior_weights(plain_run, "training") == {}
    to_training = prior_weights(balanced_run, "training")
    np.testing.assert_allclose(to_training["gender"], [31 / 42, 11 / 42])
    assert to_training["expression"][1] > 0  # an unseen class keeps a finite prior
    to_balanced = prior_weights(plain_run, "balanced")
    for task in counts:
        np.testing.assert_allclose(to_balanced[task] * to_training[task], 1.0)
    with pytest.raises(FacemtError, match="class counts"):
        prior_weights({"train": {"balance_classes": True}}, "training")
    with pytest.raises(FacemtError, match="unknown prior"):
        prior_weights(balanced_run, "uniform")


def test_the_training_prior_undoes_the_base_models_logit_adjustment():
    base = facemt.load(device="cpu", prior="training", engine="torch")  # the logits come from PyTorch
    counts = read_config(base_dir())["class_counts"]
    assert base.prior == "training" and facemt.load(device="cpu").prior == "balanced"
    assert sum(counts["expression"]) > 8000 and sum(counts["gender"]) > 3000  # FER+ Train (8,000 drawn), CK+ and studio; UTKFace
    (_, face), = _frame(PHOTO, base.preprocess, largest_only=True, fallback=False)
    moved = base.probabilities([face])
    x = build_transform(base.preprocess, "none")(face)[None]
    with torch.no_grad():
        logits = base.model(x)
    for task in base.tasks:
        z = logits[task].float()[0] / base.model.temperatures[task] + torch.log(
            torch.as_tensor(class_prior(counts[task]), dtype=torch.float32))
        np.testing.assert_allclose(moved[task][0], torch.softmax(z, 0).numpy(), atol=1e-5)
    # FER+ Train is 40 % neutral: under its prior neutrality gains
    plain = facemt.load(device="cpu").probabilities([face])
    neutral = TASKS["expression"].classes.index("neutrality")
    assert moved["expression"][0][neutral] > plain["expression"][0][neutral]


def test_predict_and_evaluate_take_a_prior(run_dir, faces_dir, capsys):
    assert main(["predict", PHOTO, "--json", "--device", "cpu"]) == 0
    (plain,) = json.loads(capsys.readouterr().out)
    assert main(["predict", PHOTO, "--json", "--device", "cpu", "--prior", "training"]) == 0
    (moved,) = json.loads(capsys.readouterr().out)
    assert moved["expression"]["probabilities"] != plain["expression"]["probabilities"]
    assert sum(moved["expression"]["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert main(["evaluate", "--model", str(run_dir), "--data", str(faces_dir), "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["prior"] == "training"  # fit's default: no logit adjustment
    assert main(["evaluate", "--model", str(run_dir), "--data", str(faces_dir), "--json", "--device", "cpu",
                 "--prior", "balanced"]) == 0
    assert json.loads(capsys.readouterr().out)["prior"] == "balanced"


def test_a_run_without_class_counts_says_so_in_one_line(run_dir, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    config = read_config(old)
    config.pop("class_counts")
    (old / "config.json").write_text(json.dumps(config))
    update_config(old, {})
    assert main(["predict", PHOTO, "--model", str(old), "--prior", "balanced", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert "class counts" in err and len(err.splitlines()) == 1
    assert main(["predict", PHOTO, "--model", str(old), "--json", "--device", "cpu"]) == 0  # its own prior still works


def test_the_onnx_engine_takes_the_same_prior(run_dir):
    pytest.importorskip("onnxruntime")
    torch_run = facemt.load(run_dir, device="cpu", prior="balanced")
    onnx_run = facemt.load(run_dir, engine="onnx", prior="balanced")
    (_, face), = _frame(PHOTO, torch_run.preprocess, largest_only=True, fallback=True)
    a, b = torch_run.probabilities([face]), onnx_run.probabilities([face])
    own = facemt.load(run_dir, device="cpu").probabilities([face])
    counts = read_config(run_dir)["class_counts"]
    uneven = [t for t in torch_run.tasks if len(set(counts[t])) > 1]
    assert uneven
    for task in torch_run.tasks:
        np.testing.assert_allclose(a[task], b[task], atol=1e-4)
        # the balanced prior moves a head whose training classes were uneven, and only those
        assert np.allclose(a[task], own[task], atol=1e-6) == (task not in uneven)
