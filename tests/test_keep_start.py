"""Never worse than the start: heads that fine-tuning does not improve, or that the data does not
label, are answered by the model training started from, carried whole in the run."""

from __future__ import annotations

import io
import json

import pandas as pd
import torch

import facemt
from facemt.checkpoint import load_checkpoint, read_config, save_checkpoint
from facemt.cli import main
from facemt.data import ImageCache, index_folder
from facemt.engine import decode_images, heads_to_keep, predict_images
from facemt.export import export
from facemt.model import create_model
from facemt.tasks import TASK_NAMES

from conftest import TINY_FIT


def _tiny(tasks=None, seed=0):
    torch.manual_seed(seed)
    return create_model("resnet18", tasks, image_size=32)


def test_kept_heads_answer_exactly_as_the_start_model():
    start, _ = _tiny(seed=0)
    start.eval().temperatures["gender"] = 1.7
    tuned, _ = _tiny(("expression",), seed=1)
    tuned.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        own, ref = tuned(x)["expression"], start(x)
        tuned.keep(start, ["age_group", "gender"])
        out = tuned(x)
    assert tuned.tasks == TASK_NAMES and list(out) == list(TASK_NAMES)
    assert torch.equal(out["expression"], own)
    assert torch.equal(out["age_group"], ref["age_group"]) and torch.equal(out["gender"], ref["gender"])
    assert tuned.temperatures["gender"] == 1.7 and tuned.network_of("gender") is start
    assert tuned.network_of("expression") is tuned


def test_a_run_carrying_its_start_model_round_trips(tmp_path):
    """Nested too: a run fine-tuned from a run that itself carries a start model."""
    first, pre = _tiny(seed=0)
    second, _ = _tiny(("expression", "gender"), seed=1)
    second.keep(first, ["age_group"])
    third, _ = _tiny(("expression",), seed=2)
    third.keep(second, ["age_group", "gender"])
    save_checkpoint(tmp_path / "run", third, "resnet18", pre)
    config = read_config(tmp_path / "run")
    assert config["kept"]["heads"] == ["age_group", "gender"] and config["kept"]["kept"]["heads"] == ["age_group"]
    loaded, _, _ = load_checkpoint(tmp_path / "run")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want, got = third.eval()(x), loaded(x)
        assert torch.allclose(got["age_group"], first.eval()(x)["age_group"])
    assert all(torch.allclose(want[t], got[t]) for t in TASK_NAMES)
    assert loaded.network_of("age_group").tasks == first.tasks


def test_which_heads_the_start_model_keeps():
    metrics = {"val_expression_acc": 0.8, "val_gender_acc": 0.9, "val_age_group_acc": float("nan")}
    untouched = {"expression": 0.7, "gender": 0.9}
    kept = heads_to_keep(metrics, untouched, TASK_NAMES, ("age_group", "gender", "expression"))
    assert list(kept) == ["gender"] and "0.900 = untouched 0.900" in kept["gender"]  # a tie keeps the start
    # the study's tie-breaks: the start model's accuracy on every face fit was given, beaten by one validation face
    heads = ("age_group", "gender", "expression")
    faces = {"gender": 20, "expression": 20}
    assert heads_to_keep(metrics, untouched, TASK_NAMES, heads, overall=({"gender": 0.85}, faces)) == {}
    kept = heads_to_keep(metrics, untouched, TASK_NAMES, heads, overall=({"gender": 0.86}, faces))
    assert list(kept) == ["gender"] and "not one image above untouched 0.860" in kept["gender"]
    assert list(heads_to_keep(metrics, untouched, TASK_NAMES, heads, overall=({"gender": 0.85}, {"gender": 10}))) == [
        "gender"]  # on 10 faces, 0.9 is not one face above 0.85
    kept = heads_to_keep(metrics, {"gender": 0.95}, TASK_NAMES, heads, overall=({"gender": 0.5}, faces))
    assert "0.900 < untouched 0.950 on validation" in kept["gender"]  # only a tie looks at every face
    # the study's other tie-break: the lower validation log-loss
    losses = ({"gender": 0.20, "expression": 0.5}, {"gender": 0.25, "expression": 0.4})
    assert heads_to_keep(metrics, untouched, TASK_NAMES, ("age_group", "gender", "expression"), losses=losses) == {}
    worse = ({"gender": 0.30}, {"gender": 0.25})
    kept = heads_to_keep(metrics, untouched, TASK_NAMES, ("age_group", "gender", "expression"), losses=worse)
    assert list(kept) == ["gender"] and "log-loss 0.300 >= 0.250" in kept["gender"]
    kept = heads_to_keep(metrics, untouched, TASK_NAMES, ("expression",))
    assert set(kept) == {"age_group", "gender"} and "not trained" in kept["gender"]
    assert heads_to_keep(metrics, untouched, TASK_NAMES, ("expression",), labelled_only=False) == {}
    assert heads_to_keep(metrics, {"expression": 0.9}, ("expression",), ("expression",)) == {
        "expression": "fine-tuned 0.800 < untouched 0.900 on validation"}


def _expression_only(faces_dir, tmp_path):
    table = index_folder(faces_dir).table
    manifest = tmp_path / "expressions.csv"
    pd.DataFrame({"path": table["path"], "expression": table["expression"], "person": table["person"]}).to_csv(
        manifest, index=False)
    return manifest


def test_fit_on_expressions_alone_leaves_age_group_and_gender_as_the_start_had_them(faces_dir, run_dir, tmp_path):
    run = tmp_path / "expr"
    assert main(["fit", "--data", str(_expression_only(faces_dir, tmp_path)), "--init-from", str(run_dir),
                 "--out", str(run), *TINY_FIT, "--epochs", "1"]) == 0
    config = read_config(run)
    assert set(config["never_worse"]["kept"]) >= {"age_group", "gender"} and config["kept"]["heads"]
    mine, start = facemt.load(run, device="cpu"), facemt.load(run_dir, device="cpu")
    assert mine.tasks == TASK_NAMES
    images = decode_images(index_folder(faces_dir), mine.preprocess, ImageCache(), None)
    got, want = mine.probabilities(images), start.probabilities(images)
    for t in ("age_group", "gender"):
        assert abs(got[t] - want[t]).max() < 1e-5
    # the ONNX graph of such a run is both networks, routed the same way
    info = export(run, "onnx")
    assert info["max_abs_diff"] < 1e-4
    graph = facemt.load(run, device="cpu", engine="onnx").probabilities(images)
    for t in TASK_NAMES:
        assert abs(graph[t] - got[t]).max() < 1e-4


def test_fit_answers_a_head_with_the_start_model_exactly_when_fine_tuning_did_not_beat_it(
        faces_dir, run_dir, tmp_path, capsys):
    """A learning rate that wrecks the network: the start model must answer what fine-tuning lost."""
    runs = {}
    for name, extra in (("wrecked", ["--lr", "3"]), ("free", ["--lr", "3", "--no-keep-start"])):
        runs[name] = tmp_path / name
        assert main(["fit", "--data", str(faces_dir), "--init-from", str(run_dir), "--out", str(runs[name]),
                     "--json", *TINY_FIT, "--epochs", "1", *extra]) == 0
    result = json.loads(capsys.readouterr().out.split("\n}\n")[0] + "\n}")
    val, before, overall = (result["metrics"], result["untouched_val_acc"], result["untouched_all_faces_acc"])
    faces = read_config(runs["wrecked"])["untouched"]["val_images"]
    assert set(overall) == set(before) == set(faces) == set(result["tasks"])
    kept = {t for t in result["tasks"] if val[f"val_{t}_acc"] <= before[t]}
    assert kept and set(result["kept"]) == kept
    assert set(read_config(runs["wrecked"])["never_worse"]["kept"]) == kept
    free = read_config(runs["free"])
    assert free["never_worse"] == {"enabled": False, "kept": {}} and "kept" not in free
    index = index_folder(faces_dir)
    mine, start = facemt.load(runs["wrecked"], device="cpu"), facemt.load(run_dir, device="cpu")
    images = decode_images(index, mine.preprocess, ImageCache(), None)
    got, want = mine.probabilities(images), start.probabilities(images)
    assert all(abs(got[t] - want[t]).max() < 1e-5 for t in kept)


def test_fit_at_another_image_size_cannot_keep_the_start_and_says_so(faces_dir, run_dir, tmp_path):
    run = tmp_path / "bigger"
    args = [a if a != "32" else "40" for a in TINY_FIT] + ["--epochs", "1"]
    assert main(["fit", "--data", str(faces_dir), "--init-from", str(run_dir), "--out", str(run), *args]) == 0
    never_worse = read_config(run)["never_worse"]
    assert never_worse["kept"] == {} and "preprocessing" in never_worse["skipped"]


def test_refit_trains_again_on_every_face_and_keeps_what_validation_chose(faces_dir, run_dir, tmp_path, capsys):
    data, runs = _expression_only(faces_dir, tmp_path), {}
    for name, extra in (("validated", ["--no-keep-start"]), ("refit", ["--no-keep-start", "--refit"]),
                        ("kept", ["--refit"])):
        runs[name] = tmp_path / name
        assert main(["fit", "--data", str(data), "--init-from", str(run_dir), "--out", str(runs[name]), "--json",
                     *TINY_FIT, "--epochs", "1", *extra]) == 0
    printed = json.loads(capsys.readouterr().out.split("\n}\n")[1] + "\n}")
    validated, refit = read_config(runs["validated"]), read_config(runs["refit"])
    table = index_folder(faces_dir).table
    assert "refit" not in validated and refit["train"]["refit"] is True
    assert refit["refit"]["images"] == len(table) and refit["refit"]["persons"] == table["person"].nunique()
    assert refit["refit"]["epochs"] == refit["best_epoch"] and printed["refit"]["images"] == len(table)
    # validation chose the same epoch and temperature in both runs; the refit run saves another model
    assert refit["best_epoch"] == validated["best_epoch"]
    temperature = {name: c["calibration"]["temperature"]["expression"] for name, c in (("v", validated), ("r", refit))}
    assert abs(temperature["v"] - temperature["r"]) < 1e-6
    models = {name: facemt.load(run, device="cpu") for name, run in runs.items()}
    assert abs(load_checkpoint(runs["refit"])[0].temperatures["expression"] - temperature["v"]) < 1e-6
    images = decode_images(index_folder(faces_dir), models["refit"].preprocess, ImageCache(), None)
    got = {name: m.probabilities(images) for name, m in models.items()}
    assert abs(got["refit"]["expression"] - got["validated"]["expression"]).max() > 1e-3
    # the heads the never-worse rule gave the start model stay the start model's
    kept = read_config(runs["kept"])
    assert kept["refit"]["epochs"] == 1 and set(kept["never_worse"]["kept"]) >= {"age_group", "gender"}
    start = facemt.load(run_dir, device="cpu").probabilities(images)
    for t in kept["never_worse"]["kept"]:
        assert abs(got["kept"][t] - start[t]).max() < 1e-5


def test_an_interrupted_refit_leaves_the_validated_model(faces_dir, run_dir, tmp_path):
    from facemt.config import TrainConfig
    from facemt.engine import fit

    refitting = []
    config = TrainConfig(init_from=str(run_dir), epochs=1, image_size=32, batch_size=16, augment="light",
                         device="cpu", refit=True)
    result = fit(index_folder(faces_dir), config, tmp_path / "run",
                 callback=lambda event, info: refitting.append(event) if event == "refit" else None,
                 should_stop=lambda: bool(refitting))
    assert refitting and result.refit is None and "refit" not in read_config(tmp_path / "run")
    assert not (tmp_path / "run" / "resume.json").exists()
    saved = facemt.load(tmp_path / "run", device="cpu")
    images = decode_images(index_folder(faces_dir), saved.preprocess, ImageCache(), None)
    got, want = saved.probabilities(images), predict_images(result.model, images, result.preprocess)
    assert all(abs(got[t] - want[t]).max() < 1e-5 for t in got)


def test_more_validation_groups_hold_out_other_persons_each_once():
    from facemt.splits import more_validation_groups, validation_split

    table = pd.DataFrame({"person": [f"p{i}" for i in range(10) for _ in range(3)], "gender": "female"})
    own = validation_split(table, 0.2, 0)[1]
    mine = set(table["person"].iloc[own])
    groups = more_validation_groups(table, own, 3, seed=0)
    held = [set(table["person"].iloc[v]) for _, v in groups]
    assert len(groups) == 2 and all(len(h) == len(mine) for h in held)
    assert not held[0] & held[1] and not (held[0] | held[1]) & mine
    for train, val in groups:  # every other row trains, fit's own validation persons too
        assert sorted([*train, *val]) == list(range(len(table))) and set(table["person"].iloc[train]) >= mine
    again = more_validation_groups(table, own, 3, seed=0)
    assert all((a[1] == b[1]).all() for a, b in zip(groups, again))
    assert [set(table["person"].iloc[v]) for _, v in more_validation_groups(table, own, 3, seed=1)] != held
    # the persons run out: fewer groups, the last one smaller; no validation persons: no groups
    many = more_validation_groups(table, own, 10, seed=0)
    assert len(many) == -(-(10 - len(mine)) // len(mine)) and sum(len(v) for _, v in many) == 3 * (10 - len(mine))
    assert more_validation_groups(table, own[:0], 3, seed=0) == []
    # rows without a person are each their own group
    table["person"] = None
    groups = more_validation_groups(table, [0, 1, 2], 2, seed=0)
    assert len(groups) == 1 and len(groups[0][1]) == 3 and not set(groups[0][1]) & {0, 1, 2}


def test_fit_decides_on_several_validation_groups_pooled(faces_dir, run_dir, tmp_path, capsys):
    """--validation-groups 3: the never-worse rule and the person-relative step read three disjoint groups
    of held-out persons together; the saved model is the one trained without fit's own validation persons."""
    run = tmp_path / "groups"
    assert main(["fit", "--data", str(faces_dir), "--init-from", str(run_dir), "--out", str(run), "--json",
                 *TINY_FIT, "--epochs", "1", "--lr", "3", "--validation-groups", "3"]) == 0
    printed = json.loads(capsys.readouterr().out.split("\n}\n")[0] + "\n}")
    config = read_config(run)
    groups = config["validation_groups"]
    assert groups == printed["validation_groups"] and groups["groups"] == len(groups["per_group"]) == 3
    persons = [set(g["val_persons"]) for g in groups["per_group"]]
    assert persons[0] == set(config["split"]["val_persons"]) and all(persons)
    assert not (persons[0] & persons[1] or persons[0] & persons[2] or persons[1] & persons[2])
    assert groups["per_group"][0]["untouched_val_accuracy"] == config["untouched"]["val_accuracy"]
    for t, n in groups["val_images"].items():  # each group weighted by its labelled faces
        parts = [g for g in groups["per_group"] if g["val_images"].get(t)]
        assert n == sum(g["val_images"][t] for g in parts)
        for key in ("val_accuracy", "untouched_val_accuracy"):
            assert abs(groups[key][t] - sum(g[key][t] * g["val_images"][t] for g in parts) / n) < 1e-6
    # the rule read the pooled accuracies (a tie keeps the start), not fit's own group alone
    kept = {t for t, a in groups["val_accuracy"].items() if a <= groups["untouched_val_accuracy"][t]}
    assert kept and set(config["never_worse"]["kept"]) == kept
    assert all("3 validation groups" in why for why in config["never_worse"]["kept"].values())
    step = config["person_relative_fit"]
    pooled = step["pooled"]
    assert pooled["groups"] == 3 and pooled["val_images"] > step["val_images"]
    rank = {k: (v["accuracy"], -v["log_loss"]) for k, v in pooled["scores"].items()}
    assert rank[step["best"]] == max(rank.values()) and "3 groups of held-out persons" in step["reason"]
    # the progress bar's log says each extra training
    from facemt.cli.common import EventProgress
    from rich.console import Console

    console = Console(file=io.StringIO(), width=200)
    EventProgress(console)("evidence", {"group": 2, "groups": 3, "val_images": 12, "val_persons": 1, "epochs": 1})
    assert "validation group 2 of 3" in console.file.getvalue()
