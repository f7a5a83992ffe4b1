"""The real-face accuracy benchmark script, run end to end on generated files
named like JAFFE and UTKFace (the real data is only for benchmarks), and the
per-group backbone learning rate it studies."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from facemt.cli import main as cli_main
from facemt.data import index_folder, index_jaffe, index_utkface
from facemt.engine import TrainConfig, seed_everything, setup_training, train
from facemt.model import create_model
from facemt.evaluation import paired_interval
from facemt import FacemtError

ROOT = Path(__file__).resolve().parents[1]
JAFFE_CODES = ("AN", "DI", "FE", "HA", "NE", "SA", "SU")
UTK_AGES = {"young": 25, "middle": 45, "old": 72}


def _load_script():
    spec = importlib.util.spec_from_file_location("accuracy_bench", ROOT / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_script()


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("realish")
    rng = np.random.default_rng(0)
    (root / "jaffe").mkdir()
    for p, person in enumerate(("KA", "KL", "KM", "KR", "MK", "NA", "NM", "TM", "UY", "YM")):
        for c, code in enumerate(JAFFE_CODES):
            pixels = rng.integers(0, 255, (40, 40), dtype=np.uint8)
            Image.fromarray(pixels, "L").save(root / "jaffe" / f"{person}.{code}1.{p * 10 + c}.tiff")
    (root / "utkface").mkdir()
    n = 0
    for group, age in UTK_AGES.items():
        for gender in (0, 1):
            for _ in range(5):
                pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "utkface" / f"{age}_{gender}_0_2017010900{n:05d}.jpg.chip.jpg")
                n += 1
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "utkface" / "34_1_0_20170109000000.jpg.chip.jpg")
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "utkface" / "8_1_0_20170109000001.jpg.chip.jpg")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "mobilenetv2_random.safetensors"
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in timm.create_model("mobilenetv2_100").state_dict().items()}, str(path))
    return path


def test_utk_regime_is_balanced_disjoint_and_its_test_set_fixed(bench, data_root):
    utk = index_utkface(data_root / "utkface")
    train0, test0 = bench.utk_regime(utk, 0, per_cell=2, test_per_cell=3)
    train1, test1 = bench.utk_regime(utk, 1, per_cell=2, test_per_cell=3)
    assert test0 == test1 and len(test0) == 18
    for tr in (train0, train1):
        assert not set(tr) & set(test0)
        cells = utk.table.iloc[tr].groupby(["age_group", "gender"]).size()
        assert len(cells) == 6 and set(cells) == {2}
    tr, te = bench.utk_all_adults(utk)
    assert not set(tr) & set(te) and len(tr) + len(te) == 30  # the gap age (34) has no age group
    assert len(te) == 6


def test_paired_interval():
    mean, low, high = paired_interval([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2)
    assert low == pytest.approx(0.2 - 4.302653 * 0.1 / np.sqrt(3), abs=1e-5) and high > mean
    assert np.isnan(paired_interval([0.5])[1])


def test_benchmark_script_runs_every_benchmark(bench, data_root, weights, tmp_path):
    csv, md = tmp_path / "acc.csv", tmp_path / "RESULTS.md"
    argv = ["--data-root", str(data_root), "--weights", str(weights), "--only", "C,D,E", "--seeds", "1",
            "--seeds-b", "2", "--epochs", "1", "--epochs-c", "1", "--image-size", "32", "--batch-size", "8",
            "--utk-train-per-cell", "2", "--utk-test-per-cell", "3", "--csv", str(csv), "--results", str(md),
            "--title", "smoke"]
    assert bench.main(argv) == 0
    frame = pd.read_csv(csv)
    counts = frame.groupby(["benchmark", "model"]).size().to_dict()
    # D pulls in A and B; A: 5 folds x 1 head, B: 2 seeds x (1 + 1 + 2 heads), D: 5 folds x 3 heads.
    assert counts == {("A", "single"): 5, ("B", "single"): 4, ("B", "multitask"): 4, ("C", "multitask"): 2,
                      ("D", "multitask"): 15, ("E", "single"): 1}
    assert frame["accuracy"].between(0, 1).all()
    assert set(frame.loc[frame["benchmark"] == "D", "n_test"]) == {18, 12}  # UTK test set; 2 women x 6 expressions
    text = md.read_text()
    assert "### smoke: A, B, C, D, E at commit" in text and "--only C,D,E" in text
    assert "D joint minus single-task" in text
    pairs = bench.joint_pairs(frame).set_index("head")
    assert pairs.loc["expression", "pairs"] == 5 and pairs.loc["gender", "pairs"] == 1
    a = frame[(frame["benchmark"] == "A")].set_index("fold")["accuracy"]
    d = frame[(frame["benchmark"] == "D") & (frame["head"] == "expression")].set_index("fold")["accuracy"]
    assert pairs.loc["expression", "diff"] == pytest.approx((d - a).mean())


def test_zero_shot_and_summarize(bench, data_root, run_dir, tmp_path):
    csv, md = tmp_path / "z.csv", tmp_path / "RESULTS.md"
    argv = ["--data-root", str(data_root), "--init", str(run_dir), "--only", "Z,A", "--seeds", "1", "--epochs", "1",
            "--batch-size", "8", "--utk-train-per-cell", "2", "--utk-test-per-cell", "3", "--csv", str(csv),
            "--results", str(md)]
    assert bench.main(argv) == 0
    frame = pd.read_csv(csv)
    z = frame[frame["benchmark"] == "Z"]
    assert set(z["head"]) == {"expression", "age_group", "gender"} and len(z) == 5 + 2
    assert set(z.loc[z["head"] == "age_group", "n_test"]) == {18}
    a = frame[frame["benchmark"] == "A"]
    assert len(a) == 5 and (a["seconds"] > 0).all()  # fine-tuned from the run, one per fold
    assert "zero-shot expression recall per class on all of JAFFE" in md.read_text()
    merged = tmp_path / "merged.csv"
    assert bench.main(["--data-root", str(data_root), "--summarize", str(csv), str(csv), "--csv", str(merged),
                       "--results", str(md), "--title", "merged twice"]) == 0
    assert len(pd.read_csv(merged)) == 2 * len(frame) and "### merged twice" in md.read_text()


def test_zero_shot_scores_mirror_averaged_predictions_with_tta(bench, data_root, run_dir, tmp_path, monkeypatch):
    seen = []
    real = bench.predict_images
    monkeypatch.setattr(bench, "predict_images", lambda *a, **k: seen.append(a[5:] + tuple(k.values())) or real(*a, **k))
    argv = ["--data-root", str(data_root), "--init", str(run_dir), "--only", "Z", "--seeds", "1",
            "--utk-train-per-cell", "2", "--utk-test-per-cell", "3", "--results", str(tmp_path / "R.md")]
    assert bench.main(argv + ["--csv", str(tmp_path / "plain.csv")]) == 0
    assert seen == [(False,), (False,)]
    assert bench.main(argv + ["--csv", str(tmp_path / "tta.csv"), "--tta"]) == 0
    assert seen[2:] == [(True,), (True,)]
    assert len(pd.read_csv(tmp_path / "tta.csv")) == len(pd.read_csv(tmp_path / "plain.csv"))


def test_split_runs_merge_into_the_same_pairs(bench, data_root, weights, tmp_path):
    common = ["--data-root", str(data_root), "--weights", str(weights), "--epochs", "1", "--image-size", "32",
              "--batch-size", "8", "--utk-train-per-cell", "2", "--utk-test-per-cell", "3", "--crop", "none",
              "--seeds", "1", "--seeds-b", "1", "--first-seed", "1", "--results", str(tmp_path / "R.md")]
    assert bench.main([*common, "--only", "D", "--d-alone", "--csv", str(tmp_path / "d.csv")]) == 0
    d = pd.read_csv(tmp_path / "d.csv")
    assert set(d["benchmark"]) == {"D"} and set(d["seed"]) == {1} and len(d) == 15
    assert bench.main([*common, "--only", "A,B", "--csv", str(tmp_path / "ab.csv")]) == 0
    assert set(pd.read_csv(tmp_path / "ab.csv")["seed"]) == {1}
    assert bench.main(["--data-root", str(data_root), "--summarize", str(tmp_path / "d.csv"), str(tmp_path / "ab.csv"),
                       "--csv", str(tmp_path / "all.csv"), "--results", str(tmp_path / "R.md")]) == 0
    assert "D joint minus single-task" in (tmp_path / "R.md").read_text()


def test_jaffe_folds_hold_out_two_women(bench, data_root):
    jaffe = index_jaffe(data_root / "jaffe")
    splits = bench.jaffe_subject_splits(jaffe, 1)
    assert len(splits) == 5
    for _, _, tr, te in splits:
        held = set(jaffe.table["person"].iloc[te])
        assert len(held) == 2 and not held & set(jaffe.table["person"].iloc[tr])


def _weight_change(index, config: TrainConfig, rows) -> tuple[float, float]:
    """Train with ``config``; the largest change of a backbone and
    of a head parameter from the start."""
    result = train(index, config, rows)
    seed_everything(config.seed)  # what train() does before it creates the model: the same start
    start, _ = create_model(config.backbone, result.tasks, image_size=32, dropout=config.dropout)
    trunk = max((p - q).abs().max().item() for p, q in zip(result.model.trunk.parameters(), start.trunk.parameters()))
    heads = max((p - q).abs().max().item() for p, q in zip(result.model.heads.parameters(), start.heads.parameters()))
    return trunk, heads


def test_backbone_lr_scale_slows_only_the_backbone(faces_dir):
    index = index_folder(faces_dir)
    rows = list(range(len(index.table)))
    base = TrainConfig(backbone="resnet18", epochs=1, image_size=32, batch_size=16, augment="none", device="cpu")

    full_trunk, full_heads = _weight_change(index, replace(base, backbone_lr_scale=1.0), rows)
    slow_trunk, slow_heads = _weight_change(index, replace(base, backbone_lr_scale=1e-3), rows)
    assert slow_trunk < full_trunk / 50
    assert slow_heads > full_heads / 5
    with pytest.raises(FacemtError, match="backbone_lr_scale"):  # the library names the field
        TrainConfig(backbone_lr_scale=0).validate()
    assert cli_main(["fit", "--data", str(faces_dir), "--out", "/nonexistent/x", "--backbone-lr-scale", "-1"]) == 2


def test_head_warmup_freezes_the_backbone_then_releases_it(faces_dir):
    index = index_folder(faces_dir)
    rows = list(range(len(index.table)))
    base = TrainConfig(backbone="resnet18", epochs=2, image_size=32, batch_size=16, augment="none", device="cpu",
                       warmup_epochs=0.5)

    # 1.999 epochs: every step of both epochs is head-only
    frozen_trunk, frozen_heads = _weight_change(index, replace(base, head_warmup_epochs=1.999), rows)
    assert frozen_trunk == 0.0 and frozen_heads > 0.0
    free_trunk, _ = _weight_change(index, replace(base, head_warmup_epochs=0.0), rows)
    assert free_trunk > 0.0

    setup = setup_training(index, replace(base, head_warmup_epochs=1.0), rows, [], None, None, False)
    steps = setup.steps_per_epoch
    backbone = [setup.scheduler.lr_lambdas[1](s) for s in range(2 * steps)]
    heads = [setup.scheduler.lr_lambdas[0](s) for s in range(2 * steps)]
    assert backbone[:steps] == [0.0] * steps and all(b > 0 for b in backbone[steps:])
    assert all(h > 0 for h in heads)
    assert backbone[steps] < heads[steps]  # released gently: ramped in over warmup_epochs
    plain = setup_training(index, base, rows, [], None, None, False)  # no head warm-up: one schedule for all
    assert [plain.scheduler.lr_lambdas[1](s) for s in range(2 * steps)] == heads
    for bad in (-1.0, 2.0):
        with pytest.raises(FacemtError, match="^head_warmup_epochs must be"):
            replace(base, head_warmup_epochs=bad).validate()
    assert cli_main(["fit", "--data", str(faces_dir), "--out", "/nonexistent/x", "--epochs", "2",
                     "--head-warmup-epochs", "2"]) == 2


def test_layer_decay_slows_blocks_nearer_the_input(faces_dir):
    index = index_folder(faces_dir)
    rows = list(range(len(index.table)))
    base = TrainConfig(backbone="resnet18", epochs=1, image_size=32, batch_size=16, augment="none", device="cpu",
                       backbone_lr_scale=0.5)
    plain = setup_training(index, base, rows, [], None, None, False)
    assert [g["initial_lr"] for g in plain.optimizer.param_groups] == [1e-3, 5e-4]  # heads, one backbone rate
    setup = setup_training(index, replace(base, layer_decay=0.5), rows, [], None, None, False)
    groups = setup.optimizer.param_groups
    assert groups[0]["name"] == "heads" and groups[0]["initial_lr"] == 1e-3
    backbone = groups[1:]
    assert len(backbone) > 2 and all(g["name"] == "backbone" for g in backbone)
    rates = [g["initial_lr"] for g in backbone]  # peak rates (the schedule scales them all alike)
    assert rates[-1] == pytest.approx(5e-4)  # the block nearest the heads: lr x backbone_lr_scale
    assert rates == pytest.approx([5e-4 * 0.5 ** (len(rates) - 1 - i) for i in range(len(rates))])
    trunk = [id(p) for p in setup.model.trunk.parameters()]
    grouped = [id(p) for g in backbone for p in g["params"]]
    assert sorted(grouped) == sorted(trunk)  # every trunk parameter in exactly one block
    first = next(iter(setup.model.trunk.parameters()))  # the stem trains slowest
    assert any(p is first for p in backbone[0]["params"])
    seed_everything(0)
    start = next(iter(create_model("resnet18", ("expression",), image_size=32)[0].trunk.parameters())).detach()
    stem = [(next(iter(train(index, replace(base, layer_decay=d), rows).model.trunk.parameters())) - start)
            .abs().max().item() for d in (1.0, 0.5)]
    assert 0.0 < stem[1] < stem[0]  # the stem moves, less than at one rate
    for bad in (0.0, 11.0):
        with pytest.raises(FacemtError, match="^layer_decay must be"):
            replace(base, layer_decay=bad).validate()
    assert cli_main(["fit", "--data", str(faces_dir), "--out", "/nonexistent/x", "--layer-decay", "-1"]) == 2


def test_speed_benchmark_trains_with_the_real_epoch_loop():
    spec = importlib.util.spec_from_file_location("speed", ROOT / "benchmarks" / "speed.py")
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    from facemt.data import FaceDataset
    from facemt.losses import MultiTaskLoss
    from facemt.transforms import build_transform

    torch.manual_seed(0)
    model, pre = create_model("resnet18", ("gender",), image_size=32)
    before = [p.detach().clone() for p in model.parameters()]
    images = [np.full((40, 40, 3), 40 * i, np.uint8) for i in range(6)]
    data = FaceDataset(images, {"gender": np.array([0, 1] * 3)}, build_transform(pre, "none"))
    total, wait = speed.train_epoch(model, data, 4, MultiTaskLoss({"gender": 1.0}),
                                    torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert 0 < wait < total
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it trained


def test_base_model_benchmark_reports_every_group(data_root, run_dir, tmp_path):
    """benchmarks/base_model.py on generated FER+- and UTKFace-layout folders:
    FER+ Test, the UTKFace held-out faces per race, gender, age group and
    age group x gender, written as JSON and as a RESULTS section."""
    spec = importlib.util.spec_from_file_location("base_bench", ROOT / "benchmarks" / "base_model.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    root = tmp_path / "data"
    (root / "utkface").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for n, (age, gender, race) in enumerate((a, g, r) for a in UTK_AGES.values() for g in (0, 1) for r in range(5)):
        for k in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
                root / "utkface" / f"{age}_{gender}_{race}_2017010900{2 * n + k:05d}.jpg.chip.jpg")
    votes = [(8, 0, 0, 1, 1, 0, 0, 0, 0, 0), (0, 9, 0, 0, 1, 0, 0, 0, 0, 0), (0, 0, 0, 9, 1, 0, 0, 0, 0, 0),
             (0, 0, 0, 0, 9, 1, 0, 0, 0, 0), (0, 0, 0, 0, 1, 9, 0, 0, 0, 0), (1, 0, 0, 0, 0, 0, 9, 0, 0, 0)]
    for split in ("FER2013Train", "FER2013Test"):
        folder = root / "ferplus" / split
        folder.mkdir(parents=True)
        lines = []
        for i, v in enumerate(votes * 2):
            Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8), "L").save(folder / f"fer{i:07d}.png")
            lines.append(f'fer{i:07d}.png,"(0, 0, 48, 48)",' + ",".join(map(str, v)))
        (folder / "label.csv").write_text("\n".join(lines) + "\n")
    out, results = tmp_path / "base.json", tmp_path / "R.md"
    assert script.main(["--data-root", str(root), "--model", str(run_dir), "--json", str(out),
                        "--results", str(results)]) == 0
    numbers = json.loads(out.read_text())
    assert numbers["ferplus_test"]["n"] == 12 and 0.0 <= numbers["ferplus_test"]["accuracy"] <= 1.0
    assert (numbers["prior"], numbers["other_prior"]) == ("training", "balanced")  # fit's default run
    assert numbers["ferplus_test"]["other_prior"]["n"] == 12 and "other_prior" in numbers["utkface_heldout"]["gender"]
    colour = rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)
    assert np.array_equal(script.greyscale(colour)[..., 2], np.asarray(Image.fromarray(colour).convert("L")))
    grey = numbers["utkface_greyscale"]
    assert grey["gender"]["n"] == numbers["utkface_heldout"]["gender"]["n"] and 0 <= grey["expression_agreement"] <= 1
    assert "in greyscale" in results.read_text()
    held = numbers["utkface_heldout"]
    groups = held["gender"]["by_group"]
    assert {"race: white", "gender: female", "age group: old", "age group, gender: old female"} <= set(groups)
    assert sum(groups[f"gender: {g}"]["n"] for g in ("male", "female")) == held["gender"]["n"]
    assert sum(groups[f"age group, gender: {a} {g}"]["n"] for a in UTK_AGES for g in ("male", "female")
               if f"age group, gender: {a} {g}" in groups) == held["gender"]["n"]
    assert "| age group, gender: old female |" in results.read_text()


def test_compare_pairs_runs_on_identical_folds(bench, tmp_path):
    def frame(accs, folds):
        return pd.DataFrame({"benchmark": "A", "model": "single", "head": "expression", "seed": 0,
                             "fold": folds, "accuracy": accs, "n_test": 30, "seconds": 1.0})

    ref = frame([0.50, 0.60, 0.70], [0, 1, 2])
    other = frame([0.60, 0.80, 0.10], [0, 1, 3])  # fold 3 has no partner: left out
    table = bench.compare(ref, {"other": other})
    row = table.iloc[0]
    assert row["pairs"] == 2 and row["diff"] == pytest.approx(15.0)
    assert row["reference"] == pytest.approx(55.0) and row["other"] == pytest.approx(70.0)
    assert row["low"] < 15.0 < row["high"]
    ref.to_csv(tmp_path / "ref.csv", index=False)
    other.to_csv(tmp_path / "other.csv", index=False)
    assert bench.main(["--data-root", str(tmp_path), "--compare", str(tmp_path / "ref.csv"), str(tmp_path / "other.csv"),
                       "--results", str(tmp_path / "R.md")]) == 0
    text = (tmp_path / "R.md").read_text()
    assert "Paired comparison against ref" in text and "+15.0" in text


def test_framing_benchmark_recuts_every_jaffe_picture(data_root, run_dir, tmp_path):
    """benchmarks/framing.py on a generated JAFFE-layout folder: every variant
    scores every face of the six classes, and the results file gets the table."""
    spec = importlib.util.spec_from_file_location("framing_bench", ROOT / "benchmarks" / "framing.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    recut = tmp_path / "recut"
    script.recut(data_root / "jaffe", recut, 0.0, 24)
    assert sorted(p.stem for p in recut.iterdir()) == sorted(p.stem for p in (data_root / "jaffe").iterdir())
    assert {Image.open(p).size for p in recut.iterdir()} == {(24, 24)}
    results = tmp_path / "R.md"
    assert script.main(["--data-root", str(data_root), "--model", str(run_dir), "--results", str(results)]) == 0
    rows = [line for line in results.read_text().splitlines() if line.startswith("| ") and "recall" not in line]
    faces = len(index_jaffe(data_root / "jaffe"))
    assert len(rows) == len(script.VARIANTS) and all(row.split(" | ")[1] == str(faces) for row in rows)
