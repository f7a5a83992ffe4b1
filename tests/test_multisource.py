"""Training across partially labelled sources: uncertainty weighting, source
balancing, initialising from a previous run."""

import json

import pandas as pd
import pytest
import torch

import facemt
from facemt import FacemtError
from facemt.cli import main
from facemt.engine import epoch_batches, initialise_from, source_weights
from facemt.losses import MultiTaskLoss
from facemt.model import create_model
from conftest import TINY_FIT


def test_uncertainty_weighting_learns_a_log_variance_per_head():
    crit = MultiTaskLoss({"gender": 1.0, "expression": 1.0}, learned=True)
    logits = {"gender": torch.randn(4, 2, requires_grad=True), "expression": torch.randn(4, 6, requires_grad=True)}
    targets = {"gender": torch.tensor([0, 1, 0, 1]), "expression": torch.tensor([-1, -1, -1, -1])}
    total, per = crit(logits, targets)
    assert torch.isclose(total, per["gender"])  # s = 0: exp(0) * loss + 0
    total.backward()
    assert crit.log_vars["gender"].grad != 0
    assert crit.log_vars["expression"].grad is None or crit.log_vars["expression"].grad == 0  # no labels: untouched


def test_source_weights_balance_sources():
    table = pd.DataFrame({"source": ["big"] * 30 + ["small"] * 3})
    w = source_weights(table)
    assert float(w[:30].sum()) == pytest.approx(float(w[30:].sum()))
    draws = [i for b in epoch_batches(33, 8, 0, 1, weights=w) for i in b]
    assert len(draws) == 33 and sum(i >= 30 for i in draws) > 8  # ~half instead of 3 in 33
    assert epoch_batches(33, 8, 0, 1, weights=w) == epoch_batches(33, 8, 0, 1, weights=w)


def test_init_from_copies_backbone_and_matching_heads(run_dir):
    torch.manual_seed(1)
    model, _ = create_model("mobilenetv2_100", ("expression",), image_size=32)
    copied = initialise_from(model, run_dir, "mobilenetv2_100")
    source = facemt.load(run_dir, device="cpu").model
    assert copied == ["expression"]
    assert torch.equal(model.trunk.conv_stem.weight, source.trunk.conv_stem.weight)
    assert torch.equal(model.heads["expression"].weight, source.heads["expression"].weight)
    other, _ = create_model("resnet18", ("expression",), image_size=32)
    with pytest.raises(FacemtError, match="backbone is mobilenetv2_100"):
        initialise_from(other, run_dir, "resnet18")


def test_fit_with_init_from_uncertainty_and_balancing(run_dir, faces_dir, tmp_path):
    run = tmp_path / "finetune"
    argv = ["fit", "--data", str(faces_dir), "--out", str(run), *TINY_FIT, "--tasks", "expression,gender",
            "--init-from", str(run_dir), "--loss-weighting", "uncertainty", "--balance-sources"]
    assert main(argv) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["init_from"] == str(run_dir) and config["train"]["loss_weighting"] == "uncertainty"
    history = pd.read_csv(run / "history.csv")
    assert {"loss_weight_gender", "loss_weight_expression"} <= set(history.columns)
    assert main(["fit", "--data", str(faces_dir), "--out", str(tmp_path / "x"), "--init-from", str(run_dir),
                 "--pretrained"]) == 2
